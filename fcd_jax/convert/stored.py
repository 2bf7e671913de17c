"""Converted teachers on disk (an orbax ``params/`` checkpoint + ``arch.json``) and the checks
that params fit the ViT their ``arch`` describes."""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from fcd_jax.convert.arrays import one_line
from fcd_jax.convert.layout import ARCH_DEFAULTS, ARCH_FIELDS, Params
from fcd_jax.errors import CheckpointError
from fcd_jax.models.vit import ViT

ARCH_FILE = "arch.json"
PARAMS_DIR = "params"
# Bumped when a conversion's result changes (2: layer scale, registers, per-family resampling),
# so that teachers cached by an older version are converted again.
CONVERSION_VERSION = 2


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flat(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def arch_fields(arch: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`ARCH_FIELDS` of ``arch`` (defaults for those older ``arch.json`` lack)."""
    return {field: arch.get(field, ARCH_DEFAULTS.get(field)) for field in ARCH_FIELDS}


def param_shapes(arch: Mapping[str, Any], image_size: int | None = None) -> Params:
    """``jax.eval_shape`` of the ViT that ``arch`` describes (no memory allocated)."""
    return _param_shapes(tuple(arch_fields(arch).values()), image_size or arch["image_size"])


@functools.lru_cache(maxsize=16)
def _param_shapes(fields: tuple, image_size: int) -> Params:
    model = ViT(**dict(zip(ARCH_FIELDS, fields, strict=True)))
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), np.float32)
    return jax.eval_shape(model.init, jax.random.key(0), images)["params"]


def is_cnn(arch: Mapping[str, Any]) -> bool:
    """Whether ``arch`` is a torchvision CNN teacher's (``fcd_jax.convert_torchvision``)."""
    from fcd_jax import convert_torchvision  # imports this module: lazily

    return convert_torchvision.is_cnn(arch)


def check_params(params: Params, expected_shapes: Params) -> None:
    """Raises one-line CheckpointError on the first missing or extra key, or wrong shape."""
    got, want = _flat(params), _flat(expected_shapes)
    missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
    if missing or extra:
        parts = [f"missing {', '.join(missing[:3])}" if missing else "",
                 f"unexpected {', '.join(extra[:3])}" if extra else ""]
        raise CheckpointError(
            "checkpoint does not fit the model: " + "; ".join(p for p in parts if p))
    for key in sorted(want):
        if tuple(np.shape(got[key])) != tuple(want[key].shape):
            raise CheckpointError(
                f"checkpoint does not fit the model: {key} has shape {tuple(np.shape(got[key]))} "
                f"but the model expects {tuple(want[key].shape)} (another ViT variant, patch size "
                "or image size?)"
            )


def is_converted(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / ARCH_FILE).is_file() and (path / PARAMS_DIR).is_dir()


def save_converted(directory: str | os.PathLike, params: Params, arch: Mapping[str, Any]) -> Path:
    """Writes ``directory/params`` (orbax) and ``directory/arch.json``; all or nothing."""
    import orbax.checkpoint as ocp

    directory = Path(directory).resolve()
    if directory.exists() and any(directory.iterdir()):
        raise CheckpointError(f"{directory} already exists and is not empty: choose another place")
    partial = directory.with_name(f".{directory.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(partial / PARAMS_DIR, jax.tree.map(np.asarray, params))
        checkpointer.wait_until_finished()
        checkpointer.close()
        (partial / ARCH_FILE).write_text(json.dumps(dict(arch), indent=2) + "\n")
        if directory.exists():
            directory.rmdir()
        os.replace(partial, directory)
    except OSError:
        if not is_converted(directory):  # lost a race against another writer: theirs is as good
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return directory


def load_converted(directory: str | os.PathLike) -> tuple[Params, dict]:
    """Reads what :func:`save_converted` wrote: ``(params as numpy float32, arch)``; an older
    ``arch.json`` gains the fields added since, at their defaults."""
    import orbax.checkpoint as ocp

    directory = Path(directory).resolve()
    if not is_converted(directory):
        raise CheckpointError(f"{directory} is not a converted checkpoint (no {ARCH_FILE} + "
                              f"{PARAMS_DIR}/): run python -m fcd_jax.convert SRC {directory}")
    try:
        arch = json.loads((directory / ARCH_FILE).read_text())
        checkpointer = ocp.StandardCheckpointer()
        params = checkpointer.restore(directory / PARAMS_DIR)
        checkpointer.close()
    except Exception as error:  # orbax and json raise many types
        raise CheckpointError(f"cannot read converted checkpoint {directory}: "
                              f"{one_line(error)}; delete it to convert again") from error
    params = jax.tree.map(lambda leaf: np.asarray(leaf, np.float32), params)
    if is_cnn(arch):  # Flax variables of a CNN teacher
        from fcd_jax.convert_torchvision import variable_shapes

        check_params(params, variable_shapes(arch))
        return params, arch
    arch = arch_fields(arch) | arch
    try:
        shapes = param_shapes(arch)
    except Exception as error:  # a hand-edited arch.json: any value the ViT cannot take
        raise CheckpointError(f"{directory / ARCH_FILE} does not describe a ViT "
                              f"({one_line(error)}): convert the checkpoint again") from None
    check_params(params, shapes)
    return params, arch


def cache_key(path: Path, image_size: int | None) -> str:
    """File name, size, mtime, image size and conversion version: a change converts again."""
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    stats = [p.stat() for p in files]
    size, mtime = sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)
    return f"{path.name}-{size}-{mtime}-{image_size or 'native'}-v{CONVERSION_VERSION}"


def count_params(params: Params) -> int:
    return sum(int(np.size(leaf)) for leaf in jax.tree.leaves(params))
