"""Teacher checkpoints: read pretrained ViT weights of any supported family into our param tree.

METHOD.md "Networks": the teacher is a pretrained ViT. Supported (one module each):

- ``google``: Google ``.npz`` (vit_jax, AugReg, big_vision);
- ``dinov2``: the original DINOv2 ``.pth`` release (with or without registers);
- ``timm``: timm ``VisionTransformer`` state dicts: ViT, DeiT (distilled too), DINOv2
  (``vit_*_patch14[_reg4]_dinov2``), as a file or a timm Hub folder;
- ``huggingface``: HuggingFace ``ViTModel``, ``DeiTModel``, ``Dinov2Model``,
  ``Dinov2WithRegistersModel`` folders (``config.json`` + weights) or bare weights files;
- ``torchvision``: the CNN teachers of the paper's ablations, torchvision VGG16 / ResNet18 state
  dicts (``fcd_jax.convert_torchvision``; Flax variables instead of ViT params, any image size).

``.pth``/``.bin`` only through ``torch.load(weights_only=True)``, ``.npz`` without pickles.
Every converter returns ``(params, arch)``: ``params`` the tree of ``fcd_jax.models.vit.ViT``
(numpy float32; heads dropped; the position grid resampled to the image size as the family's own
code does) and ``arch`` the JSON-able record described in ``layout``, whose ``ARCH_FIELDS`` go
straight to ``build_vit``. :data:`FORMATS` is the ordered table of (name, detector, converter)
that :func:`convert_checkpoint` tries; another family plugs in as one more row. Converted
teachers are stored as an orbax checkpoint plus ``arch.json`` (``save_converted``) and cached by
:func:`load_teacher`, so a run converts once.

CLI: ``python -m fcd_jax.convert SRC DST [--image_size 224] [--num_heads N]``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn

from fcd_jax.convert import dinov2, google, huggingface, timm
from fcd_jax.convert.arrays import Arrays, file_sha256, one_line, read_arrays
from fcd_jax.convert.layout import ARCH_FIELDS, Params
from fcd_jax.convert.positions import fit_image_size, interpolate_pos_embedding
from fcd_jax.convert.stored import (
    arch_fields,
    cache_key,
    check_params,
    count_params,
    is_cnn,
    is_converted,
    load_converted,
    param_shapes,
    save_converted,
)
from fcd_jax.errors import CheckpointError
from fcd_jax.models.vit import ViT

__all__ = ["ARCH_FIELDS", "FORMATS", "Format", "Options", "check_params", "convert_checkpoint",
           "count_params", "interpolate_pos_embedding", "is_converted", "load_converted",
           "load_pretrained", "load_teacher", "param_shapes", "save_converted"]


@dataclasses.dataclass(frozen=True)
class Options:
    """What a file cannot say: ``image_size`` (resample the positions to it; None: the
    checkpoint's own), ``num_heads`` (timm files of a non-standard width), ``gelu_approximate``
    (Google ``.npz``: vit_jax's Flax code uses the tanh GELU; default exact)."""

    image_size: int | None = None
    num_heads: int | None = None
    gelu_approximate: bool | None = None


class Format(NamedTuple):
    """``detect(keys, folder_config)`` says whether the arrays are this format;
    ``convert(arrays, folder_config, options)`` returns ``(params, arch)``."""

    name: str
    detect: Callable[[set[str], Mapping], bool]
    convert: Callable[[Arrays, Mapping, Options], tuple[Params, dict]]


def _vit(read: Callable[[Arrays, Mapping, Options], tuple[Params, dict]]):
    """A ViT converter: the family's reading, then the position grid for ``options.image_size``
    and a check against the ViT that ``arch`` describes."""
    def convert(arrays: Arrays, config: Mapping, options: Options) -> tuple[Params, dict]:
        params, arch = read(arrays, config, options)
        params, arch = fit_image_size(params, arch, options.image_size)
        check_params(params, param_shapes(arch))
        return params, arch
    return convert


def _torchvision_detect(keys: set[str], config: Mapping) -> bool:
    from fcd_jax import convert_torchvision  # imports this package: lazily

    return convert_torchvision.looks_like(keys)


def _torchvision_convert(arrays: Arrays, config: Mapping, options: Options) -> tuple[Params, dict]:
    """A CNN teacher's Flax variables and arch; ``options`` do not apply (no position grid)."""
    from fcd_jax import convert_torchvision

    return convert_torchvision.convert_state_dict(arrays.arrays, arrays.source)


# Tried in order: the first whose detector accepts the file converts it (DINOv2's release before
# timm: the same key names plus mask/register tokens).
FORMATS: list[Format] = [
    Format("google", google.detect, _vit(google.convert)),
    Format("dinov2", dinov2.detect, _vit(dinov2.convert)),
    Format("timm", timm.detect, _vit(timm.convert)),
    Format("huggingface", huggingface.detect, _vit(huggingface.convert)),
    Format("torchvision", _torchvision_detect, _torchvision_convert),
]


def convert_checkpoint(path: str | os.PathLike, *, image_size: int | None = None,
                       num_heads: int | None = None, gelu_approximate: bool | None = None
                       ) -> tuple[Params, dict]:
    """Reads any supported checkpoint (format detected from its keys; see :data:`FORMATS`) into
    ``(params, arch)``; see :class:`Options` for the keyword arguments."""
    path = Path(path)
    if is_converted(path):
        params, arch = load_converted(path)
        return (params, arch) if is_cnn(arch) else fit_image_size(params, arch, image_size)
    config: dict[str, Any] = {}
    weights = path
    if path.is_dir():
        weights, config = huggingface.read_folder(path)
    raw = read_arrays(weights)
    keys = set(raw)
    found = next((f for f in FORMATS if f.detect(keys, config)), None)
    if found is None:
        raise CheckpointError(
            f"{weights}: unknown checkpoint layout (first keys: {', '.join(sorted(raw)[:3])}); "
            f"expected one of: {', '.join(f.name for f in FORMATS)}"
        )
    options = Options(image_size, num_heads, gelu_approximate)
    try:
        params, arch = found.convert(Arrays(raw, weights, found.name), config, options)
    except (ValueError, IndexError) as error:  # reshapes of inconsistent shapes
        raise CheckpointError(f"{weights} ({found.name} layout) has inconsistent shapes: "
                              f"{one_line(error)}") from error
    arch |= dict(format=found.name, source=str(path.resolve()), source_sha256=file_sha256(weights))
    return params, arch


def load_pretrained(path: str | os.PathLike, *, image_size: int | None = None
                    ) -> tuple[nn.Module, dict[str, Any]]:
    """``(model, variables)`` of any supported checkpoint or converted folder, ViT or CNN:
    ``model.apply(variables, images)`` (NHWC float32, already normalised as ``arch.json`` says)
    gives ``{"blocks", "encoded"}`` for a ViT and ``{"taps"}`` for a CNN teacher."""
    params, arch = convert_checkpoint(path, image_size=image_size)
    if is_cnn(arch):
        from fcd_jax.convert_torchvision import teacher_model

        return teacher_model(arch), params
    return ViT(**arch_fields(arch)), {"params": params}


def load_teacher(checkpoint: str | os.PathLike, cache_dir: str | os.PathLike,
                 image_size: int | None, *, num_heads: int | None = None) -> tuple[Params, dict]:
    """Teacher ``(params, arch)`` at ``image_size``: a converted folder is used as is (position
    embedding resampled in memory if needed); anything else is converted once and cached under
    ``cache_dir`` (see ``stored.cache_key``)."""
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise CheckpointError(f"teacher checkpoint {checkpoint} does not exist "
                              "(config.teacher.checkpoint)")
    if is_converted(checkpoint):
        return convert_checkpoint(checkpoint, image_size=image_size)
    cached = Path(cache_dir) / cache_key(checkpoint, image_size)
    if is_converted(cached):
        return load_converted(cached)
    params, arch = convert_checkpoint(checkpoint, image_size=image_size, num_heads=num_heads)
    save_converted(cached, params, arch)
    return params, arch
