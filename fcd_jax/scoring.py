"""The anomaly score (METHOD.md "Anomaly score", paper eqs. 7-10) and per-patch anomaly maps
(METHOD.md "Beyond the paper").

Inputs are the ViT's ``"blocks"`` arrays ``[num_layers, batch, tokens, width]``, cls token first,
indexed by 0-based block number; everything is computed in float32.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fcd_jax.errors import FcdError
from fcd_jax.losses import anchor_distance, cls_tokens, select_layers, token_diff
from fcd_jax.models import is_cnn_model, model_outputs

IMAGE_SCORES = ("paper", "max")
GAUSSIAN_TRUNCATE = 4.0  # kernel radius in sigmas, as scipy.ndimage.gaussian_filter


def top_k_mean(values: jax.Array, k: int) -> jax.Array:
    """AvgTopk (eq. 9): mean of the k largest entries over the last axis."""
    k = int(k)
    size = values.shape[-1]
    if not 1 <= k <= size:
        raise FcdError(
            f"top_k = {k} but there are {size} patch tokens: set method.top_k between 1 and {size}"
        )
    return jnp.mean(jax.lax.top_k(values, k)[0], axis=-1)


def _image_hw(image_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    height, width = image_size
    return int(height), int(width)


def _patch_grid(num_patches: int, grid_shape: tuple[int, int] | None) -> tuple[int, int]:
    if grid_shape is None:
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise FcdError(
                f"{num_patches} patch tokens do not form a square grid: pass grid_shape=(h, w)"
            )
        return side, side
    grid_h, grid_w = (int(n) for n in grid_shape)
    if grid_h * grid_w != num_patches:
        raise FcdError(f"grid_shape {grid_shape} does not hold the {num_patches} patch tokens")
    return grid_h, grid_w


def gaussian_kernel(sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian taps, radius int(4 sigma + 0.5), as scipy.ndimage."""
    radius = int(GAUSSIAN_TRUNCATE * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (offsets / sigma) ** 2)
    return (taps / taps.sum()).astype(np.float32)


def _reflect(index: np.ndarray, size: int) -> np.ndarray:
    """scipy.ndimage's ``mode="reflect"`` (``d c b a | a b c d | d c b a``), any distance out."""
    index = np.mod(index, 2 * size)
    return np.where(index >= size, 2 * size - 1 - index, index)


@functools.lru_cache(maxsize=32)
def blur_matrix(size: int, sigma: float) -> np.ndarray:
    """``[size, size]`` matrix of the 1-D Gaussian smoothing with reflected borders."""
    if sigma < 0:
        raise FcdError(f"map_sigma = {sigma} is negative: use 0 (no smoothing) or pixels")
    if sigma == 0:
        return np.eye(size, dtype=np.float32)
    taps = gaussian_kernel(sigma).astype(np.float64)
    radius = len(taps) // 2
    matrix = np.zeros((size, size))
    rows = np.arange(size)
    for offset, weight in zip(range(-radius, radius + 1), taps, strict=True):
        np.add.at(matrix, (rows, _reflect(rows + offset, size)), weight)
    return matrix.astype(np.float32)


@functools.lru_cache(maxsize=32)
def upsample_matrix(in_size: int, out_size: int) -> np.ndarray:
    """``[out_size, in_size]`` matrix of ``jax.image.resize``'s bilinear resize (half-pixel
    centres; a downsampling triangle widened by the scale, as its antialiasing does).

    Built in NumPy: through ``jax.image.resize`` every new size cost ~25 small eager XLA
    compilations (~1 s) in the first evaluation or prediction of a process."""
    stretch = max(in_size / out_size, 1.0)  # the triangle's half-width, in input pixels
    source = (np.arange(out_size) + 0.5) * in_size / out_size - 0.5  # where each output samples
    weights = np.maximum(0.0, 1.0 - np.abs(source[:, None] - np.arange(in_size)[None]) / stretch)
    totals = weights.sum(axis=1, keepdims=True)
    weights = np.divide(weights, totals, out=np.zeros_like(weights), where=totals > 1e-4)
    weights[(source < -0.5) | (source > in_size - 0.5)] = 0.0
    return weights.astype(np.float32)


