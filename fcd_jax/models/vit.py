"""Vision Transformer (Dosovitskiy et al., ICLR 2021) that returns every block's tokens.

METHOD.md "Networks": teacher and student share this one model. ``apply`` returns a dict with

- ``"blocks"``: phi_c for every encoder block c, stacked:
  ``[depth, batch, 1 + num_patches, width]``, cls token first, then the patch tokens in grid
  (row-major) order;
- ``"encoded"``: the final LayerNorm applied to the last block's output,
  ``[batch, 1 + num_patches, width]``.

Options the newer checkpoints need (each off by default, i.e. the paper's ViT):

- ``layer_scale``: per-channel scales ``ls1``/``ls2`` on the attention and MLP branches before
  the residual sum (CaiT; DINOv2, DeiT III); initialised to 1, so a random student starts as
  the plain ViT.
- ``num_registers``: extra learned tokens placed after cls and before the patches, without a
  position embedding (DINOv2 with registers, Darcet et al. 2024). DeiT's distillation token is
  carried as one such token: the converter folds its position embedding into it, which is the
  same sum. These tokens take part in attention but are DROPPED from ``"blocks"`` and
  ``"encoded"``, so losses, top-k, maps and Gram matrices (METHOD.md) never see them and the
  contract above holds for every checkpoint.

The position embedding ``pos_embedding`` ``[1, 1 + num_patches, width]`` is a parameter at the
image size used: ``fcd_jax.convert`` resamples a checkpoint's grid once, as that checkpoint's own
code does (e.g. DINOv2's 37x37 grid, bicubically), rather than on every forward pass.

The encoder blocks' parameters are always stacked on a leading ``depth`` axis (``params["blocks"]``)
and run with ``nn.scan``; ``scan_layers=False`` fully unrolls that scan (slower compile, sometimes a
faster step) with the very same parameters and numbers. ``remat=True`` (the config's default)
rematerialises each block, keeping for the backward what ``remat_policy`` names
(``REMAT_POLICIES``). Attention runs heads first on the CPU (:func:`heads_first_attention`).
"""

from __future__ import annotations

import functools
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from fcd_jax.errors import ConfigError

# Width, depth, heads and MLP width of the named variants (ViT paper, Table 1; DeiT for Ti and S).
VARIANTS: dict[str, dict[str, int]] = {
    "Ti": dict(width=192, depth=12, num_heads=3, mlp_dim=768),
    "S": dict(width=384, depth=12, num_heads=6, mlp_dim=1536),
    "B": dict(width=768, depth=12, num_heads=12, mlp_dim=3072),
    "L": dict(width=1024, depth=24, num_heads=16, mlp_dim=4096),
}


def parse_variant(variant: str) -> dict[str, int]:
    """``"B/16"`` -> ``dict(width=768, depth=12, num_heads=12, mlp_dim=3072, patch_size=16)``."""
    match = re.fullmatch(r"(Ti|S|B|L)/(\d+)", variant.strip())
    if not match:
        raise ConfigError(
            f"unknown ViT variant {variant!r}: use one of "
            f"{', '.join(k + '/16' for k in VARIANTS)} (any patch size after the slash)"
        )
    return dict(VARIANTS[match.group(1)], patch_size=int(match.group(2)))


class MlpBlock(nn.Module):
    mlp_dim: int
    gelu_approximate: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        width = tokens.shape[-1]
        hidden = nn.Dense(self.mlp_dim, dtype=self.dtype, name="fc1")(tokens)
        hidden = nn.gelu(hidden, approximate=self.gelu_approximate)
        return nn.Dense(width, dtype=self.dtype, name="fc2")(hidden)


class SelfAttention(nn.Module):
    """Multi-head self-attention; parameters laid out as Flax's MultiHeadDotProductAttention."""

    num_heads: int
    dtype: Any = jnp.float32
    implementation: str = ""  # one of ATTENTION_IMPLEMENTATIONS

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        width = tokens.shape[-1]
        if width % self.num_heads:
            raise ConfigError(f"width {width} is not divisible by num_heads {self.num_heads}")
        head_dim = width // self.num_heads

        def project(name: str) -> jax.Array:
            dense = nn.DenseGeneral((self.num_heads, head_dim), dtype=self.dtype, name=name)
            return dense(tokens)  # [batch, tokens, heads, head_dim]

        query, key, value = project("query"), project("key"), project("value")
        implementation = self.implementation or (
            "heads_first" if jax.default_backend() == "cpu" else None)
        if implementation == "heads_first":
            attended = heads_first_attention(query, key, value)
        else:
            attended = jax.nn.dot_product_attention(
                query, key, value, implementation=implementation)
        return nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, name="out")(attended)


