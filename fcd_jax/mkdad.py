"""The method on CNN feature taps (METHOD.md "The paper's ablations"): MKDAD's distillation loss
(Salehi et al., CVPR 2021) with FCD's anchor, its score and its anomaly maps.

Inputs are the ``"taps"`` of ``fcd_jax.models.vgg`` / ``resnet``: tuples of NHWC feature maps,
indexed by 0-based tap number (VGG16: the 13 ReLU outputs; ResNet18: layer1..layer4). Everything is
computed in float32; per-image terms are averaged over the batch. The anchor is the running mean
of the teacher's global-average-pooled last tap, kept in the ``[1, channels]`` layout of the ViT's
cls anchor, so ``fcd_jax.losses.update_anchor`` and ``anchor_distance`` serve both backbones.

``config`` is ``config.method`` with the fields ``loss_taps``, ``score_taps``, ``lambda_mse``,
``lam``, ``anchor_weight`` (and, for the anchor update, ``anchor_update``/``anchor_momentum``; for
the score, ``image_score`` and ``map_sigma``). A non-zero ``gram_weight`` is an error: the paper
defines no Gram term for CNNs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from fcd_jax.errors import FcdError
from fcd_jax.losses import anchor_distance, cosine_distance, token_diff
from fcd_jax.scoring import IMAGE_SCORES, gaussian_blur, upsample_matrix

Taps = Sequence[jax.Array]
ANCHOR_TAP = -1  # METHOD.md: the anchor is built on the last tap
# METHOD.md's taps per backbone (MKDAD's for VGG16: relu2_2, 3_3, 4_3, 5_3; scored from relu3_3).
TAPS = {
    "vgg16": dict(loss_taps=(3, 6, 9, 12), score_taps=(6, 9, 12)),
    "resnet18": dict(loss_taps=(0, 1, 2, 3), score_taps=(0, 1, 2, 3)),
}


def check_config(config: Any) -> None:
    """One clear error for a method config that cannot work on a CNN."""
    gram_weight = float(config.get("gram_weight", 0.0))
    if gram_weight:
        raise FcdError(
            f"method.gram_weight = {gram_weight}, but L_Gram is defined for ViT blocks only "
            "(METHOD.md): set method.gram_weight = 0 for a VGG or ResNet backbone"
        )
    for field in ("lambda_mse", "lam", "anchor_weight"):
        if float(config[field]) < 0:
            raise FcdError(f"method.{field} = {config[field]} is negative: use a weight >= 0")


def check_taps(teacher_taps: Taps, student_taps: Taps, taps: Sequence[int], what: str
               ) -> tuple[int, ...]:
    """The tap indices as ints; one clear error if one is missing or T and S differ in shape."""
    taps = tuple(int(c) for c in taps)
    if not taps:
        raise FcdError(f"{what} is empty: list at least one 0-based tap index")
    count = min(len(teacher_taps), len(student_taps))
    bad = [c for c in taps if not -count <= c < count]
    if bad:
        raise FcdError(f"{what} {taps} has tap indices {bad} outside 0..{count - 1}: use 0-based "
                       f"indices below the number of taps ({count})")
    for c in taps:
        if teacher_taps[c].shape != student_taps[c].shape:
            raise FcdError(
                f"{what}: tap {c} is {teacher_taps[c].shape} in the teacher but "
                f"{student_taps[c].shape} in the student: use taps where both have the same width "
                "(the small cloner matches VGG16 at taps 3, 6, 9, 12 only)"
            )
    return taps


def flat_cosine_distance(teacher_map: jax.Array, student_map: jax.Array) -> jax.Array:
    """1 - cos(flat(T_c), flat(S_c)) per image, over the whole flattened map: ``[batch]``."""
    batch = teacher_map.shape[0]
    return cosine_distance(teacher_map.reshape(batch, -1), student_map.reshape(batch, -1))


def mean_squared_error(teacher_map: jax.Array, student_map: jax.Array) -> jax.Array:
    """mean((T_c - S_c)^2) per image: ``[batch]``."""
    difference = teacher_map.astype(jnp.float32) - student_map.astype(jnp.float32)
    return jnp.mean(jnp.square(difference), axis=(1, 2, 3))


def tap_distances(teacher_taps: Taps, student_taps: Taps, taps: Sequence[int], lambda_mse: float
                  ) -> jax.Array:
    """MKDAD's per-image term, sum over ``taps`` of 1 - cos(flat T_c, flat S_c) +
    lambda_mse * mean((T_c - S_c)^2): ``[batch]``. Its batch mean is the loss, itself the score."""
    taps = check_taps(teacher_taps, student_taps, taps, "taps")
    return sum(
        flat_cosine_distance(teacher_taps[c], student_taps[c])
        + float(lambda_mse) * mean_squared_error(teacher_taps[c], student_taps[c])
        for c in taps
    )


def distill_loss(teacher_taps: Taps, student_taps: Taps, taps: Sequence[int], lambda_mse: float
                 ) -> jax.Array:
    """L_distill for a CNN (MKDAD's loss, METHOD.md "The paper's ablations"), batch mean."""
    return jnp.mean(tap_distances(teacher_taps, student_taps, taps, lambda_mse))


def gap_features(taps: Taps) -> jax.Array:
    """The global-average-pooled last tap, ``[1, batch, channels]`` float32: what
    ``fcd_jax.losses.update_anchor`` takes from the teacher (the CNN's counterpart of cls)."""
    return jnp.mean(taps[ANCHOR_TAP].astype(jnp.float32), axis=(1, 2))[None]


def anchor_loss(student_taps: Taps, anchor: jax.Array) -> jax.Array:
    """L_anchor = ||GAP(S_last) - anchor||_2, mean over the batch; the anchor gets no gradient."""
    return jnp.mean(anchor_distance(gap_features(student_taps), anchor)[0])


def mkdad_loss(teacher_taps: Taps, student_taps: Taps, anchor: jax.Array, config: Any
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L = L_distill + lam * anchor_weight * L_anchor on ``loss_taps`` (METHOD.md "The paper's
    ablations"; ``anchor`` is ``[1, channels]``). Returns the loss and the metrics ``loss``,
    ``distill``, ``anchor``. The teacher gets no gradient."""
    check_config(config)
    teacher_taps = jax.lax.stop_gradient(tuple(teacher_taps))
    distill = distill_loss(teacher_taps, student_taps, config.loss_taps, config.lambda_mse)
    anchor_term = anchor_loss(student_taps, anchor)
    loss = distill + float(config.lam) * float(config.anchor_weight) * anchor_term
    return loss, {"loss": loss, "distill": distill, "anchor": anchor_term}


def upsample(maps: jax.Array, image_hw: tuple[int, int]) -> jax.Array:
    """Bilinear (half-pixel) upsampling of ``[batch, h, w]`` maps to ``image_hw``, the ViT map's."""
    rows = jnp.asarray(upsample_matrix(maps.shape[1], image_hw[0]))
    cols = jnp.asarray(upsample_matrix(maps.shape[2], image_hw[1]))
    return jnp.einsum("hi,bij,wj->bhw", rows, maps, cols, precision=jax.lax.Precision.HIGHEST)


def anomaly_map(teacher_taps: Taps, student_taps: Taps, taps: Sequence[int],
                image_hw: tuple[int, int], sigma: float) -> jax.Array:
    """``[batch, H, W]``: per position ||T - S||_2 + 1 - cos over the channels at each tap in
    ``taps``, each upsampled to the image and summed, then Gaussian-smoothed (sigma in pixels) as
    the ViT's map (METHOD.md "The paper's ablations", "Beyond the paper")."""
    taps = check_taps(teacher_taps, student_taps, taps, "score_taps")
    summed = sum(upsample(token_diff(teacher_taps[c], student_taps[c]), image_hw) for c in taps)
    return gaussian_blur(summed, float(sigma))


def anomaly_scores(teacher_taps: Taps, student_taps: Taps, anchor: jax.Array, config: Any, *,
                   image_size: int | tuple[int, int] | None = None) -> dict[str, jax.Array]:
    """Image scores on ``score_taps`` (METHOD.md "The paper's ablations"):

    - ``s_d``: MKDAD's score, :func:`tap_distances` summed over the score taps;
    - ``s_a`` = ||GAP(T_last) - anchor|| + ||GAP(S_last) - anchor|| (eq. 7 with GAP for cls);
    - ``score``: ``image_score="paper"``: S_D + S_A, or S_D alone when ``anchor_weight`` is 0;
      ``"max"``: the maximum of the smoothed map, which needs ``image_size``;
    - ``map`` (only when ``image_size`` is given): :func:`anomaly_map` with sigma ``map_sigma``.
    """
    check_config(config)
    if config.image_score not in IMAGE_SCORES:
        raise FcdError(f"unknown image_score {config.image_score!r}: use one of "
                       f"{', '.join(map(repr, IMAGE_SCORES))}")
    s_d = tap_distances(teacher_taps, student_taps, config.score_taps, config.lambda_mse)
    s_a = (anchor_distance(gap_features(teacher_taps), anchor)
           + anchor_distance(gap_features(student_taps), anchor))[0]
    scores = {"score": s_d + s_a if float(config.anchor_weight) else s_d, "s_a": s_a, "s_d": s_d}
    if image_size is not None:
        image_hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        scores["map"] = anomaly_map(teacher_taps, student_taps, config.score_taps, image_hw,
                                    config.map_sigma)
    if config.image_score == "max":
        if image_size is None:
            raise FcdError('image_score="max" scores the anomaly map: pass image_size')
        scores["score"] = jnp.max(scores["map"], axis=(1, 2))
    return scores
