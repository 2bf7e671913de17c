"""HuggingFace ``ViTModel``, ``DeiTModel`` and ``Dinov2Model`` / ``Dinov2WithRegistersModel``
(and their ``...ForImageClassification`` wrappers, under ``vit.``, ``deit.``, ``dinov2.``,
``dinov2_with_registers.``; pooler and classifiers dropped).

A model folder holds ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``), maybe
``preprocessor_config.json`` with the input normalisation; a bare weights file works too. Block
names differ between the files on the Hub (``encoder.layer.{i}.attention.attention.query``) and
the modules of recent transformers (5.24: ``attention.q_proj``, ViT/DeiT under ``layers.{i}``),
which ``torch.save(model.state_dict())`` writes; both are read. DeiT's distillation token
becomes one register token (its position folded in); DINOv2's ``mask_token`` is dropped.
Positions are resampled as the models' own ``interpolate_pos_encoding``: bicubic, antialiased
for ``Dinov2WithRegistersModel``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fcd_jax.convert import layout
from fcd_jax.convert.arrays import Arrays, one_line
from fcd_jax.errors import CheckpointError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
PATCH_EMBEDDING = "embeddings.patch_embeddings.projection.weight"
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
HEADS = ("pooler.", "classifier.", "cls_classifier.", "distillation_classifier.")

_HUB_ATTENTION = dict(q="attention.attention.query", k="attention.attention.key",
                      v="attention.attention.value", proj="attention.output.dense")
_MODULE_ATTENTION = dict(q="attention.q_proj", k="attention.k_proj", v="attention.v_proj",
                         proj="attention.o_proj")
_VIT_REST = dict(ln1="layernorm_before", ln2="layernorm_after")
_DINOV2_REST = dict(ln1="norm1", ln2="norm2", fc1="mlp.fc1", fc2="mlp.fc2",
                    **{"ls1.gamma": "layer_scale1.lambda1", "ls2.gamma": "layer_scale2.lambda1"})
# (family, blocks' prefix, short name -> name): the first whose ln1 and q exist in block 0 is used.
BLOCK_NAMINGS = (
    ("vit", "encoder.layer", _HUB_ATTENTION | _VIT_REST |
     dict(fc1="intermediate.dense", fc2="output.dense")),
    ("vit", "layers", _MODULE_ATTENTION | _VIT_REST | dict(fc1="mlp.fc1", fc2="mlp.fc2")),
    ("dinov2", "encoder.layer", _HUB_ATTENTION | _DINOV2_REST),
    ("dinov2", "encoder.layer", _MODULE_ATTENTION | _DINOV2_REST),
)


def detect(keys: set[str], config: Mapping) -> bool:
    return any(k.endswith(PATCH_EMBEDDING) for k in keys)


def read_folder(path: Path) -> tuple[Path, dict[str, Any]]:
    """(weights file, ``config.json`` with the normalisation of ``preprocessor_config.json``)."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} is a folder without config.json or arch.json: not a "
                              "HuggingFace model folder nor one written by fcd_jax.convert")
    weights = next((path / name for name in WEIGHT_FILES if (path / name).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{path} has config.json but none of {', '.join(WEIGHT_FILES)}")
    preprocessor = path / "preprocessor_config.json"
    try:
        config = json.loads(config_file.read_text())
        preprocessing = json.loads(preprocessor.read_text()) if preprocessor.is_file() else {}
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read the JSON files in {path}: {one_line(error)}") from None
    config |= {k: preprocessing[k] for k in ("image_mean", "image_std") if k in preprocessing}
    return weights, config


def _check_config(config: Mapping, source) -> None:
    if config.get("use_swiglu_ffn"):
        raise CheckpointError(f"{source}: a SwiGLU MLP (DINOv2 ViT-g/14, use_swiglu_ffn) is not "
                              "supported: use a ViT-S/B/L checkpoint")
    if config.get("qkv_bias") is False:
        raise CheckpointError(f"{source}: attention without query/key/value biases "
                              "(qkv_bias=false) is not supported")
    activation = config.get("hidden_act", "gelu")
    if activation not in ("gelu", *TANH_GELUS):
        raise CheckpointError(f"{source}: activation {activation!r} is not supported "
                              "(use a ViT with GELU)")


def convert(arrays: Arrays, config: Mapping, options) -> tuple[layout.Params, dict]:
    _check_config(config, arrays.source)
    embedding = next(k for k in sorted(arrays.keys()) if k.endswith(PATCH_EMBEDDING))
    prefix = embedding.removesuffix(PATCH_EMBEDDING)
    get = lambda key: arrays.take(prefix + key)
    found = [(family, blocks, names) for family, blocks, names in BLOCK_NAMINGS
             if all(f"{prefix}{blocks}.0.{names[n]}.weight" in arrays for n in ("ln1", "q"))]
    if not found:
        raise CheckpointError(f"{arrays.source} (huggingface layout) has no block "
                              f"{prefix}encoder.layer.0 of a known naming: not a ViT, DeiT or "
                              "DINOv2 model")
    family, blocks, names = found[0]
    cls = get("embeddings.cls_token")
    heads = int(config.get("num_attention_heads")
                or layout.infer_heads(cls.size, options.num_heads, arrays.source))
    depth = layout.block_count(arrays.keys(), re.escape(f"{prefix}{blocks}.") + r"(\d+)\.")

    def block(i: int) -> layout.Params:
        def leaf(key: str) -> np.ndarray:
            short, kind = key.split(".")
            return get(f"{blocks}.{i}.{names.get(key) or names[short] + '.' + kind}")

        return layout.torch_block(leaf, heads, layer_scale=family == "dinov2")

    pos = get("embeddings.position_embeddings")
    registers = arrays.take_if_present(prefix + "embeddings.register_tokens")
    # Dinov2WithRegistersModel resamples with antialias=True; ViT, DeiT and Dinov2Model without.
    interpolation = "bicubic" if registers is None else "bicubic_antialias"
    distillation = arrays.take_if_present(prefix + "embeddings.distillation_token")
    if distillation is not None:
        registers, pos = layout.fold_distillation_token(distillation, pos)
    if distillation is not None or config.get("model_type") == "deit":
        family = "deit"
    params = layout.vit_tree(
        layout.conv_to_hwio(get(PATCH_EMBEDDING)), get(PATCH_EMBEDDING.replace("weight", "bias")),
        cls, pos, [block(i) for i in range(depth)],
        layout.norm(get("layernorm.weight"), get("layernorm.bias")), registers,
    )
    arrays.check_all_used(lambda k: k.removeprefix(prefix).startswith(HEADS)
                          or k.endswith("embeddings.mask_token"))
    normalisation = layout.UNKNOWN_NORMALISATION if family == "vit" else \
        layout.IMAGENET_NORMALISATION
    if config.get("image_mean") is not None:
        normalisation = dict(image_mean=config["image_mean"], image_std=config.get("image_std"))
    arch = layout.arch_from_params(
        params, layernorm_eps=float(config.get("layer_norm_eps",
                                               1e-6 if family == "dinov2" else 1e-12)),
        gelu_approximate=config.get("hidden_act", "gelu") in TANH_GELUS, family=family,
        pos_interpolation=interpolation, **normalisation,
    )
    return params, arch