def gaussian_blur(maps: jax.Array, sigma: float) -> jax.Array:
    """Separable Gaussian smoothing of ``[batch, H, W]`` maps, sigma in pixels; sigma 0 = identity.

    Borders are mirrored with the edge pixel repeated (``d c b a | a b c d``), scipy.ndimage's
    ``mode="reflect"``. Each axis is one small matmul with :func:`blur_matrix`.
    """
    rows = jnp.asarray(blur_matrix(maps.shape[1], sigma))
    cols = jnp.asarray(blur_matrix(maps.shape[2], sigma))
    return jnp.einsum(
        "hi,bij,wj->bhw", rows, maps, cols, precision=jax.lax.Precision.HIGHEST
    )


def anomaly_map(
    patch_diff: jax.Array, image_size: int | tuple[int, int], sigma: float
) -> jax.Array:
    """Per-pixel anomaly map ``[batch, H, W]`` (METHOD.md "Beyond the paper").

    The ``[batch, grid_h, grid_w]`` patch grid is upsampled bilinearly (``jax.image.resize``, half
    pixel centres) to the image size, then smoothed by :func:`gaussian_blur`. Both are linear and
    separable, so each axis is folded into one ``[H, grid_h]`` matrix: two small matmuls in all.
    """
    height, width = _image_hw(image_size)
    _, grid_h, grid_w = patch_diff.shape
    rows = blur_matrix(height, sigma) @ upsample_matrix(grid_h, height)
    cols = blur_matrix(width, sigma) @ upsample_matrix(grid_w, width)
    return jnp.einsum(
        "hi,bij,wj->bhw", jnp.asarray(rows), patch_diff.astype(jnp.float32), jnp.asarray(cols),
        precision=jax.lax.Precision.HIGHEST,
    )


def anomaly_scores(
    teacher_blocks: jax.Array,
    student_blocks: jax.Array,
    anchor: jax.Array,
    config: Any,
    *,
    grid_shape: tuple[int, int] | None = None,
    image_size: int | tuple[int, int] | None = None,
) -> dict[str, jax.Array]:
    """Image scores and per-patch differences (METHOD.md eqs. 7-10).

    - ``s_d`` = sum_{c in layers} (Diff_{c,cls} + AvgTopk_p Diff_{c,p}) (eq. 9), k = ``top_k``;
    - ``s_a`` = ||T_cls - anchor|| + ||S_cls - anchor|| (eq. 7), summed over the anchor layers;
    - ``patch_diff`` = sum_{c in layers} Diff_{c,p} on the ``[batch, grid_h, grid_w]`` patch grid
      (square unless ``grid_shape`` is given);
    - ``score``: ``image_score="paper"``: S_D + S_A (eq. 10), or S_D alone when
      ``anchor_weight`` is 0 (no S_A without L_anchor, "The paper's ablations"); ``"max"``: the
      maximum of the smoothed anomaly map, which needs ``image_size``;
    - ``map`` (only when ``image_size`` is given): :func:`anomaly_map` with sigma ``map_sigma``.

    ``config`` is ``config.method``.
    """
    if config.image_score not in IMAGE_SCORES:
        raise FcdError(
            f"unknown image_score {config.image_score!r}: use one of "
            f"{', '.join(map(repr, IMAGE_SCORES))}"
        )
    batch, num_patches = student_blocks.shape[1], student_blocks.shape[2] - 1
    grid_shape = _patch_grid(num_patches, grid_shape)
    teacher = select_layers(teacher_blocks, config.layers, "teacher layers")
    student = select_layers(student_blocks, config.layers, "student layers")
    diff = token_diff(teacher, student)  # [layers, batch, tokens]
    s_d = jnp.sum(diff[..., 0] + top_k_mean(diff[..., 1:], config.top_k), axis=0)
    s_a = jnp.sum(
        anchor_distance(cls_tokens(teacher_blocks, config.anchor_layers), anchor)
        + anchor_distance(cls_tokens(student_blocks, config.anchor_layers), anchor),
        axis=0,
    )
    patch_diff = jnp.sum(diff[..., 1:], axis=0).reshape(batch, *grid_shape)
    score = s_d + s_a if float(config.anchor_weight) else s_d
    scores = {"score": score, "s_a": s_a, "s_d": s_d, "patch_diff": patch_diff}
    if image_size is not None:
        scores["map"] = anomaly_map(patch_diff, image_size, float(config.map_sigma))
    if config.image_score == "max":
        if image_size is None:
            raise FcdError('image_score="max" scores the anomaly map: pass image_size')
        scores["score"] = jnp.max(scores["map"], axis=(1, 2))
    return scores