# model.attention_implementation: "" picks per platform (CPU: "heads_first"; elsewhere JAX's own
# choice, e.g. cuDNN's fused kernel for bfloat16 on a GPU).
ATTENTION_IMPLEMENTATIONS = ("", "heads_first", "xla", "cudnn")


def heads_first_attention(query: jax.Array, key: jax.Array, value: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(head_dim)) v for ``[batch, tokens, heads, head_dim]`` inputs and
    output, as ``jax.nn.dot_product_attention``, with the matmuls batched heads first: on the
    CPU the tokens-first products of ``dot_product_attention`` run at a fraction of the matmul
    rate (BENCHMARKS.md "Step level"). Scaling q instead of the logits costs head_dim, not
    tokens, multiplies per query. The products and the backward pass are
    :func:`_heads_first_softmax_product`'s."""
    to_heads_first = lambda tokens: tokens.transpose(0, 2, 1, 3)  # and back: its own inverse
    query, key, value = map(to_heads_first, (query, key, value))
    query = query * jnp.asarray(query.shape[-1] ** -0.5, query.dtype)
    return to_heads_first(_heads_first_softmax_product(query, key, value))


# What the attention's backward pass reads besides q, k and v; a rematerialised block keeps them
# (REMAT_POLICIES["dots"]) so that its backward recomputes q k^T but not the attention forward.
ATTENTION_RESIDUALS = ("attention_output", "attention_log_sum_exp")


def _softmax_product_forward(query: jax.Array, key: jax.Array, value: jax.Array
                             ) -> tuple[jax.Array, jax.Array]:
    """softmax(q k^T) v heads first, normalised after the product with v (one division per
    output element rather than per weight), and each query's log-sum-exp of its logits."""
    logits = jnp.einsum("bhtd,bhsd->bhts", query, key, preferred_element_type=jnp.float32)
    row_max = logits.max(-1, keepdims=True)
    weights = jnp.exp(logits - row_max)
    total = weights.sum(-1, keepdims=True)
    output = jnp.einsum("bhts,bhsd->bhtd", weights.astype(value.dtype), value,
                        preferred_element_type=jnp.float32) / total
    return output.astype(value.dtype), row_max + jnp.log(total)


@jax.custom_vjp
def _heads_first_softmax_product(query: jax.Array, key: jax.Array, value: jax.Array
                                 ) -> jax.Array:
    """softmax(q k^T) v for ``[batch, heads, tokens, head_dim]`` operands, with flash attention's
    backward pass (untiled) rather than autodiff's through the softmax: the forward's weights are
    not kept; the backward gets them back from q k^T and the log-sum-exp (no softmax reductions,
    no product with v)."""
    return _softmax_product_forward(query, key, value)[0]


def _softmax_product_fwd(query: jax.Array, key: jax.Array, value: jax.Array):
    output, log_sum_exp = _softmax_product_forward(query, key, value)
    output = checkpoint_name(output, ATTENTION_RESIDUALS[0])
    log_sum_exp = checkpoint_name(log_sum_exp, ATTENTION_RESIDUALS[1])
    return output, (query, key, value, output, log_sum_exp)


def _softmax_product_bwd(residuals: tuple, d_output: jax.Array):
    """With P = exp(q k^T - lse): dv = P^T do, dP = do v^T, dS = P (dP - rowsum(do * o)),
    dq = dS k, dk = dS^T q."""
    query, key, value, output, log_sum_exp = residuals
    probs = jnp.exp(jnp.einsum("bhtd,bhsd->bhts", query, key,
                               preferred_element_type=jnp.float32) - log_sum_exp)
    d_value = jnp.einsum("bhts,bhtd->bhsd", probs.astype(value.dtype), d_output)
    d_probs = jnp.einsum("bhtd,bhsd->bhts", d_output, value, preferred_element_type=jnp.float32)
    row_dot = jnp.sum(d_output.astype(jnp.float32) * output.astype(jnp.float32), -1,
                      keepdims=True)
    d_logits = (probs * (d_probs - row_dot)).astype(query.dtype)
    return (jnp.einsum("bhts,bhsd->bhtd", d_logits, key),
            jnp.einsum("bhts,bhtd->bhsd", d_logits, query), d_value)


