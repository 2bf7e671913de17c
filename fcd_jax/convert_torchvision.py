"""Teacher checkpoints for the CNN ablations: torchvision VGG16 / ResNet18 state dicts -> Flax.

METHOD.md "The paper's ablations": the CNN teachers are torchvision's ImageNet VGG16 (no batch
norm) and ResNet18. :func:`detect` recognises their state dicts by keys and shapes, and
:func:`convert` maps them onto ``fcd_jax.models.vgg`` / ``fcd_jax.models.resnet``:

- conv ``weight [out, in, h, w]`` -> ``kernel [h, w, in, out]``; conv ``bias`` -> ``bias``;
- batch norm ``weight, bias`` -> ``params`` ``scale, bias``; ``running_mean, running_var`` ->
  ``batch_stats`` ``mean, var``; ``num_batches_tracked`` is dropped;
- VGG16 ``features.{i}`` -> ``conv{block}_{index}``; ResNet18 ``layer{i}.{j}`` -> ``layer{i}_{j}``,
  ``downsample.{k}`` -> ``downsample_{k}``;
- the classifiers (VGG16 ``classifier.*``, ResNet18 ``fc.*``) are read and dropped.

The result is Flax variables: ``{"params"}`` for VGG16, ``{"params", "batch_stats"}`` for ResNet18
(numpy float32), and an ``arch`` dict ``{"family", "format", "image_mean", "image_std", ...}``
(torchvision's ImageNet normalisation). :func:`convert_file` reads ``.safetensors`` and ``.pth``
(only through ``torch.load(weights_only=True)``) with the ViT converter's reader, and
``fcd_jax.convert.save_converted`` writes the result in the same orbax + ``arch.json`` form.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np

# The ViT converter's file reader and writer (one of each for every backbone).
from fcd_jax.convert.arrays import file_sha256, read_arrays
from fcd_jax.convert.stored import save_converted
from fcd_jax.errors import CheckpointError
from fcd_jax.models.resnet import BLOCKS_PER_STAGE, ResNet18
from fcd_jax.models.vgg import POOL, VGG16_WIDTHS, conv_names, vgg16_teacher

Variables = dict[str, Any]

# torchvision's ImageNet weights were trained on inputs normalised with these (torchvision docs).
IMAGENET_NORMALISATION = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
FAMILIES = ("vgg16", "resnet18")
CLASSIFIER_PREFIXES = {"vgg16": ("classifier.",), "resnet18": ("fc.",)}
# Flax leaf name -> torch tensor name.
LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
              "var": "running_var"}


def _vgg16_feature_indices() -> dict[str, int]:
    """``conv1_1 -> 0, conv1_2 -> 2, conv2_1 -> 5, ...``: each conv's index in torchvision's
    ``features`` Sequential, where a conv is followed by its ReLU and a pool takes one slot."""
    indices, position = [], 0
    for width in VGG16_WIDTHS:
        if width != POOL:
            indices.append(position)
        position += 1 if width == POOL else 2
    return dict(zip(conv_names(VGG16_WIDTHS), indices, strict=True))


VGG16_FEATURE_INDEX = _vgg16_feature_indices()


def teacher_model(arch: Mapping[str, Any], dtype: Any = np.float32) -> nn.Module:
    """The Flax teacher that ``arch["family"]`` names."""
    family = arch.get("family")
    if family == "vgg16":
        return vgg16_teacher(dtype)
    if family == "resnet18":
        return ResNet18(dtype)
    raise CheckpointError(f"unknown CNN family {family!r}: expected one of {', '.join(FAMILIES)}")


@functools.lru_cache(maxsize=4)
def _variable_shapes(family: str) -> Variables:
    images = jax.ShapeDtypeStruct((1, 64, 64, 3), np.float32)  # shapes do not depend on the size
    return jax.eval_shape(teacher_model({"family": family}).init, jax.random.key(0), images)


def variable_shapes(arch: Mapping[str, Any]) -> Variables:
    """``jax.eval_shape`` of the teacher's variables (``params`` and, for ResNet18,
    ``batch_stats``); also what a converted folder's contents must fit."""
    return _variable_shapes(arch.get("family"))


def _torch_module(family: str, module_path: tuple[str, ...]) -> str:
    if family == "vgg16":
        (name,) = module_path
        return f"features.{VGG16_FEATURE_INDEX[name]}"
    return ".".join(re.sub(r"_(\d+)$", r".\1", part) for part in module_path)


def torch_key(family: str, path: tuple[str, ...]) -> str:
    """The torchvision state-dict key of the Flax variable at ``(collection, *modules, leaf)``."""
    *modules, leaf = path[1:]
    return f"{_torch_module(family, tuple(modules))}.{LEAF_NAMES[leaf]}"


def _torch_blocks(keys: set[str], stage: int) -> list[int]:
    return sorted({int(m.group(1)) for k in keys if (m := re.match(rf"layer{stage}\.(\d+)\.", k))})


def is_cnn(arch: Mapping[str, Any]) -> bool:
    """Whether ``arch`` (an ``arch.json``) describes one of these CNN teachers, not a ViT."""
    return arch.get("family") in FAMILIES


