"""The frozen teacher, and the config reconciled with its spec before anything is built or recorded.

A teacher is a converted pretrained checkpoint (``fcd_jax.convert``) or, for demos and tests, a
random ViT. Its spec is what its weights fix: the architecture, the LayerNorm epsilon, the GELU
form, and the image normalisation it was trained with (``arch.json``'s ``image_mean`` and
``image_std``). :func:`reconcile` writes the spec into the config: the architecture must match
``config.model``; ``model.layernorm_eps``, ``model.gelu_approximate``, ``data.mean`` and
``data.std`` left unset (None, the default) take the checkpoint's values; a value set
explicitly is kept, with a warning where it differs from the checkpoint's. A random teacher (or
a checkpoint that does not record a value) gives Google's ViT values: eps 1e-6, exact GELU,
mean 0.5, std 0.5. The reconciled config is the one recorded in the workdir and the one that runs.

A CNN backbone (``model.backbone``, METHOD.md "The paper's ablations") takes a converted
torchvision VGG16 / ResNet18 of the same family, or a random one; its normalisation is
torchvision's ImageNet mean and std (a random CNN teacher too), and the ViT-only fields take their
defaults silently. Its params are the teacher's Flax variables (``networks.init_model``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from fcd_jax import convert
from fcd_jax.convert_torchvision import IMAGENET_NORMALISATION
from fcd_jax.errors import CheckpointError, ConfigError, FcdError
from fcd_jax.models import build_vit, init_params
from fcd_jax.networks import TEACHER_SPEC_FIELDS, build_networks, get_field, split_keys

HOW_TO_GET_A_TEACHER = (
    "no teacher checkpoint: this config needs an ImageNet-pretrained ViT. Download Google's "
    "ViT-B_16.npz (gs://vit_models/imagenet21k+imagenet2012/ViT-B_16.npz or an augreg "
    "checkpoint), timm's vit_base_patch16_224 (.safetensors) or HuggingFace's "
    "google/vit-base-patch16-224 directory, then pass --config.teacher.checkpoint=PATH "
    "(converted once and cached; `python -m fcd_jax.convert SRC DST` converts ahead of time)"
)
HOW_TO_GET_A_CNN_TEACHER = (
    "no teacher checkpoint: model.backbone={backbone!r} needs torchvision's ImageNet {backbone} "
    "weights ({backbone}-*.pth from download.pytorch.org/models): convert them once with "
    "`python -m fcd_jax.convert {backbone}.pth teachers/{backbone}` and pass "
    "--config.teacher.checkpoint=teachers/{backbone}"
)
ARCH_FIELDS = (
    "patch_size", "width", "depth", "num_heads", "mlp_dim", "layer_scale", "num_registers",
)
RANDOM_TEACHER_WARNING = (
    "the teacher is RANDOM (teacher.init='random'): this run proves the machinery only, its "
    "numbers are not comparable to the paper"
)
# Each spec field: the arch.json key that records it, and its value where nothing records it.
SPEC_SOURCES = dict(zip(TEACHER_SPEC_FIELDS, (
    ("layernorm_eps", 1e-6), ("gelu_approximate", False), ("image_mean", 0.5),
    ("image_std", 0.5),
), strict=True))
# A CNN's: torchvision's ImageNet normalisation, what its pretrained weights were trained with.
CNN_SPEC_FALLBACKS = {"data.mean": IMAGENET_NORMALISATION["image_mean"],
                      "data.std": IMAGENET_NORMALISATION["image_std"]}


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A loaded teacher and the run's config reconciled with it."""

    config: ml_collections.ConfigDict  # what runs and is recorded (see the module docstring)
    params: dict  # full-depth parameters on the host (``Networks.teacher_params`` cuts them)
    is_random: bool


def load_teacher(config: ml_collections.ConfigDict, workdir: str) -> Teacher:
    """The teacher of ``config.teacher`` (a random one is logged as such) and the config
    reconciled with its spec (the caller's config is not changed)."""
    teacher = config.teacher
    if teacher.init == "random":
        logging.warning(RANDOM_TEACHER_WARNING)
        config = reconcile(config, None)
        teacher_key, _ = split_keys(config.seed)
        if is_cnn_config(config):
            params = build_networks(config).init_teacher(config.data.image_size, teacher_key)
        else:
            params = init_params(build_vit(config.model), config.data.image_size, teacher_key)
        return Teacher(config, jax.tree.map(np.asarray, jax.device_get(params)), True)
    if teacher.init != "pretrained":
        raise FcdError(f"unknown teacher.init {teacher.init!r}: use 'pretrained' or 'random'")
    if not teacher.checkpoint:
        if is_cnn_config(config):
            raise FcdError(HOW_TO_GET_A_CNN_TEACHER.format(backbone=config.model.backbone))
        raise FcdError(HOW_TO_GET_A_TEACHER)
    cache_dir = teacher.cache_dir or os.path.join(workdir, "teacher")
    params, arch = convert.load_teacher(teacher.checkpoint, cache_dir, config.data.image_size,
                                        num_heads=config.model.num_heads or None)
    logging.info("teacher %s: %s", teacher.checkpoint, arch)
    return Teacher(reconcile(config, arch, teacher.checkpoint), params, False)