_heads_first_softmax_product.defvjp(_softmax_product_fwd, _softmax_product_bwd)


def drop_registers(tokens: jax.Array, num_registers: int) -> jax.Array:
    """``[..., 1 + R + N, D]`` -> ``[..., 1 + N, D]``: cls and the patch tokens, registers out."""
    if not num_registers:
        return tokens
    return jnp.concatenate([tokens[..., :1, :], tokens[..., 1 + num_registers:, :]], axis=-2)


# What a rematerialised block keeps for the backward pass (``model.remat_policy``): "dots" the
# outputs of the projections' and MLP's matmuls and the CPU attention's output and log-sum-exp
# (the norms, GELU and q k^T are recomputed, inside the backward's own passes); "nothing"
# nothing.
REMAT_POLICIES = {
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(*ATTENTION_RESIDUALS)),
    "nothing": jax.checkpoint_policies.nothing_saveable,
}


class EncoderBlock(nn.Module):
    """Pre-LayerNorm transformer block; ``(carry, _) -> (carry, output)`` so it can be scanned.
    The carry holds every token; the output drops the ``num_registers`` register tokens."""

    num_heads: int
    mlp_dim: int
    layernorm_eps: float = 1e-6
    gelu_approximate: bool = False
    dtype: Any = jnp.float32
    attention_implementation: str = ""
    layer_scale: bool = False
    num_registers: int = 0

    @nn.compact
    def __call__(self, tokens: jax.Array, _: Any = None) -> tuple[jax.Array, jax.Array]:
        width = tokens.shape[-1]
        norm = lambda name: nn.LayerNorm(epsilon=self.layernorm_eps, dtype=self.dtype, name=name)

        def scaled(branch: jax.Array, name: str) -> jax.Array:
            if not self.layer_scale:
                return branch
            return branch * self.param(name, nn.initializers.ones, (width,)).astype(self.dtype)

        attention = SelfAttention(self.num_heads, self.dtype, self.attention_implementation,
                                  name="attn")
        tokens = tokens + scaled(attention(norm("ln1")(tokens)), "ls1")
        mlp = MlpBlock(self.mlp_dim, self.gelu_approximate, self.dtype, name="mlp")
        tokens = tokens + scaled(mlp(norm("ln2")(tokens)), "ls2")
        return tokens, drop_registers(tokens, self.num_registers)


