"""Google ``.npz`` ViT checkpoints (vit_jax, AugReg, big_vision): Flax shapes already.

vit_jax: ``Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1``, ``LayerNorm_0/2``,
``MlpBlock_3`` (AugReg files alike, some under ``opt/target/``); big_vision: ``params/``,
``MultiHeadDotProductAttention_0``, ``LayerNorm_0/1``, ``MlpBlock_0``, blocks maybe stacked
(scanned) under ``encoderblock/``. Inputs in [-1, 1]; positions resampled bilinearly (vit_jax).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from fcd_jax.convert import layout
from fcd_jax.convert.arrays import Arrays
from fcd_jax.errors import CheckpointError

PREFIXES = ("opt/target/", "params/img/", "params/", "")


def detect(keys: set[str], config: Mapping) -> bool:
    return any(k.endswith("embedding/kernel") for k in keys)


def convert(arrays: Arrays, config: Mapping, options) -> tuple[layout.Params, dict]:
    prefix = next((p for p in PREFIXES if f"{p}embedding/kernel" in arrays), None)
    if prefix is None:
        raise CheckpointError(f"{arrays.source} has no 'embedding/kernel': not a Google ViT .npz "
                              "(hybrid ResNet+ViT checkpoints are not supported)")
    get = lambda key: arrays.take(prefix + key)
    big_vision = any(f"{prefix}Transformer/{block}/MultiHeadDotProductAttention_0/out/kernel"
                     in arrays for block in ("encoderblock_0", "encoderblock"))
    mha, ln2, mlp = ("_0", "LayerNorm_1", "MlpBlock_0") if big_vision else \
        ("_1", "LayerNorm_2", "MlpBlock_3")
    scanned = f"{prefix}Transformer/encoderblock/LayerNorm_0/scale" in arrays
    if scanned:
        depth = get("Transformer/encoderblock/LayerNorm_0/scale").shape[0]
        block_get = lambda i, key: get(f"Transformer/encoderblock/{key}")[i]
    else:
        depth = layout.block_count(arrays.arrays,
                                   re.escape(prefix) + r"Transformer/encoderblock_(\d+)/")
        block_get = lambda i, key: get(f"Transformer/encoderblock_{i}/{key}")

    def block(i: int) -> layout.Params:
        leaf = lambda key: block_get(i, key)
        dense = lambda key: layout.dense(leaf(f"{key}/kernel"), leaf(f"{key}/bias"))
        attn = f"MultiHeadDotProductAttention{mha}"
        return {
            "ln1": layout.norm(leaf("LayerNorm_0/scale"), leaf("LayerNorm_0/bias")),
            "attn": {name: dense(f"{attn}/{name}") for name in ("query", "key", "value", "out")},
            "ln2": layout.norm(leaf(f"{ln2}/scale"), leaf(f"{ln2}/bias")),
            "mlp": {"fc1": dense(f"{mlp}/Dense_0"), "fc2": dense(f"{mlp}/Dense_1")},
        }

    if f"{prefix}cls" not in arrays:
        raise CheckpointError(f"{arrays.source} has no class token ('cls'): this is a "
                              "global-average or MAP-pooled ViT; FCD needs a class-token ViT")
    pos_key = next((k for k in ("Transformer/posembed_input/pos_embedding", "pos_embedding")
                    if prefix + k in arrays), "Transformer/posembed_input/pos_embedding")
    params = layout.vit_tree(
        get("embedding/kernel"), get("embedding/bias"), get("cls"), get(pos_key),
        [block(i) for i in range(depth)],
        layout.norm(get("Transformer/encoder_norm/scale"), get("Transformer/encoder_norm/bias")),
    )
    arrays.check_all_used(lambda k: not k.startswith(prefix) or
                          k[len(prefix):].startswith(("head/", "pre_logits/", "MAPHead")))
    arch = layout.arch_from_params(
        params, layernorm_eps=1e-6, gelu_approximate=bool(options.gelu_approximate),
        family="vit", pos_interpolation="bilinear", **layout.GOOGLE_NORMALISATION)
    return params, arch
