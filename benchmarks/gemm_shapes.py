"""The ViT train step's GEMM shapes alone: float32 ``jnp.dot`` (XLA:CPU, ``XLA_FLAGS`` as set)
beside ``torch.mm`` (MKL), shape by shape in one process, best of ``--repeats`` calls each.

    python -m benchmarks.gemm_shapes --variant=B/16 --batch=8
    XLA_FLAGS=--xla_cpu_use_onednn=true python -m benchmarks.gemm_shapes   # a flag's effect

Shapes: the square 2048^3 matmul of the peak measurement, then, for ``batch x 197`` tokens of the
variant's width D and MLP width F, the forward projections (D x D as q, k, v and the output each
run it; D x 3D, their fused form, for comparison; the MLP's D x F and F x D) and the weight
gradients (contracting over the tokens). Separates the kernels' speed from the rest of the step
(``bench.py``, ``profile_step.py``).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.bench import best_seconds  # noqa: E402
from fcd_jax.models.vit import parse_variant  # noqa: E402


def gemm_shapes(variant: str, batch: int, image_size: int = 224) -> dict[str, tuple[int, int, int]]:
    """name -> (m, k, n) of ``[m, k] @ [k, n]``."""
    arch = parse_variant(variant)
    tokens = batch * (1 + (image_size // arch["patch_size"]) ** 2)
    width, mlp = arch["width"], arch["mlp_dim"]
    return {
        "square 2048": (2048, 2048, 2048),
        "projection": (tokens, width, width),
        "qkv": (tokens, width, 3 * width),
        "mlp in": (tokens, width, mlp),
        "mlp out": (tokens, mlp, width),
        "weight grad, mlp in": (width, tokens, mlp),
        "weight grad, projection": (width, tokens, width),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="B/16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    dot = jax.jit(jnp.dot)
    rng = np.random.default_rng(0)
    print(f"ViT-{args.variant}, batch {args.batch}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print(f"{'GEMM':26s} {'m x k x n':>18s}  jax GFLOP/s  torch GFLOP/s  jax / torch")
    for name, (m, k, n) in gemm_shapes(args.variant, args.batch).items():
        a, b = rng.random((m, k), np.float32), rng.random((k, n), np.float32)
        jax_a, jax_b = jnp.asarray(a), jnp.asarray(b)
        torch_a, torch_b = torch.from_numpy(a), torch.from_numpy(b)
        dot(jax_a, jax_b).block_until_ready()
        torch.mm(torch_a, torch_b)
        jax_s = best_seconds(lambda a=jax_a, b=jax_b: dot(a, b).block_until_ready(), args.repeats)
        torch_s = best_seconds(lambda a=torch_a, b=torch_b: torch.mm(a, b), args.repeats)
        gflop = 2 * m * k * n / 1e9
        print(f"{name:26s} {f'{m}x{k}x{n}':>18s}  {gflop / jax_s:11.1f}  {gflop / torch_s:13.1f}"
              f"  {torch_s / jax_s:11.2f}")


if __name__ == "__main__":
    main()
