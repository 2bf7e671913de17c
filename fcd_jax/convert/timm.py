"""timm ``VisionTransformer`` state dicts: ViT, DeiT (``dist_token``) and DINOv2
(``vit_{small,base,large}_patch14[_reg4]_dinov2``: layer scale ``ls1/ls2.gamma``, ``reg_token``).

Keys: ``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.{i}.{norm1, attn.qkv,
attn.proj, ls1, norm2, mlp.fc1, mlp.fc2, ls2}``, ``norm``; PyTorch ``Linear`` weights
``[out, in]``, a fused ``qkv``. timm's register models are ``no_embed_class``: their
``pos_embed`` has no cls row, the cls position is already added into ``cls_token`` (timm's
``_convert_dinov2``), and the registers carry none. A timm Hub folder (``config.json`` with
``architecture`` and ``pretrained_cfg``) gives the input normalisation; a bare file gives it only
for DeiT and DINOv2, which timm trains on ImageNet statistics. Positions are resampled as timm's
``resample_abs_pos_embed`` does (bicubic, antialiased).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fcd_jax.convert import layout
from fcd_jax.convert.arrays import Arrays
from fcd_jax.errors import CheckpointError

BLOCK_NAMES = dict(ln1="norm1", proj="attn.proj", ln2="norm2", fc1="mlp.fc1", fc2="mlp.fc2",
                   ls1="ls1", ls2="ls2")
HEADS = ("head.", "head_dist.", "pre_logits.")  # classification heads, dropped


def detect(keys: set[str], config: Mapping) -> bool:
    return "patch_embed.proj.weight" in keys


def is_hub_folder(config: Mapping) -> bool:
    """timm's Hub folders: ``config.json`` with ``architecture`` and ``pretrained_cfg``."""
    return "architecture" in config and "pretrained_cfg" in config


def read_blocks(arrays: Arrays, heads: int, prefix: str = "blocks.") -> list[layout.Params]:
    """Every ``{prefix}{i}.*`` block of the timm / DINOv2 layout (layer scale if present)."""
    depth = layout.block_count(arrays.keys(), prefix.replace(".", r"\.") + r"(\d+)\.")
    layer_scale = f"{prefix}0.ls1.gamma" in arrays
    if any(k.startswith(f"{prefix}0.mlp.w12") for k in arrays.keys()):
        raise CheckpointError(f"{arrays.source}: a SwiGLU MLP (ViT-g/14, mlp.w12/w3) is not "
                              "supported: use a ViT-S/B/L checkpoint")

    def block(i: int) -> layout.Params:
        fused = layout.split_qkv(arrays.take(f"{prefix}{i}.attn.qkv.weight"),
                                 arrays.take(f"{prefix}{i}.attn.qkv.bias"))

        def get(key: str) -> np.ndarray:
            if key in fused:
                return fused[key]
            short, kind = key.split(".")
            return arrays.take(f"{prefix}{i}.{BLOCK_NAMES[short]}.{kind}")

        return layout.torch_block(get, heads, layer_scale)

    return [block(i) for i in range(depth)]


def family_and_normalisation(params: layout.Params, distilled: bool, config: Mapping
                             ) -> tuple[str, dict]:
    """DeiT if distilled; DINOv2 if patch 14 with layer scale; a plain ViT otherwise. The
    normalisation of a Hub folder's ``pretrained_cfg`` wins; else ImageNet's for DeiT and
    DINOv2, unknown (``None``) for a bare ViT file."""
    dinov2 = params["embedding_kernel"].shape[0] == 14 and "ls1" in params["blocks"]
    family = "deit" if distilled else "dinov2" if dinov2 else "vit"
    pretrained = config.get("pretrained_cfg") or {}
    if "mean" in pretrained and "std" in pretrained:
        return family, dict(image_mean=list(pretrained["mean"]), image_std=list(pretrained["std"]))
    if family != "vit":
        return family, layout.IMAGENET_NORMALISATION
    return family, layout.UNKNOWN_NORMALISATION


def convert(arrays: Arrays, config: Mapping, options) -> tuple[layout.Params, dict]:
    cls = arrays.take("cls_token")
    heads = layout.infer_heads(cls.size, options.num_heads, arrays.source)
    pos = arrays.take("pos_embed")
    registers = arrays.take_if_present("reg_token")
    distillation = arrays.take_if_present("dist_token")
    if distillation is not None:
        if registers is not None:
            raise CheckpointError(f"{arrays.source}: both a distillation token and register "
                                  "tokens: not a timm model fcd_jax knows")
        registers, pos = layout.fold_distillation_token(distillation, pos)
    params = layout.vit_tree(
        layout.conv_to_hwio(arrays.take("patch_embed.proj.weight")),
        arrays.take("patch_embed.proj.bias"), cls, pos, read_blocks(arrays, heads),
        layout.norm(arrays.take("norm.weight"), arrays.take("norm.bias")), registers,
    )
    arrays.check_all_used(lambda k: k.startswith(HEADS))
    family, normalisation = family_and_normalisation(params, distillation is not None, config)
    arch = layout.arch_from_params(
        params, layernorm_eps=1e-6, gelu_approximate=False, family=family,
        pos_interpolation="bicubic_antialias", **normalisation)
    return params, arch
