"""Reading a weights file into named numpy arrays, safely, with one-line errors.

``.npz`` through ``np.load(allow_pickle=False)``, ``.safetensors`` (bfloat16 too), and PyTorch
``.pth``/``.pt``/``.bin`` only through ``torch.load(weights_only=True)``: nothing in a checkpoint
ever executes code. :class:`Arrays` remembers which arrays a converter used, so that weights it
has no place for are reported instead of silently dropped.
"""

from __future__ import annotations

import hashlib
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from fcd_jax.errors import CheckpointError


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    arrays = {}
    with safe_open(str(path), framework="np") as handle:
        for key in handle.keys():
            try:
                arrays[key] = handle.get_tensor(key)
            except TypeError:  # bfloat16 has no numpy dtype: go through a jax array.
                with safe_open(str(path), framework="flax") as flax_handle:
                    arrays[key] = np.asarray(flax_handle.get_tensor(key), np.float32)
    return arrays


def _read_torch(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as error:
        raise CheckpointError(
            f"reading {path.name} needs PyTorch: pip install 'fcd-jax[torch]', or convert the "
            "file to .safetensors"
        ) from error
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("model", "state_dict", "model_state"):  # training checkpoints nest weights
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    arrays = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu()
            arrays[key] = (value.float() if value.is_floating_point() else value).numpy()
    return arrays


READERS = {".npz": _read_npz, ".safetensors": _read_safetensors, ".pth": _read_torch,
           ".pt": _read_torch, ".bin": _read_torch}


def _parses_as_pickle(path: Path) -> bool:
    """Whether ``path`` opens with a well-formed pickle stream (``pickletools`` only reads the
    opcodes: nothing is imported or run), as opposed to a corrupt file."""
    import pickletools

    try:
        with path.open("rb") as handle:
            for _ in pickletools.genops(handle):
                pass
        return True
    except Exception:  # any malformed stream: ValueError, EOFError, UnicodeDecodeError, ...
        return False


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    """Reads one weights file into ``{name: array}``; unreadable files raise CheckpointError."""
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise CheckpointError(
            f"unknown checkpoint format {path.name!r}: expected a Google ViT .npz, a timm or "
            "DINOv2 .safetensors/.pth/.bin, a HuggingFace folder or a folder written by "
            "fcd_jax.convert"
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        arrays = reader(path)
    except CheckpointError:
        raise
    except Exception as error:  # zip, pickle, torch and safetensors errors share no base class
        detail = one_line(error)
        if isinstance(error, pickle.UnpicklingError):  # torch's message spans many lines
            found = re.search(r"WeightsUnpickler error:\s*(.+)|(Trying to load unsupported "
                              r"GLOBAL \S+)", str(error))
            detail = (found.group(1) or found.group(2)).strip() if found else detail
            refused = "Weights only load failed" in str(error)  # torch's safe loader said no
            if refused and (detail.lower().startswith(("unsupported global", "trying to load"))
                            or _parses_as_pickle(path)):  # a well-formed pickle: code, objects
                raise CheckpointError(
                    f"{path} holds code or Python objects besides tensors "
                    f"({detail.split(' was ')[0]}), refused and never run here: save "
                    "model.state_dict() alone, or use .safetensors"
                ) from error
        raise CheckpointError(
            f"cannot read {path}: corrupt or truncated file ({detail}); download it again"
        ) from error
    return {k.removeprefix("module."): v for k, v in arrays.items()}  # DistributedDataParallel


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Arrays:
    """Named arrays that remember which were used, so that unknown leftovers can be reported."""

    def __init__(self, arrays: Mapping[str, np.ndarray], source: Path, layout: str):
        self.arrays, self.source, self.layout, self.used = dict(arrays), source, layout, set()

    def __contains__(self, key: str) -> bool:
        return key in self.arrays

    def keys(self) -> set[str]:
        return set(self.arrays)

    def take(self, key: str) -> np.ndarray:
        if key not in self.arrays:
            raise CheckpointError(
                f"{self.source} ({self.layout} layout) has no {key!r}: not a plain ViT checkpoint "
                "of a supported layout"
            )
        self.used.add(key)
        return np.asarray(self.arrays[key], np.float32)

    def take_if_present(self, key: str) -> np.ndarray | None:
        return self.take(key) if key in self.arrays else None

    def check_all_used(self, ignored: Callable[[str], bool]) -> None:
        left = sorted(k for k in self.arrays if k not in self.used and not ignored(k))
        if left:
            raise CheckpointError(
                f"{self.source} ({self.layout} layout) has weights this ViT has no place for: "
                f"{', '.join(left[:3])}{' ...' if len(left) > 3 else ''} (an unsupported variant, "
                "e.g. a SwiGLU MLP, a hybrid backbone or a pooling head)"
            )