def score_images(
    teacher_model: nn.Module,
    student_model: nn.Module,
    teacher_params: Any,
    student_params: Any,
    anchor: jax.Array,
    images: jax.Array,
    method_config: Any,
    image_size: int | tuple[int, int],
    with_maps: bool = True,
) -> dict[str, jax.Array]:
    """From normalised NHWC images to :func:`anomaly_scores`, with the ``map`` at ``image_size``
    only ``with_maps`` (pure; ``evaluate.make_score_step`` calls it inside its jitted step).
    ``method_config`` holds the block (or tap) plan's indices (``networks.BlockPlan.method``)."""
    return score_student(
        student_model, student_params, teacher_outputs(teacher_model, teacher_params, images),
        anchor, images, method_config, image_size, with_maps,
    )


def teacher_outputs(teacher_model: nn.Module, teacher_params: Any, images: jax.Array) -> Any:
    """What scoring reads of the teacher (``models.model_outputs``, inference mode): a ViT's
    ``"blocks"``, a CNN's ``"taps"``. Evaluation computes it once per test batch for every
    student."""
    outputs = model_outputs(teacher_model, teacher_params, images)
    return outputs["taps"] if is_cnn_model(teacher_model) else outputs["blocks"]


def score_student(
    student_model: nn.Module, student_params: Any, teacher_out: Any, anchor: jax.Array,
    images: jax.Array, method_config: Any, image_size: int | tuple[int, int],
    with_maps: bool = True,
) -> dict[str, jax.Array]:
    """:func:`score_images` given :func:`teacher_outputs` of ``images``: the part of scoring that
    depends on the student. Without ``with_maps`` no full-resolution map is computed, unless
    ``image_score`` is "max", which scores the map (it is still left out of the result)."""
    needs_map = with_maps or method_config.image_score == "max"
    if not is_cnn_model(student_model):
        student_blocks = model_outputs(student_model, student_params, images)["blocks"]
        patch = student_model.patch_size
        scores = anomaly_scores(
            teacher_out, student_blocks, anchor, method_config,
            grid_shape=(images.shape[1] // patch, images.shape[2] // patch),
            image_size=_image_hw(image_size) if needs_map else None,
        )
    else:
        scores = score_cnn_student(student_model, student_params, teacher_out, anchor, images,
                                   method_config, image_size if needs_map else None)
    if not with_maps:
        scores.pop("map", None)
    return scores


def score_cnn_student(
    student_model: nn.Module,
    student_params: Any,
    teacher_taps: tuple[jax.Array, ...],
    anchor: jax.Array,
    images: jax.Array,
    method_config: Any,
    image_size: int | tuple[int, int] | None,
) -> dict[str, jax.Array]:
    """:func:`score_student` for a CNN backbone (METHOD.md "The paper's ablations"): the student
    in inference mode on its Flax variables (its batch norm on the running statistics it
    trained), then ``fcd_jax.mkdad.anomaly_scores``: MKDAD's score on ``score_taps`` + S_A on
    GAP'd features, and the map at ``image_size`` (None: no map). ``method_config`` holds the
    tap plan's indices (``networks.TapPlan.method``)."""
    from fcd_jax import mkdad  # mkdad builds on this module's smoothing: imported when used

    return mkdad.anomaly_scores(
        teacher_taps, model_outputs(student_model, student_params, images)["taps"], anchor,
        method_config, image_size=None if image_size is None else _image_hw(image_size),
    )
