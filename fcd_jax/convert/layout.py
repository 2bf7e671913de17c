"""What every checkpoint family shares: the target param tree of ``fcd_jax.models.vit.ViT``,
PyTorch-to-Flax reshapes, and the ``arch`` record derived from the converted params.

``arch`` fields (``arch.json`` of a converted teacher):

- the architecture, :data:`ARCH_FIELDS`, which ``build_vit`` takes as is;
- ``image_size`` and ``pos_interpolation`` (how the position grid was resampled: see
  ``positions``);
- ``image_mean``/``image_std``: the input normalisation the weights were trained with (``None``
  where the file does not say), ``family`` (``vit``, ``deit`` or ``dinov2``), ``format``,
  ``source``, ``source_sha256``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from fcd_jax.errors import CheckpointError
from fcd_jax.models.vit import VARIANTS

Params = dict[str, Any]

ARCH_FIELDS = ("patch_size", "width", "depth", "num_heads", "mlp_dim", "layernorm_eps",
               "gelu_approximate", "layer_scale", "num_registers")
# Fields added after the first arch.json files were written: their value in those files.
ARCH_DEFAULTS = {"layer_scale": False, "num_registers": 0}
# Heads of the standard variants by width (ViT paper Table 1, DeiT; H/14 has width 1280).
HEADS_BY_WIDTH = {v["width"]: v["num_heads"] for v in VARIANTS.values()} | {1280: 16}
# Google's ViT checkpoints were trained on [-1, 1] inputs (vit_jax input pipeline).
GOOGLE_NORMALISATION = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
# DeiT and DINOv2 (and timm's IMAGENET_DEFAULT_MEAN/STD): ImageNet statistics.
IMAGENET_NORMALISATION = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
UNKNOWN_NORMALISATION = dict(image_mean=None, image_std=None)


def block_count(keys, pattern: str) -> int:
    indices = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    if not indices:
        return 0
    if indices != set(range(len(indices))):
        raise CheckpointError(f"encoder blocks are not numbered 0..n-1: found {sorted(indices)}")
    return len(indices)


def dense(kernel: np.ndarray, bias: np.ndarray) -> Params:
    return {"kernel": kernel, "bias": bias}


def norm(scale: np.ndarray, bias: np.ndarray) -> Params:
    return {"scale": scale, "bias": bias}


def vit_tree(embedding_kernel, embedding_bias, cls, pos_embedding, blocks, encoder_norm,
             registers: np.ndarray | None = None) -> Params:
    """The ViT's param tree; ``blocks`` is a list of per-block trees, stacked here."""
    tree = {
        "embedding_kernel": embedding_kernel, "embedding_bias": embedding_bias,
        "cls": cls.reshape(1, 1, -1), "pos_embedding": pos_embedding.reshape(1, -1, cls.size),
        "blocks": jax.tree.map(lambda *leaves: np.stack(leaves), *blocks),
        "encoder_norm": encoder_norm,
    }
    if registers is not None and registers.size:
        tree["registers"] = registers.reshape(1, -1, cls.size)
    return tree


def fold_distillation_token(distillation: np.ndarray, pos_embedding: np.ndarray
                            ) -> tuple[np.ndarray, np.ndarray]:
    """DeiT adds position row 1 to its distillation token (tokens ``[cls, dist, patches]``):
    ``(dist + pos[1], pos without row 1)``, i.e. one register token after cls, the very sum the
    reference computes."""
    register = distillation.reshape(1, 1, -1) + pos_embedding[:, 1:2]
    return register, np.concatenate([pos_embedding[:, :1], pos_embedding[:, 2:]], axis=1)


def arch_from_params(params: Params, **fields: Any) -> dict[str, Any]:
    """The architecture fields read off the converted params, plus ``fields``."""
    blocks = params["blocks"]
    arch = dict(
        patch_size=int(params["embedding_kernel"].shape[0]),
        width=int(params["embedding_kernel"].shape[-1]),
        depth=int(blocks["ln1"]["scale"].shape[0]),
        num_heads=int(blocks["attn"]["query"]["kernel"].shape[-2]),
        mlp_dim=int(blocks["mlp"]["fc1"]["kernel"].shape[-1]),
        layer_scale="ls1" in blocks,
        num_registers=int(params["registers"].shape[1]) if "registers" in params else 0,
    )
    return arch | fields


def heads_from_torch(weight: np.ndarray, bias: np.ndarray, num_heads: int) -> Params:
    """PyTorch ``Linear`` ``[heads * head_dim, width]`` -> ``DenseGeneral [width, heads, hd]``."""
    return dense(weight.T.reshape(weight.shape[1], num_heads, -1), bias.reshape(num_heads, -1))


def torch_block(get: Callable[[str], np.ndarray], num_heads: int, layer_scale: bool) -> Params:
    """One block from the PyTorch names ``ln1, q, k, v, proj, ln2, fc1, fc2`` + ``.weight/.bias``
    and, with ``layer_scale``, ``ls1.gamma``/``ls2.gamma``."""
    proj = get("proj.weight")
    block = {
        "ln1": norm(get("ln1.weight"), get("ln1.bias")),
        "attn": {
            name: heads_from_torch(get(f"{short}.weight"), get(f"{short}.bias"), num_heads)
            for name, short in (("query", "q"), ("key", "k"), ("value", "v"))
        } | {"out": dense(proj.T.reshape(num_heads, -1, proj.shape[0]), get("proj.bias"))},
        "ln2": norm(get("ln2.weight"), get("ln2.bias")),
        "mlp": {f"fc{n}": dense(get(f"fc{n}.weight").T, get(f"fc{n}.bias")) for n in (1, 2)},
    }
    if layer_scale:
        block |= {"ls1": get("ls1.gamma"), "ls2": get("ls2.gamma")}
    return block


def split_qkv(weight: np.ndarray, bias: np.ndarray) -> dict[str, np.ndarray]:
    """A fused ``qkv`` Linear (rows ``[q | k | v]``) as ``{"q.weight": ..., "v.bias": ...}``."""
    return {f"{name}.{kind}": np.split(value, 3)[n] for n, name in enumerate("qkv")
            for kind, value in (("weight", weight), ("bias", bias))}


def conv_to_hwio(weight: np.ndarray) -> np.ndarray:
    return weight.transpose(2, 3, 1, 0)  # PyTorch Conv2d [out, in, h, w] -> Flax [h, w, in, out]


def infer_heads(width: int, num_heads: int | None, source) -> int:
    if num_heads:
        return int(num_heads)
    if width not in HEADS_BY_WIDTH:
        raise CheckpointError(
            f"{source}: cannot infer the number of heads for width {width} (not a standard "
            "variant): give it, --config.model.num_heads=N for training or --num_heads N for "
            "python -m fcd_jax.convert"
        )
    return HEADS_BY_WIDTH[width]