def looks_like(keys: set[str]) -> bool:
    """Whether state-dict keys are a torchvision VGG's or ResNet's (:func:`detect` decides which
    and whether it is VGG16 / ResNet18)."""
    return "features.0.weight" in keys or {"conv1.weight", "layer1.0.conv1.weight"} <= keys


def detect(state_dict: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``arch`` of a torchvision VGG16 or ResNet18 state dict, ``None`` if it is neither kind
    of network; a VGG or ResNet of another depth (or VGG with batch norm) is one clear error."""
    keys = set(state_dict)
    if not looks_like(keys):
        return None
    if "features.0.weight" in keys:
        if any(k.startswith("features.") and k.endswith("running_mean") for k in keys):
            raise CheckpointError("this is a torchvision VGG with batch norm (vgg*_bn): the VGG "
                                  "teacher is torchvision's vgg16 without batch norm")
        convs = sorted(int(m.group(1)) for k in keys
                       if (m := re.fullmatch(r"features\.(\d+)\.weight", k))
                       and np.ndim(state_dict[k]) == 4)
        if convs != sorted(VGG16_FEATURE_INDEX.values()):
            raise CheckpointError(f"this torchvision VGG has {len(convs)} convolutions at other "
                                  "places than VGG16's 13: use torchvision's vgg16 weights")
        family = "vgg16"
    else:
        blocks = tuple(len(_torch_blocks(keys, stage)) for stage in range(1, 5))
        if blocks != BLOCKS_PER_STAGE or "layer1.0.conv3.weight" in keys:
            kind = "bottleneck" if "layer1.0.conv3.weight" in keys else "basic"
            raise CheckpointError(f"this torchvision ResNet has {blocks} {kind} blocks per stage; "
                                  f"ResNet18 has {BLOCKS_PER_STAGE} basic blocks: use resnet18 "
                                  "weights")
        family = "resnet18"
    return dict(family=family, format="torchvision", **IMAGENET_NORMALISATION)


def _is_dropped(family: str, key: str) -> bool:
    return key.startswith(CLASSIFIER_PREFIXES[family]) or key.endswith(".num_batches_tracked")


def convert(state_dict: Mapping[str, Any], arch: Mapping[str, Any]) -> Variables:
    """Flax variables (numpy float32) of the teacher ``arch`` from a torchvision state dict.

    Every variable must be present with its shape, and nothing but the classifier and
    ``num_batches_tracked`` may be left over; otherwise one clear :class:`CheckpointError`.
    """
    family = arch["family"]
    shapes = variable_shapes(arch)
    used: set[str] = set()

    def take(path: tuple[Any, ...], expected: jax.ShapeDtypeStruct) -> np.ndarray:
        names = tuple(str(getattr(entry, "key", entry)) for entry in path)
        key = torch_key(family, names)
        if key not in state_dict:
            raise CheckpointError(f"the state dict has no {key!r}: not a complete torchvision "
                                  f"{family} (a truncated or edited file?)")
        value = np.asarray(state_dict[key], np.float32)
        if value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)  # [out, in, h, w] -> [h, w, in, out]
        if value.shape != expected.shape:
            raise CheckpointError(f"{key} has shape {np.shape(state_dict[key])}, which does not "
                                  f"fit torchvision's {family}: another variant of the network?")
        used.add(key)
        return value

    variables = jax.tree_util.tree_map_with_path(take, shapes)
    left = sorted(k for k in state_dict if k not in used and not _is_dropped(family, k))
    if left:
        raise CheckpointError(f"the state dict has weights {family} has no place for: "
                              f"{', '.join(left[:3])}{' ...' if len(left) > 3 else ''}")
    return variables


def convert_state_dict(state_dict: Mapping[str, Any], source: Path) -> tuple[Variables, dict]:
    """:func:`detect` then :func:`convert`; any problem is one :class:`CheckpointError` naming
    ``source`` (what ``fcd_jax.convert.FORMATS``'s ``torchvision`` row runs)."""
    try:
        arch = detect(state_dict)
        if arch is None:
            raise CheckpointError(f"not a torchvision VGG16 or ResNet18 (first keys: "
                                  f"{', '.join(sorted(state_dict)[:3])})")
        return convert(state_dict, arch), arch
    except CheckpointError as error:
        raise CheckpointError(f"{source}: {error}") from None


def convert_file(path: str | os.PathLike) -> tuple[Variables, dict[str, Any]]:
    """Reads a torchvision ``.safetensors`` / ``.pth`` file into ``(variables, arch)``; ``arch``
    also records ``source`` and ``source_sha256``. Any problem is one :class:`CheckpointError`."""
    path = Path(path)
    variables, arch = convert_state_dict(read_arrays(path), path)
    arch |= dict(source=str(path.resolve()), source_sha256=file_sha256(path))
    return variables, arch


def convert_and_save(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """:func:`convert_file` then ``fcd_jax.convert.save_converted``: ``dst/params`` (orbax,
    holding the variables) and ``dst/arch.json``, all or nothing."""
    return save_converted(dst, *convert_file(src))
