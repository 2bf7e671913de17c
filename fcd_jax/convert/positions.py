"""Resampling a checkpoint's position-embedding grid to another image size, as its own code does.

A checkpoint stores positions for one grid (ViT-B/16 at 224: 14x14; DINOv2: 37x37, for 518 px).
At another image size every implementation resamples the patch rows (the cls row is kept), each
its own way; ``arch["pos_interpolation"]`` names the way of the checkpoint's family:

- ``"bilinear"``: vit_jax (Google ``.npz``): ``scipy.ndimage.zoom(order=1)``, corners aligned.
- ``"bicubic"``: ``torch.nn.functional.interpolate(size=..., mode="bicubic",
  align_corners=False)`` (HuggingFace ``ViTModel``, ``DeiTModel``, ``Dinov2Model``): Keys'
  cubic kernel with a = -0.75 on half-pixel centres, edge samples repeated.
- ``"bicubic_antialias"``: the same with ``antialias=True`` (timm's ``resample_abs_pos_embed``,
  HuggingFace ``Dinov2WithRegistersModel``, the original DINOv2 code for its register models):
  a = -0.5, the kernel widened by the scale when shrinking, weights renormalised at the edges.
- ``"bicubic_dino_offset"``: the original DINOv2 code without registers: ``"bicubic"`` driven by
  the scale factor ``(new + 0.1) / old`` instead of the size (its ``interpolate_offset=0.1``).

Each is written here as a plain 1-D weight matrix per axis (the resize is separable), in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import scipy.ndimage

from fcd_jax.errors import CheckpointError

DINO_OFFSET = 0.1  # facebookresearch/dinov2 and dino: interpolate_offset


def _keys_cubic(distance: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel (1981) at ``|distance|``; zero beyond 2."""
    x = np.abs(distance)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((x - 5) * x + 8) * x * a - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _bicubic_weights(old: int, new: int, scale: float) -> np.ndarray:
    """PyTorch's bicubic (align_corners=False): output i reads source (i + 0.5) * scale - 0.5
    through the 4 nearest samples, indices clamped to the edge."""
    weights = np.zeros((new, old))
    for i in range(new):
        source = (i + 0.5) * scale - 0.5
        floor = math.floor(source)
        for tap in (-1, 0, 1, 2):
            index = min(max(floor + tap, 0), old - 1)
            weights[i, index] += _keys_cubic(np.asarray(source - floor - tap), -0.75)
    return weights


def _antialias_weights(old: int, new: int) -> np.ndarray:
    """PyTorch's bicubic with ``antialias=True``: a = -0.5, support 2 * max(scale, 1) around the
    centre (i + 0.5) * scale, samples outside the grid dropped and the rest renormalised."""
    scale = old / new
    support, stretch = (2.0 * scale, 1.0 / scale) if scale >= 1.0 else (2.0, 1.0)
    weights = np.zeros((new, old))
    for i in range(new):
        centre = scale * (i + 0.5)
        low = max(int(centre - support + 0.5), 0)
        high = min(int(centre + support + 0.5), old)
        taps = _keys_cubic((np.arange(low, high) - centre + 0.5) * stretch, -0.5)
        weights[i, low:high] = taps / taps.sum()
    return weights


def _separable(weights: Callable[[int, int], np.ndarray]):
    def resize(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        rows, cols = weights(grid.shape[0], size[0]), weights(grid.shape[1], size[1])
        return np.einsum("ih,hwd,jw->ijd", rows, grid.astype(np.float64), cols)
    return resize


def _bilinear_corners(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    zoom = (size[0] / grid.shape[0], size[1] / grid.shape[1], 1)
    return scipy.ndimage.zoom(grid, zoom, order=1, grid_mode=False)[: size[0], : size[1]]


RESIZERS: dict[str, Callable[[np.ndarray, tuple[int, int]], np.ndarray]] = {
    "bilinear": _bilinear_corners,
    "bicubic": _separable(lambda old, new: _bicubic_weights(old, new, old / new)),
    "bicubic_antialias": _separable(_antialias_weights),
    "bicubic_dino_offset": _separable(
        lambda old, new: _bicubic_weights(old, new, old / (new + DINO_OFFSET))),
}


def interpolate_pos_embedding(pos_embedding: np.ndarray, grid: tuple[int, int],
                              mode: str = "bilinear") -> np.ndarray:
    """Resizes ``[1, 1 + g*g, D]`` to ``[1, 1 + grid[0]*grid[1], D]`` the ``mode`` way (see the
    module docstring); the cls row is kept, and the same grid is returned unchanged."""
    if mode not in RESIZERS:
        raise CheckpointError(f"unknown position interpolation {mode!r}: use one of "
                              f"{', '.join(RESIZERS)}")
    cls_slot, old = pos_embedding[:, :1], pos_embedding[0, 1:]
    side = math.isqrt(len(old))
    if side * side != len(old):
        raise CheckpointError(f"position embedding of {len(old)} patches is not a square grid")
    if (side, side) == tuple(grid):
        return pos_embedding
    new = RESIZERS[mode](old.reshape(side, side, -1), tuple(grid))
    if new.shape[:2] != tuple(grid):
        raise AssertionError(f"{mode} resize gave {new.shape[:2]}, wanted {grid}")
    new = new.astype(pos_embedding.dtype).reshape(1, grid[0] * grid[1], -1)
    return np.concatenate([cls_slot, new], axis=1)


def with_cls_slot(pos_embedding: np.ndarray) -> np.ndarray:
    """Checkpoints whose cls token gets no position embedding (big_vision, timm
    ``no_embed_class``) store ``g*g`` rows: a zero cls row is the same model."""
    tokens = pos_embedding.shape[1]
    if math.isqrt(tokens) ** 2 == tokens:
        return np.concatenate([np.zeros_like(pos_embedding[:, :1]), pos_embedding], axis=1)
    return pos_embedding


def fit_image_size(params: dict, arch: dict, image_size: int | None) -> tuple[dict, dict]:
    """``params`` with the position grid for ``image_size`` (default: the checkpoint's own),
    resampled the ``arch["pos_interpolation"]`` way; ``arch`` gains ``image_size``."""
    pos = with_cls_slot(params["pos_embedding"])
    side = math.isqrt(pos.shape[1] - 1)
    if side * side != pos.shape[1] - 1:
        raise CheckpointError(f"{arch.get('source')}: position embedding has {pos.shape[1]} rows, "
                              "neither 1 + a square grid nor a square grid")
    patch = arch["patch_size"]
    if image_size is None:
        image_size = side * patch
    if image_size % patch:
        raise CheckpointError(f"image size {image_size} is not a multiple of the checkpoint's "
                              f"patch size {patch}: choose e.g. {image_size // patch * patch}")
    grid = image_size // patch
    mode = arch.get("pos_interpolation", "bilinear")
    params = params | {"pos_embedding": interpolate_pos_embedding(pos, (grid, grid), mode)}
    return params, arch | {"image_size": int(image_size), "pos_interpolation": mode}
