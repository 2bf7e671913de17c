"""The CPU attention alone: ``vit.heads_first_attention`` (its own backward from the output and
the log-sum-exp) beside the same heads-first products differentiated by JAX's autodiff through the
softmax (fcd-jax's attention before session 9) and PyTorch's ``scaled_dot_product_attention``,
forward and forward + backward, at one layer's shapes, best of ``--repeats`` calls each.

    python -m benchmarks.attention --variant=S/16 --batch=8

A rematerialised block (``remat_policy="dots"``) runs the forward once and the backward once with
the first; with autodiff through the softmax it also ran the forward again in the backward
(``vit.ATTENTION_RESIDUALS``). GFLOP/s count q k^T and the product with v (2 x 2 N^2 D an image),
three times that for forward + backward.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.bench import best_seconds  # noqa: E402
from fcd_jax.models.vit import heads_first_attention, parse_variant  # noqa: E402


def autodiff_attention(query: jax.Array, key: jax.Array, value: jax.Array) -> jax.Array:
    """The same heads-first products with JAX's softmax, for autodiff to differentiate."""
    to_heads_first = lambda tokens: tokens.transpose(0, 2, 1, 3)
    query, key, value = map(to_heads_first, (query, key, value))
    logits = jnp.einsum("bhtd,bhsd->bhts", query * query.shape[-1] ** -0.5, key)
    return to_heads_first(jnp.einsum("bhts,bhsd->bhtd", jax.nn.softmax(logits, -1), value))


def main(argv: list[str] | None = None) -> dict[str, tuple[float, float]]:
    """Prints the table; returns name -> (forward s, forward + backward s)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="S/16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    arch = parse_variant(args.variant)
    tokens = 1 + (args.image_size // arch["patch_size"]) ** 2
    heads, head_dim = arch["num_heads"], arch["width"] // arch["num_heads"]
    rng = np.random.default_rng(0)
    query, key, value, d_out = (rng.standard_normal((args.batch, tokens, heads, head_dim))
                                .astype(np.float32) for _ in range(4))
    gflop = 4 * args.batch * heads * tokens**2 * head_dim / 1e9

    on_device = tuple(map(jnp.asarray, (query, key, value, d_out)))

    def jax_pair(attention):
        forward = jax.jit(attention)
        # The output's gradient an argument, as in a step (a constant is folded differently).
        backward = jax.jit(jax.grad(lambda q, k, v, d: jnp.sum(attention(q, k, v) * d), (0, 1, 2)))
        return (lambda: forward(*on_device[:3]).block_until_ready(),
                lambda: jax.block_until_ready(backward(*on_device)))

    heads_first = lambda tokens: torch.from_numpy(tokens).transpose(1, 2).contiguous()
    torch_qkv = [heads_first(x).requires_grad_() for x in (query, key, value)]
    torch_d_out = heads_first(d_out)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def torch_forward():
        with torch.no_grad():
            sdpa(*torch_qkv)

    def torch_backward():
        torch.autograd.grad(torch.sum(sdpa(*torch_qkv) * torch_d_out), torch_qkv)

    contestants = {"fcd-jax heads_first_attention": jax_pair(heads_first_attention),
                   "autodiff through the softmax": jax_pair(autodiff_attention),
                   "torch scaled_dot_product_attention": (torch_forward, torch_backward)}
    print(f"ViT-{args.variant} batch {args.batch}: {heads} heads, {tokens} tokens, head dim "
          f"{head_dim}; one layer")
    print(f"{'attention':36s} {'forward ms':>10s} {'GFLOP/s':>8s} {'fwd+bwd ms':>11s} "
          f"{'GFLOP/s':>8s}")
    seconds = {}
    for name, (forward, backward) in contestants.items():
        forward(), backward()
        forward_s = best_seconds(forward, args.repeats)
        backward_s = best_seconds(backward, args.repeats)
        seconds[name] = (forward_s, backward_s)
        print(f"{name:36s} {1e3 * forward_s:10.2f} {gflop / forward_s:8.1f} "
              f"{1e3 * backward_s:11.2f} {3 * gflop / backward_s:8.1f}")
    return seconds


if __name__ == "__main__":
    main()
