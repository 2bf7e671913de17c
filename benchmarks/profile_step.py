"""Where the production train step's time goes: a ``jax.profiler`` trace of bench.py's fcd-jax
contestant (``JaxFcd``: ``train_step.stacked_train_step``, a stack of one split), summed by kind.

    python -m benchmarks.profile_step --variant=B/16 --batch=8 --steps=3 [--override=...]

Each XLA op (a fusion, a dot, a copy, ...) of the traced steps is put in a kind by its name
(``KINDS``): what share of the ops' time each kind takes, and the matmuls' rate against the
analytic FLOPs of ``bench.train_step_flops``. The profiler slows the step (by ~45% at ViT-S/16
batch 8 on a 2-core CPU), so the shares, not the seconds, are what to read. The trace stays in
``--trace_dir`` for Perfetto or TensorBoard. ``XLA_FLAGS`` apply as set: two runs compare a flag.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from benchmarks import bench

# Op name (less its ".N") -> kind, first match wins; names as XLA:CPU's thunks call them.
KINDS = (
    ("matmul", re.compile(r"^(ynn_fusion|xnn_fusion|onednn|dot|convolution)")),
    ("scan slices and updates", re.compile(r"dynamic-slice|dynamic-update-slice|while")),
    # Data movement alone; "broadcast_divide_fusion" and the like are arithmetic.
    ("copy/transpose/broadcast", re.compile(
        r"^(wrapped_)?(copy|transpose|concatenate|pad)|^wrapped_broadcast|^bitcast_(copy|broadcast)")),
)


def kind_of(op: str) -> str:
    for kind, pattern in KINDS:
        if pattern.search(op):
            return kind
    return "elementwise/reduce fusions"


def op_seconds(trace_dir: Path) -> dict[str, float]:
    """Seconds of every XLA op of the Perfetto trace, by op name less its ``.N``: the complete
    events on XLA's CPU worker threads, without the executor's own wrapper events."""
    path = next(trace_dir.rglob("perfetto_trace.json.gz"))
    with gzip.open(path) as file:
        events = json.load(file)
    events = events["traceEvents"] if isinstance(events, dict) else events
    threads = {(event["pid"], event["tid"]): event["args"]["name"] for event in events
               if event.get("ph") == "M" and event.get("name") == "thread_name"}
    seconds: dict[str, float] = collections.Counter()
    for event in events:
        thread = threads.get((event.get("pid"), event.get("tid")), "")
        if (event.get("ph") == "X" and thread.startswith("tf_XLAEigen")
                and "::" not in event["name"]):
            seconds[re.sub(r"\.\d+$", "", event["name"])] += event["dur"] * 1e-6
    return seconds


def profile(args: argparse.Namespace) -> dict:
    config = bench.bench_config(args.variant, args.image_size, args.batch, overrides=args.override)
    teacher_params, student_params = bench.random_weights(config, 0)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch, args.image_size, args.image_size, 3), np.uint8)
    fcd = bench.JaxFcd(config, teacher_params, student_params, images, images)
    batch = fcd.to_input(images)
    for _ in range(2):  # compiled already; two untimed steps settle the allocator
        fcd.train_step(batch)
    fcd.block()
    trace_dir = Path(args.trace_dir or tempfile.mkdtemp(prefix="fcd_profile_"))
    start = time.perf_counter()
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        for _ in range(args.steps):
            fcd.train_step(batch)
        fcd.block()
    wall = (time.perf_counter() - start) / args.steps
    seconds = op_seconds(trace_dir)
    by_kind: dict[str, float] = collections.Counter()
    for op, value in seconds.items():
        by_kind[kind_of(op)] += value / args.steps
    total = sum(by_kind.values())
    flops = bench.train_step_flops(config)
    print(f"ViT-{args.variant} batch {args.batch}: {wall:.3f} s a step traced (the profiler "
          f"slows it), XLA ops {total:.3f} thread-s a step; trace in {trace_dir}")
    for kind, value in sorted(by_kind.items(), key=lambda item: -item[1]):
        print(f"  {kind:26s} {value:7.3f} s  {100 * value / total:5.1f}%")
    print(f"  matmul ops: {flops / by_kind['matmul'] / 1e9:.1f} GFLOP/s of their thread-seconds "
          "(analytic FLOPs)")
    top = sorted(seconds.items(), key=lambda item: -item[1])[: args.top]
    for op, value in top:
        print(f"    {value / args.steps:7.3f} s  {op}")
    return dict(wall=wall, by_kind=dict(by_kind), top=top)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="B/16")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--override", action="append", default=[],
                        help="config override, e.g. model.remat=False")
    parser.add_argument("--top", type=int, default=15, help="op kinds listed by name")
    parser.add_argument("--trace_dir", default="")
    return parser.parse_args(argv)


if __name__ == "__main__":
    profile(parse_args())
