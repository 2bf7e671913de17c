"""Wall time of the 20 CIFAR-100 splits trained in one program vs one after another.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
        python launch/splits_benchmark.py [--steps 20] [--group_sizes 20,1]

tfds mock data and the tiny ViT of ``tests/scale_checks.py``; training only (scoring costs the
same either way). Each group size runs twice: the first pass includes compilation, the second
reuses the compiled step (``GroupTrainer`` keeps one per shape). Fake CPU devices share the
host's cores, so the ratio only indicates what a real 8-device machine gains.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def train_groups(config, splits, group_size, teacher, workdir: str) -> float:
    """Seconds to train every split in groups of ``group_size``, one group after another."""
    import jax

    from fcd_jax.group_trainer import GroupTrainer

    teacher_params, networks = teacher
    start = time.perf_counter()
    for first in range(0, len(splits), group_size):
        indices = list(range(first, min(first + group_size, len(splits))))
        with GroupTrainer(
            config, workdir, [splits[i] for i in indices], indices, teacher_params, networks,
        ) as trainer:
            trainer.train()
            jax.block_until_ready(trainer.states)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--group_sizes", default="20,1")
    args = parser.parse_args()

    import jax
    import tensorflow_datasets as tfds

    from fcd_jax.input_pipeline import list_splits, load_split
    from tests.scale_checks import teacher_for, tiny_config

    config = tiny_config("cifar100_super", "runlocal", **{
        "data.name": "cifar100", "train.steps": args.steps, "train.log_every": args.steps,
        "train.checkpoint_every": 10**6,
    })
    config.teacher.init = "random"
    with tfds.testing.mock_data(num_examples=160):
        splits = [load_split(config.data, name) for name in list_splits(config.data)]
    teacher = teacher_for(config)
    print(f"{len(splits)} splits, {args.steps} steps of batch {config.data.batch_size}, "
          f"{jax.device_count()} {jax.devices()[0].platform} devices")
    seconds = {}
    for group_size in [int(size) for size in args.group_sizes.split(",")]:
        for attempt in ("with compilation", "compiled"):
            with tempfile.TemporaryDirectory() as workdir:
                seconds[group_size, attempt] = train_groups(
                    config, splits, group_size, teacher, workdir
                )
            print(f"groups of {group_size:2d}, {attempt}: {seconds[group_size, attempt]:.1f} s",
                  flush=True)
    sizes = sorted({size for size, _ in seconds})
    if len(sizes) == 2:
        one, many = sizes
        for attempt in ("with compilation", "compiled"):
            ratio = seconds[one, attempt] / seconds[many, attempt]
            print(f"{attempt}: groups of {one} take {ratio:.1f}x the time of groups of {many}")


if __name__ == "__main__":
    main()
