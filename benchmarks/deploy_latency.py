"""Deployment latency and throughput: ``Detector.predict``, the deserialized JAX program and
onnxruntime on the same detector, batch 1 (median latency) and batch 32 (images/s).

Run from the repository root (BENCHMARKS.md, "Deployment latency")::

    python -m benchmarks.deploy_latency --variants=S/16,B/16 --image_size=224 \
        --json=benchmarks/results/deploy_latency_cpu.json

Each variant goes the production way: a tiny MVTec-like folder of random images at
``--image_size`` is trained for ``--train_steps`` steps with a random teacher of that ViT
(``python -m fcd_jax.main``'s ``train_and_eval``, configs/folder.py), loaded with
``fcd_jax.Detector.load(workdir)`` and exported to both artifacts (``Detector.export``), which are
loaded with ``fcd_jax.export.load_artifact``. ``--workdir`` skips the training and benchmarks a
workdir that is already trained (one variant). Before timing, the three must agree on the scores
(``--rtol``) and verdicts of the same images. Every contestant is warmed up (compiled) at both
batch sizes (the agreement check is the batch-32 warm-up); the timed calls are interleaved (one
call of each contestant per round) so that the drift of a shared machine hits them alike; only the
ratios of one run mean anything.
``Detector.predict`` is timed on uint8 arrays already at ``S x S`` (no file decoding), like the
artifacts. The last line printed is::

    <variant>: batch-1 latency ms predict A / jax B / onnx C; batch-32 images/s predict D / ...
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

CONTESTANTS = ("predict", "jax", "onnx")


def write_folder(root: Path, size: int, n_train: int, n_test: int, seed: int = 0) -> Path:
    """A one-category MVTec-like folder ``root/part`` of random RGB PNGs (a defect class with a
    bright square so the test set has both classes); returns ``root``."""
    rng = np.random.default_rng(seed)
    for folder, count, defect in (("train/good", n_train, False), ("test/good", n_test, False),
                                  ("test/spot", n_test, True)):
        path = root / "part" / folder
        path.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image = rng.integers(64, 192, (size, size, 3), dtype=np.uint8)
            if defect:
                image[size // 4: size // 2, size // 4: size // 2] = 255
            Image.fromarray(image).save(path / f"{i:03d}.png")
    return root


def train_workdir(variant: str, image_size: int, steps: int, directory: Path) -> float:
    """Trains the tiny folder run with a random ``variant`` teacher; returns its seconds."""
    from configs import folder
    from fcd_jax import main as fcd_main

    config = folder.get_config(f"variant={variant}")
    config.data.root = str(write_folder(directory / "data", image_size, n_train=8, n_test=2))
    config.data.image_size = image_size
    config.data.eval_batch_size = 32
    config.teacher.init = "random"
    config.train.update(steps=steps, checkpoint_every=max(steps, 1), log_every=max(steps, 1))
    config.optim.warmup_steps = 1
    config.eval.max_heatmaps = 0
    start = time.perf_counter()
    fcd_main.run(config, str(directory / "workdir"), "train_and_eval")
    return time.perf_counter() - start


def contestants(workdir: str, directory: Path) -> tuple[dict[str, Callable], dict]:
    """``{"predict" | "jax" | "onnx": uint8 [B, S, S, 3] -> scores [B]}`` and what building them
    took (seconds, artifact bytes)."""
    from fcd_jax import Detector
    from fcd_jax.export import load_artifact

    info = {}
    start = time.perf_counter()
    detector = Detector.load(workdir)
    info["load_s"] = time.perf_counter() - start
    calls = {"predict": lambda images: detector.predict(images).scores}
    for kind, suffix in (("jax", ".npz"), ("onnx", ".onnx")):
        path = str(directory / f"detector{suffix}")
        start = time.perf_counter()
        detector.export(path, format=kind)
        info[f"export_{kind}_s"] = time.perf_counter() - start
        info[f"artifact_{kind}_bytes"] = os.path.getsize(path)
        artifact = load_artifact(path)
        calls[kind] = lambda images, artifact=artifact: artifact(images)[0]
    info.update(run=detector.run, image_size=detector.image_size, threshold=detector.threshold,
                model=detector.saved.config.model.to_dict())
    return calls, info


def check_agreement(calls: dict[str, Callable], images: np.ndarray, threshold: float,
                    rtol: float) -> dict[str, float]:
    """Every contestant's scores of ``images`` against predict's (``AssertionError`` beyond
    ``rtol``, or on a verdict that differs); returns the largest relative differences."""
    reference = np.asarray(calls["predict"](images))
    worst = {}
    for name, call in calls.items():
        scores = np.asarray(call(images))
        np.testing.assert_allclose(scores, reference, rtol=rtol, err_msg=name)
        np.testing.assert_array_equal(scores >= threshold, reference >= threshold, err_msg=name)
        worst[name] = float(np.max(np.abs(scores - reference) / np.abs(reference)))
    return worst


def interleaved_seconds(calls: dict[str, Callable], images: np.ndarray, rounds: int,
                        warm_up: bool = True) -> dict[str, list[float]]:
    """Seconds of each call on ``images``, one call of each contestant per round (after one
    untimed warm-up call each, unless ``warm_up`` is False: already called at this shape)."""
    for call in calls.values() if warm_up else ():
        call(images)
    seconds = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            np.asarray(call(images))
            seconds[name].append(time.perf_counter() - start)
    return seconds


def bench_variant(args: argparse.Namespace, variant: str, directory: Path) -> dict:
    """One variant: trained (or ``--workdir``), exported, checked, timed."""
    result: dict = {"variant": variant}
    workdir = args.workdir
    if workdir is None:
        result["train_s"] = train_workdir(variant, args.image_size, args.train_steps, directory)
        workdir = str(directory / "workdir")
    calls, info = contestants(workdir, directory)
    result.update(info)
    size = info["image_size"]
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (args.throughput_batch, size, size, 3), dtype=np.uint8)
    result["max_rel_diff_vs_predict"] = check_agreement(calls, batch, info["threshold"], args.rtol)
    throughput = interleaved_seconds(calls, batch, args.throughput_rounds, warm_up=False)
    latency = interleaved_seconds(calls, batch[:1], args.rounds)
    result["latency_ms"] = {
        name: {"median": 1e3 * statistics.median(s), "min": 1e3 * min(s),
               "samples": [1e3 * x for x in s]} for name, s in latency.items()
    }
    result["throughput_images_s"] = {
        name: {"median": len(batch) / statistics.median(s), "best": len(batch) / min(s),
               "samples_s": s} for name, s in throughput.items()
    }
    median_ms = {name: result["latency_ms"][name]["median"] for name in calls}
    per_s = {name: result["throughput_images_s"][name]["median"] for name in calls}
    result["latency_ratio_vs_onnx"] = {name: median_ms[name] / median_ms["onnx"] for name in calls}
    result["throughput_ratio_vs_onnx"] = {name: per_s[name] / per_s["onnx"] for name in calls}
    return result


def machine() -> dict:
    import jax
    import onnxruntime

    return {
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(), "python": sys.version.split()[0], "jax": jax.__version__,
        "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
        "onnxruntime": onnxruntime.__version__, "onnx_providers": ["CPUExecutionProvider"],
    }


def summary_line(result: dict) -> str:
    latency = " / ".join(f"{n} {result['latency_ms'][n]['median']:.1f}" for n in CONTESTANTS)
    images = " / ".join(f"{n} {result['throughput_images_s'][n]['median']:.1f}"
                        for n in CONTESTANTS)
    return (f"{result['variant']}: batch-1 latency ms {latency}; "
            f"batch-{result['throughput_batch']} images/s {images}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="S/16,B/16", help="ViT variants, comma-separated")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--train_steps", type=int, default=2)
    parser.add_argument("--workdir", help="a trained workdir to benchmark instead of training")
    parser.add_argument("--rounds", type=int, default=20, help="timed batch-1 calls of each")
    parser.add_argument("--throughput_batch", type=int, default=32)
    parser.add_argument("--throughput_rounds", type=int, default=5)
    parser.add_argument("--rtol", type=float, default=1e-4)
    parser.add_argument("--note", default="", help="what else ran on the machine meanwhile")
    parser.add_argument("--json", help="write the results here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    variants = [v for v in args.variants.split(",") if v] if args.workdir is None else ["workdir"]
    out = {"args": vars(args), "machine_before": machine(), "results": []}
    for variant in variants:
        with tempfile.TemporaryDirectory(prefix="deploy_latency_") as directory:
            result = bench_variant(args, variant, Path(directory))
        result["throughput_batch"] = args.throughput_batch
        out["results"].append(result)
        print(summary_line(result), flush=True)
        if args.json:  # after each variant: a long run killed later keeps what it measured
            out["load_average_after"] = os.getloadavg()
            Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
