"""Device memory per split of the ViT-B/16 train step, from XLA's own memory analysis.

    JAX_PLATFORMS=cpu python launch/memory_table.py [--batch_sizes 32,4] [--variants ...]

For each batch size and model variant the stacked train step is compiled for 1 and 2 splits on
one device (``sizing.step_memory_bytes``: arguments + outputs + temporaries - donated aliases);
memory is linear in the splits, so per split = two - one and fixed = one - per split. Prints a
Markdown table with how many splits fit in 90% of a 16, 80 and 141 GiB device (the margin
``parallel_splits="auto"`` keeps). Compiled for CPU: GPU/TPU fusions differ, so read the numbers
as estimates; ``parallel_splits="auto"`` measures on the real device.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # configs/

DEVICE_GIB = (16, 80, 141)
VARIANTS = {  # config.model fields over the default (float32, remat_policy="dots")
    "default": {},
    "bfloat16": {"dtype": "bfloat16"},
    "remat=False": {"remat": False},
    "remat_policy=nothing": {"remat_policy": "nothing"},
    "bfloat16+nothing": {"dtype": "bfloat16", "remat_policy": "nothing"},
}
PAPER_BATCHES = {32: "CIFAR-10/100, Fashion-MNIST", 4: "MVTec AD"}


def splits_that_fit(fixed: int, per_split: int, device_gib: float) -> int:
    return max(int((0.9 * device_gib * 2**30 - fixed) // per_split), 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_sizes", default="32,4")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()

    from configs import default
    from fcd_jax import sizing
    from fcd_jax.teacher import reconcile

    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        for variant in args.variants.split(","):
            config = default.get_config()  # ViT-B/16, 224x224, groupc {3, 6, 9, 11}
            config.data.batch_size = batch
            config.model.update(VARIANTS[variant])
            config = reconcile(config, None)  # a random teacher's spec (Google's ViT values)
            start = time.perf_counter()
            one = sizing.step_memory_bytes(config, 1)
            two = sizing.step_memory_bytes(config, 2)
            per_split, fixed = two - one, 2 * one - two
            fits = [splits_that_fit(fixed, per_split, gib) for gib in DEVICE_GIB]
            rows.append((batch, variant, per_split, fixed, fits))
            print(f"batch {batch} {variant}: {per_split / 2**30:.2f} GiB per split, "
                  f"{fixed / 2**30:.2f} GiB fixed, fits {fits} "
                  f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)

    print("| batch per split | dtype / remat | GiB per split | GiB fixed (teacher) | "
          + " | ".join(f"splits on {gib} GiB" for gib in DEVICE_GIB) + " |")
    print("|" + "---|" * (4 + len(DEVICE_GIB)))
    for batch, variant, per_split, fixed, fits in rows:
        label = f"{batch} ({PAPER_BATCHES.get(batch, 'other')})"
        print(f"| {label} | {variant} | {per_split / 2**30:.2f} | {fixed / 2**30:.2f} | "
              + " | ".join(str(fit) for fit in fits) + " |")


if __name__ == "__main__":
    main()