class ViT(nn.Module):
    """ViT encoder without a classification head. Input: NHWC images, already normalised."""

    patch_size: int = 16
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    layernorm_eps: float = 1e-6
    gelu_approximate: bool = False
    dtype: Any = jnp.float32
    scan_layers: bool = True
    remat: bool = False
    remat_policy: str = "nothing"
    attention_implementation: str = ""
    layer_scale: bool = False
    num_registers: int = 0

    @nn.compact
    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        batch, height, width_px, channels = images.shape
        if height % self.patch_size or width_px % self.patch_size:
            raise ConfigError(
                f"image size {height}x{width_px} is not a multiple of the patch size "
                f"{self.patch_size}: resize the images (config.model.image_size)"
            )
        grid_h, grid_w = height // self.patch_size, width_px // self.patch_size

        # Patch embedding: a stride-p convolution, computed as one matmul over flattened patches.
        kernel = self.param(
            "embedding_kernel", nn.initializers.lecun_normal(),
            (self.patch_size, self.patch_size, channels, self.width),
        )
        bias = self.param("embedding_bias", nn.initializers.zeros, (self.width,))
        patches = images.reshape(batch, grid_h, self.patch_size, grid_w, self.patch_size, channels)
        patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(batch, grid_h * grid_w, -1)
        flat_kernel = kernel.reshape(-1, self.width).astype(self.dtype)
        tokens = jnp.einsum("bnk,kd->bnd", patches.astype(self.dtype), flat_kernel)
        tokens = tokens + bias.astype(self.dtype)

        cls = self.param("cls", nn.initializers.zeros, (1, 1, self.width))
        tokens = jnp.concatenate(
            [jnp.broadcast_to(cls, (batch, 1, self.width)).astype(self.dtype), tokens], axis=1
        )
        pos_embedding = self.param(
            "pos_embedding", nn.initializers.normal(stddev=0.02),
            (1, 1 + grid_h * grid_w, self.width),
        )
        tokens = tokens + pos_embedding.astype(self.dtype)
        if self.num_registers:  # after cls, before the patches, no position (as DINOv2 places them)
            registers = self.param("registers", nn.initializers.normal(stddev=0.02),
                                   (1, self.num_registers, self.width))
            registers = jnp.broadcast_to(registers, (batch, self.num_registers, self.width))
            tokens = jnp.concatenate(
                [tokens[:, :1], registers.astype(self.dtype), tokens[:, 1:]], axis=1)

        block = EncoderBlock
        if self.remat:
            block = nn.remat(block, prevent_cse=False, policy=REMAT_POLICIES[self.remat_policy])
        blocks = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=self.depth,
            unroll=1 if self.scan_layers else self.depth,
        )(
            self.num_heads, self.mlp_dim, self.layernorm_eps, self.gelu_approximate, self.dtype,
            self.attention_implementation, self.layer_scale, self.num_registers, name="blocks",
        )
        last, every_block = blocks(tokens, None)
        final_norm = nn.LayerNorm(epsilon=self.layernorm_eps, dtype=self.dtype, name="encoder_norm")
        encoded = final_norm(drop_registers(last, self.num_registers))  # LayerNorm is per token
        return {"blocks": every_block, "encoded": encoded}


def build_vit(model_config: Any, depth: int | None = None) -> ViT:
    """Builds the ViT that ``config.model`` (an ml_collections ConfigDict or dict) describes.

    ``model_config.variant`` (e.g. ``"B/16"``) gives the architecture; explicit fields
    (``patch_size``, ``width``, ``depth``, ``num_heads``, ``mlp_dim``) override it; ``layer_scale``
    and ``num_registers`` (default off) add what DINOv2 / DeiT checkpoints need. ``depth``
    overrides the depth, to run only the first blocks (see :func:`truncate_params`).
    """
    get = model_config.get
    arch = parse_variant(get("variant") or "B/16")
    for field in ("patch_size", "width", "depth", "num_heads", "mlp_dim"):
        if get(field):
            arch[field] = int(get(field))
    if depth is not None:
        arch["depth"] = depth
    dtype = jnp.dtype(get("dtype") or "float32")
    return ViT(
        **arch,
        layernorm_eps=float(get("layernorm_eps") or 1e-6),
        gelu_approximate=bool(get("gelu_approximate")),
        dtype=dtype,
        scan_layers=bool(get("scan_layers", True)),
        remat=bool(get("remat")),
        remat_policy=str(get("remat_policy") or "nothing"),
        attention_implementation=get("attention_implementation") or "",
        layer_scale=bool(get("layer_scale")),
        num_registers=int(get("num_registers") or 0),
    )


def init_params(model: nn.Module, image_size: int, key: jax.Array) -> dict:
    """Random parameters of ``model`` for ``image_size`` x ``image_size`` RGB input (jitted)."""
    return init_variables(model, image_size, key)["params"]


def init_variables(model: nn.Module, image_size: int, key: jax.Array) -> dict:
    """All of ``model``'s random Flax variables (a CNN's ``batch_stats`` too) for
    ``image_size`` px RGB input, from one compiled init per (model, size) in a process."""
    return _jitted_init(model, image_size)(key)


@functools.cache
def _jitted_init(model: nn.Module, image_size: int):
    """A fresh ``jax.jit(model.init)`` at every call compiled it again (2.5 s of a small job's
    wall time)."""
    shape = (1, image_size, image_size, 3)
    return jax.jit(lambda key: dict(model.init(key, jnp.zeros(shape, jnp.float32))))


def truncate_params(params: dict, depth: int) -> dict:
    """Keeps only the first ``depth`` encoder blocks (the teacher need not run past the last
    block that the losses use)."""
    truncated = dict(params)
    truncated["blocks"] = jax.tree.map(lambda leaf: leaf[:depth], params["blocks"])
    return truncated