def reconcile(
    config: ml_collections.ConfigDict, arch: Mapping[str, Any] | None, source: str = ""
) -> ml_collections.ConfigDict:
    """A copy of ``config`` with the teacher's spec filled in (see the module docstring).

    ``arch``: the checkpoint's ``arch.json`` (``fcd_jax.convert``), None for a random teacher;
    ``source`` names the checkpoint in messages.
    """
    config = config.copy_and_resolve_references()
    cnn = is_cnn_config(config)
    if arch is not None:
        check_family(config, arch, source)
    if arch is not None and not cnn:
        model = build_vit(config.model)
        for field in ARCH_FIELDS:
            # layer_scale / num_registers: absent from arch.json files written before them.
            if int(arch.get(field, 0)) != int(getattr(model, field)):
                raise CheckpointError(
                    f"teacher checkpoint {source} has {field}={arch.get(field, 0)} but the model "
                    f"{config.model.variant} has {getattr(model, field)}: set "
                    "--config.model.variant (and model.layer_scale / model.num_registers) to "
                    "the checkpoint's, e.g. configs/X.py:teacher=dinov2_b14"
                )
    for field, (key, fallback) in SPEC_SOURCES.items():
        own = None if arch is None else arch.get(key)
        if cnn:
            fallback = CNN_SPEC_FALLBACKS.get(field, fallback)
        if own is None:
            if arch is not None and get_field(config, field) is None and not cnn:
                logging.warning("teacher checkpoint %s does not record %s: using %r (set "
                                "--config.%s if it was trained otherwise)", source, key,
                                fallback, field)
            own = fallback
        own = _spec_value(field, own)
        chosen = get_field(config, field)
        if chosen is None:
            chosen = own
        else:
            chosen = _spec_value(field, chosen)
            if arch is not None and not np.allclose(chosen, own, rtol=1e-6, atol=0):
                logging.warning("--config.%s=%r overrides the teacher checkpoint's %r (%s)",
                                field, chosen, own, source)
        section, name = field.split(".")
        with config.ignore_type():  # e.g. [0.5, 0.5, 0.5] given, 0.5 recorded
            config[section][name] = chosen
    return config


def is_cnn_config(config: ml_collections.ConfigDict) -> bool:
    """Whether ``config.model.backbone`` is a CNN (METHOD.md "The paper's ablations")."""
    return config.model.get("backbone", "vit") != "vit"


def check_family(config: ml_collections.ConfigDict, arch: Mapping[str, Any], source: str) -> None:
    """One ``CheckpointError`` if the checkpoint is not a teacher of ``model.backbone``."""
    backbone = config.model.get("backbone", "vit")
    family = arch.get("family") if convert.is_cnn(arch) else "vit"
    if family != backbone:
        raise CheckpointError(
            f"teacher checkpoint {source} is a {family} but config.model.backbone={backbone!r}: "
            f"set --config.model.backbone={family!r} or give a {backbone} checkpoint"
        )


def _spec_value(field: str, value: Any) -> Any:
    """``value`` as the config holds it: eps a float, GELU a bool, a normalisation a float, or
    three floats (one per RGB channel) where they differ; a bad one is one ``ConfigError``."""
    if field == "model.layernorm_eps":
        return float(value)
    if field == "model.gelu_approximate":
        return bool(value)
    channels = np.asarray(value, np.float64).reshape(-1)
    if channels.size not in (1, 3) or (field == "data.std" and not np.all(channels > 0)):
        raise ConfigError(
            f"{field}={value!r}: give one number or one per RGB channel"
            + (", all positive" if field == "data.std" else "")
            + " (or leave it unset for the teacher's own)"
        )
    if np.all(channels == channels[0]):
        return float(channels[0])
    return tuple(float(channel) for channel in channels)
