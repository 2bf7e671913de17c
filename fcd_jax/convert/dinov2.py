"""The original DINOv2 release: facebookresearch/dinov2 ``dinov2_vit{s,b,l}14[_reg4]_pretrain.pth``.

timm's key names (``patch_embed.proj``, ``blocks.{i}.{norm1, attn.qkv, attn.proj, ls1.gamma,
norm2, mlp.fc1, mlp.fc2, ls2.gamma}``, ``norm``, ``cls_token``, ``pos_embed`` with the cls row)
plus ``mask_token`` (iBOT's masked-patch token, unused at inference: dropped) and, for the
register models, ``register_tokens`` placed after cls, without position embedding. FSDP-chunked
files (``blocks.{chunk}.{i}.``) are read too. Inputs: ImageNet mean/std. Positions are resampled
as ``DinoVisionTransformer.interpolate_pos_encoding`` does with the hub's settings: bicubic by
the scale factor (new + 0.1) / 37 for the original models, antialiased bicubic by the size for
the register models (``interpolate_antialias=True, interpolate_offset=0``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from fcd_jax.convert import layout, timm
from fcd_jax.convert.arrays import Arrays

CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")


def detect(keys: set[str], config: Mapping) -> bool:
    return "patch_embed.proj.weight" in keys and bool({"mask_token", "register_tokens"} & keys)


def convert(arrays: Arrays, config: Mapping, options) -> tuple[layout.Params, dict]:
    arrays = Arrays({CHUNKED_BLOCK.sub(r"blocks.\1.", k): v for k, v in arrays.arrays.items()},
                    arrays.source, arrays.layout)
    cls = arrays.take("cls_token")
    heads = layout.infer_heads(cls.size, options.num_heads, arrays.source)
    registers = arrays.take_if_present("register_tokens")
    params = layout.vit_tree(
        layout.conv_to_hwio(arrays.take("patch_embed.proj.weight")),
        arrays.take("patch_embed.proj.bias"), cls, arrays.take("pos_embed"),
        timm.read_blocks(arrays, heads),
        layout.norm(arrays.take("norm.weight"), arrays.take("norm.bias")), registers,
    )
    arrays.check_all_used(lambda k: k == "mask_token")
    interpolation = "bicubic_dino_offset" if registers is None else "bicubic_antialias"
    arch = layout.arch_from_params(
        params, layernorm_eps=1e-6, gelu_approximate=False, family="dinov2",
        pos_interpolation=interpolation, **layout.IMAGENET_NORMALISATION)
    return params, arch
