"""Model definitions: one small file per model, and :func:`load_pretrained` for every backbone."""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax

from fcd_jax.models.vit import (
    VARIANTS,
    ViT,
    build_vit,
    init_params,
    init_variables,
    parse_variant,
    truncate_params,
)

__all__ = ["VARIANTS", "ViT", "build_vit", "init_params", "init_variables", "is_cnn_model",
           "load_pretrained", "model_outputs", "parse_variant", "truncate_params"]


def load_pretrained(path: str | os.PathLike, *, image_size: int | None = None
                    ) -> tuple[nn.Module, dict[str, Any]]:
    """``(model, variables)`` of a pretrained backbone: a ViT checkpoint of any supported family,
    a torchvision VGG16 / ResNet18 ``.pth`` / ``.safetensors``, or a folder written by
    ``python -m fcd_jax.convert``. ``model.apply(variables, images)`` on NHWC float32 images,
    already normalised (``arch.json``'s ``image_mean`` / ``image_std``), gives
    ``{"blocks", "encoded"}`` for a ViT and ``{"taps"}`` for a CNN. ``image_size``: resample a
    ViT's position grid to it (default: the checkpoint's own; CNNs take any size)."""
    from fcd_jax import convert  # the converters (and torch, for .pth) only when called

    return convert.load_pretrained(path, image_size=image_size)


def is_cnn_model(model: nn.Module) -> bool:
    """Whether ``model`` is one of the CNNs (``{"taps"}``), not the ViT (``{"blocks"}``)."""
    return not isinstance(model, ViT)


def model_outputs(model: nn.Module, params: dict, images: jax.Array) -> dict:
    """``model`` on normalised NHWC images in inference mode (a CNN's batch norm on its running
    statistics): ``{"blocks", "encoded"}`` for a ViT, ``{"taps"}`` for a CNN."""
    if is_cnn_model(model):
        return model.apply(params, images.astype(model.dtype), train=False)
    return model.apply({"params": params}, images.astype(model.dtype))
