"""The frozen teacher: a converted pretrained checkpoint, or a random one for demos and tests."""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np
from absl import logging

from fcd_jax import convert
from fcd_jax.errors import CheckpointError, FcdError
from fcd_jax.models import build_vit, init_params

HOW_TO_GET_A_TEACHER = (
    "no teacher checkpoint: this config needs an ImageNet-pretrained ViT. Download Google's "
    "ViT-B_16.npz (gs://vit_models/imagenet21k+imagenet2012/ViT-B_16.npz or an augreg "
    "checkpoint), timm's vit_base_patch16_224 (.safetensors) or HuggingFace's "
    "google/vit-base-patch16-224 directory, then pass --config.teacher.checkpoint=PATH "
    "(converted once and cached; `python -m fcd_jax.convert SRC DST` converts ahead of time)"
)
ARCH_FIELDS = ("patch_size", "width", "depth", "num_heads", "mlp_dim")
RANDOM_TEACHER_WARNING = (
    "the teacher is RANDOM (teacher.init='random'): this run proves the machinery only, its "
    "numbers are not comparable to the paper"
)


def load_teacher(
    config: ml_collections.ConfigDict, workdir: str, key: jax.Array
) -> tuple[dict, bool]:
    """(teacher parameters on the host, whether they are random; a random one is logged as such).

    A converted checkpoint fixes the architecture, the LayerNorm epsilon and the GELU form: those
    are written into ``config.model`` so that teacher and student match the checkpoint.
    """
    teacher = config.teacher
    model = build_vit(config.model)
    if teacher.init == "random":
        logging.warning(RANDOM_TEACHER_WARNING)
        params = init_params(model, config.data.image_size, key)
        return jax.tree.map(np.asarray, jax.device_get(params)), True
    if teacher.init != "pretrained":
        raise FcdError(f"unknown teacher.init {teacher.init!r}: use 'pretrained' or 'random'")
    if not teacher.checkpoint:
        raise FcdError(HOW_TO_GET_A_TEACHER)
    cache_dir = teacher.cache_dir or os.path.join(workdir, "teacher")
    params, arch = convert.load_teacher(teacher.checkpoint, cache_dir, config.data.image_size)
    for field in ARCH_FIELDS:
        if int(arch[field]) != int(getattr(model, field)):
            raise CheckpointError(
                f"teacher checkpoint {teacher.checkpoint} has {field}={arch[field]} but the model "
                f"{config.model.variant} has {getattr(model, field)}: set --config.model.variant "
                "to the checkpoint's variant"
            )
    with config.unlocked():
        config.model.layernorm_eps = float(arch["layernorm_eps"])
        config.model.gelu_approximate = bool(arch["gelu_approximate"])
    logging.info("teacher %s: %s", teacher.checkpoint, arch)
    return params, False
