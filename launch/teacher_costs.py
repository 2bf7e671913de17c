"""What a stronger teacher costs: FLOPs, time and memory of one FCD train step per teacher setup.

    JAX_PLATFORMS=cpu python launch/teacher_costs.py [--setups paper,dinov2_b14@518] \
        [--batch 1] [--steps 3] [--memory_batches 32,4] [--remat_policy nothing|off]

A setup is ``paper`` (the paper's ViT-B/16 at 224) or a ``teacher=`` name of ``configs/default.py``
(``dinov2_b14``, ``dinov2_l14_reg``, ...), optionally ``@SIZE`` for another image size (DINOv2's
own grid is 37x37 at 518 px). For each, the single-split train step (the frozen teacher's forward
to its last needed block, then the student's forward and backward and the SGD update) is
compiled for ``--batch`` images; printed are XLA's FLOP count of that compiled step
(``cost_analysis``), the median wall time of ``--steps`` steps after one warm-up on this machine,
and, per ``--memory_batches``, the device memory per split and shared ("fixed") from the compiled
step's memory analysis (``train.step_memory_bytes``, as ``launch/memory_table.py``). The
teacher is random: its weights change neither the cost nor the memory.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # configs/

DEFAULT_SETUPS = "paper,dinov2_b14,dinov2_b14@518"


def setup_config(setup: str, batch: int, remat_policy: str = ""):
    """``configs/default.py`` for ``setup`` (``paper`` or ``TEACHER[@SIZE]``) at ``batch``;
    ``remat_policy`` one of ``model.remat_policy``'s, or "off" (``model.remat=False``), or ""
    (the config's)."""
    from configs import default

    name, _, size = setup.partition("@")
    config = default.get_config("" if name == "paper" else f"teacher={name}")
    if size:
        config.data.image_size = int(size)
    config.data.batch_size = batch
    if remat_policy:
        config.model.remat = remat_policy != "off"
        if config.model.remat:
            config.model.remat_policy = remat_policy
    return config


def compiled_step(config, steps: int):
    """(compiled train step of one split: the production stacked step with a stack of one, its
    states, teacher params, images [1, B, ...])."""
    import jax
    import numpy as np

    from fcd_jax import parallel
    from fcd_jax.models import init_params
    from fcd_jax.networks import build_networks
    from fcd_jax.teacher import reconcile
    from fcd_jax.train_state import init_stacked_states
    from fcd_jax.train_step import stacked_train_step

    config = reconcile(config, None)
    networks = build_networks(config)
    size, batch = config.data.image_size, config.data.batch_size
    teacher = networks.teacher_params(init_params(networks.student, size, jax.random.key(1)))
    mesh = parallel.make_mesh(1, batch, (1, 1), jax.devices()[:1])
    states = init_stacked_states(config, teacher["pos_embedding"], networks, np.array([0]),
                                 np.array([steps + 1]), mesh)
    images = np.random.default_rng(0).integers(0, 256, (1, batch, size, size, 3), np.uint8)
    step = stacked_train_step(config, networks, mesh)
    return step.lower(states, teacher, images).compile(), states, teacher, images


def step_cost(config, steps: int) -> tuple[float, float]:
    """(XLA's FLOPs of one compiled train step, median seconds per step over ``steps``).

    The FLOPs are counted on the step with the layer scan unrolled (``scan_layers=False``, the
    same computation): XLA's cost analysis counts a loop's body once."""
    import jax

    unrolled = config.copy_and_resolve_references()
    unrolled.model.scan_layers = False
    flops = float(compiled_step(unrolled, steps)[0].cost_analysis().get("flops", float("nan")))
    compiled, state, teacher, images = compiled_step(config, steps)
    state, metrics = compiled(state, teacher, images)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = compiled(state, teacher, images)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return flops, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", default=DEFAULT_SETUPS)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="0: memory only")
    parser.add_argument("--remat_policy", default="",
                        help="model.remat_policy for every setup, or off (default: the config's)")
    parser.add_argument("--memory_batches", default="",
                        help="e.g. 32,4: memory per split at these batch sizes (compiles 2x each)")
    args = parser.parse_args()

    from fcd_jax.models import build_vit
    from fcd_jax.sizing import step_memory_bytes
    from fcd_jax.teacher import reconcile

    rows = []
    for setup in args.setups.split(","):
        config = setup_config(setup, args.batch, args.remat_policy)
        tokens = 1 + (config.data.image_size // build_vit(config.model).patch_size) ** 2
        flops, seconds = step_cost(config, args.steps) if args.steps else (float("nan"),) * 2
        memory = []
        for batch in [int(b) for b in args.memory_batches.split(",") if b]:
            batch_config = reconcile(setup_config(setup, batch, args.remat_policy), None)
            one = step_memory_bytes(batch_config, 1)
            two = step_memory_bytes(batch_config, 2)
            memory.append(f"b{batch}: {(two - one) / 2**30:.2f} + {(2 * one - two) / 2**30:.2f}")
        rows.append((setup, config.model.variant, config.data.image_size, tokens, flops, seconds,
                     "; ".join(memory)))
        print(f"{setup}: {flops / 1e9:.0f} GFLOP, {seconds:.2f} s/step {'; '.join(memory)}",
              file=sys.stderr, flush=True)

    base_flops, base_seconds = rows[0][4], rows[0][5]
    shown = lambda value, form: "-" if math.isnan(value) else format(value, form)
    print(f"\nOne train step, batch {args.batch}, {args.steps} timed steps (median)"
          f"{', remat_policy ' + args.remat_policy if args.remat_policy else ''}:\n")
    print("| setup | ViT | image | tokens | GFLOP/step | x | s/step | x | GiB per split + fixed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for setup, variant, size, tokens, flops, seconds, memory in rows:
        print(f"| {setup} | {variant} | {size} | {tokens} | {shown(flops / 1e9, '.1f')} | "
              f"{shown(flops / base_flops, '.1f')} | {shown(seconds, '.2f')} | "
              f"{shown(seconds / base_seconds, '.1f')} | {memory or '-'} |")


if __name__ == "__main__":
    main()
