"""Helpers shared by the converter tests (tests/test_convert*.py): features of converted params,
the relative error they are judged by, one-line errors, and writing PyTorch state dicts."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from fcd_jax import convert
from fcd_jax.errors import CheckpointError
from fcd_jax.models.vit import build_vit

TOLERANCE = 1e-4  # max |ours - reference| / max |reference|, float32


def relative_error(ours, reference) -> float:
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


@functools.cache
def jitted_apply(model):
    return jax.jit(model.apply)


def features(params, arch, images) -> dict:
    """``{"blocks", "encoded"}`` of the ViT ``arch`` describes, as numpy."""
    model = build_vit(arch)
    return jax.tree.map(np.asarray, jitted_apply(model)({"params": params}, images))


def one_line_error(path, match: str, **kwargs) -> str:
    """Converting ``path`` raises a one-line CheckpointError matching ``match``."""
    with pytest.raises(CheckpointError, match=match) as error:
        convert.convert_checkpoint(path, **kwargs)
    assert "\n" not in str(error.value)
    return str(error.value)


def torch_save(state: dict, path) -> None:
    import torch

    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, path)


# timm block names -> HuggingFace Hub block names (ViT and DeiT; DINOv2 has norm1/norm2, mlp.fc*).
HF_VIT_NAMES = {"norm1": "layernorm_before", "norm2": "layernorm_after",
                "attn.proj": "attention.output.dense", "mlp.fc1": "intermediate.dense",
                "mlp.fc2": "output.dense"}
HF_DINOV2_NAMES = HF_VIT_NAMES | {"norm1": "norm1", "norm2": "norm2", "mlp.fc1": "mlp.fc1",
                                  "mlp.fc2": "mlp.fc2", "ls1.gamma": "layer_scale1.lambda1",
                                  "ls2.gamma": "layer_scale2.lambda1"}


def timm_block(hub: dict, i: int, block: str, names: dict[str, str]) -> dict:
    """Block ``i`` of a HuggingFace Hub state dict under timm's names at ``block`` (e.g.
    ``blocks.3``): the fused ``attn.qkv`` (rows q | k | v) and ``names``' renames."""
    layer = lambda name: hub[f"encoder.layer.{i}.{name}"]
    state = {}
    for kind in ("weight", "bias"):
        state[f"{block}.attn.qkv.{kind}"] = np.concatenate(
            [layer(f"attention.attention.{n}.{kind}") for n in ("query", "key", "value")])
    for ours, theirs in names.items():
        kinds = ("",) if ours.endswith("gamma") else (".weight", ".bias")
        state |= {f"{block}.{ours}{kind}": layer(f"{theirs}{kind}") for kind in kinds}
    return state
