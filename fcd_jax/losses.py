"""The FCD training losses of METHOD.md "Losses" (paper eqs. 1-6) and the anchor update.

Every function takes the ViT's ``"blocks"`` arrays, ``[num_layers, batch, tokens, width]`` with the
cls token first, indexes them by 0-based block number, and computes in float32 whatever the input
dtype. Per-image terms are averaged over the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from fcd_jax.errors import FcdError

DISTILL_FORMS = ("default", "paper")
GRAM_FORMS = ("default", "paper")
ANCHOR_UPDATES = ("mean", "ema")

# Floor of ||T|| * ||S|| in the cosine, as torch.nn.functional.cosine_similarity.
COSINE_EPS = 1e-8


def l2_norm(x: jax.Array, axis: int | tuple[int, ...] = -1) -> jax.Array:
    """Euclidean (or Frobenius, for several axes) norm whose gradient is 0, not NaN, at x = 0."""
    squared = jnp.sum(jnp.square(x), axis=axis)
    positive = squared > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def cosine_distance(teacher_tokens: jax.Array, student_tokens: jax.Array) -> jax.Array:
    """1 - cos(T, S) over the last axis, in float32 (the direction term of eqs. 3 and 8).

    The cosine divides by max(||T|| ||S||, 1e-8), so all-zero tokens give cos = 0, not NaN.
    """
    teacher = teacher_tokens.astype(jnp.float32)
    student = student_tokens.astype(jnp.float32)
    norms = jnp.maximum(l2_norm(teacher) * l2_norm(student), COSINE_EPS)
    return 1.0 - jnp.sum(teacher * student, axis=-1) / norms


def token_diff(teacher_tokens: jax.Array, student_tokens: jax.Array) -> jax.Array:
    """Diff = ||T - S||_2 + 1 - cos(T, S) over the last axis (METHOD.md eq. 8), in float32."""
    distance = l2_norm(teacher_tokens.astype(jnp.float32) - student_tokens.astype(jnp.float32))
    return distance + cosine_distance(teacher_tokens, student_tokens)


def check_layers(blocks: jax.Array, layers: Sequence[int], what: str) -> tuple[int, ...]:
    """The block indices as a tuple of ints; one clear error if any is outside ``blocks``."""
    layers = tuple(int(c) for c in layers)
    if not layers:
        raise FcdError(f"{what} is empty: list at least one 0-based block index")
    num_layers = blocks.shape[0]
    bad = [c for c in layers if not 0 <= c < num_layers]
    if bad:
        raise FcdError(
            f"{what} {layers} has block indices {bad} outside 0..{num_layers - 1}: "
            f"use 0-based indices below the model depth ({num_layers} blocks given)"
        )
    return layers


def _check_form(form: str, forms: tuple[str, ...], what: str) -> None:
    if form not in forms:
        raise FcdError(f"unknown {what} {form!r}: use one of {', '.join(map(repr, forms))}")


def select_layers(blocks: jax.Array, layers: Sequence[int], what: str = "layers") -> jax.Array:
    """``blocks[layers]`` in float32: ``[len(layers), batch, tokens, width]``."""
    layers = check_layers(blocks, layers, what)
    return jnp.stack([blocks[c] for c in layers]).astype(jnp.float32)


def cls_tokens(blocks: jax.Array, anchor_layers: Sequence[int]) -> jax.Array:
    """The cls token outputs at the anchor layers: ``[num_anchor_layers, batch, width]``, float32.

    This is what :func:`update_anchor` takes from the teacher (eq. 1).
    """
    return select_layers(blocks, anchor_layers, "anchor_layers")[:, :, 0, :]


def distill_loss(
    teacher_blocks: jax.Array, student_blocks: jax.Array, layers: Sequence[int], form: str
) -> jax.Array:
    """L_distill (METHOD.md "Losses" 1, paper eq. 3), summed over ``layers``, mean over the batch.

    ``"default"``: mean over all tokens of Diff_{c,p} (eq. 8).
    ``"paper"``: ||T_c - S_c||_F + sum_p (1 - cos(T_{c,p}, S_{c,p})) (eq. 3).
    """
    _check_form(form, DISTILL_FORMS, "distill_form")
    teacher = select_layers(teacher_blocks, layers, "teacher layers")
    student = select_layers(student_blocks, layers, "student layers")
    if form == "default":
        per_layer = jnp.mean(token_diff(teacher, student), axis=-1)  # [layers, batch]
    else:
        per_layer = l2_norm(teacher - student, axis=(-2, -1)) + jnp.sum(
            cosine_distance(teacher, student), axis=-1
        )
    return jnp.mean(jnp.sum(per_layer, axis=0))


def consecutive_pairs(layers: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """(3, 6, 9, 11) -> ((3, 6), (6, 9), (9, 11)); a single layer gives no pairs."""
    layers = tuple(int(c) for c in layers)
    return tuple(zip(layers[:-1], layers[1:], strict=True))


def gram_pairs(method_config: Any) -> tuple[tuple[int, int], ...]:
    """``method_config.gram_pairs``, or consecutive pairs of ``method_config.layers`` if empty."""
    pairs = tuple(method_config.gram_pairs)
    if not all(isinstance(pair, Sequence) and len(pair) == 2 for pair in pairs):
        raise FcdError(
            f"gram_pairs {pairs} must hold pairs of block indices, e.g. ((3, 6), (6, 9))"
        )
    pairs = tuple((int(first), int(second)) for first, second in pairs)
    return pairs or consecutive_pairs(method_config.layers)


def gram_loss(
    teacher_blocks: jax.Array,
    student_blocks: jax.Array,
    pairs: Sequence[tuple[int, int]],
    form: str,
) -> jax.Array:
    """L_Gram (METHOD.md "Losses" 3, paper eqs. 4-5), summed over ``pairs``, mean over the batch.

    G = phi_c1^T phi_c2 / N_tokens is a width x width matrix per image. ``"default"``:
    ||G_T - G_S||_F / width; ``"paper"``: ||G_T - G_S||_F. No pairs gives 0.

    G_T - G_S is one matmul, [T_c1, S_c1]^T [T_c2, -S_c2] over the 2 N stacked tokens, so only
    the difference (not G_T and G_S) is materialised.
    """
    _check_form(form, GRAM_FORMS, "gram_form")
    if not pairs:
        return jnp.zeros((), jnp.float32)
    firsts, seconds = zip(*pairs, strict=True)
    teacher_first = select_layers(teacher_blocks, firsts, "teacher gram_pairs")
    teacher_second = select_layers(teacher_blocks, seconds, "teacher gram_pairs")
    student_first = select_layers(student_blocks, firsts, "student gram_pairs")
    student_second = select_layers(student_blocks, seconds, "student gram_pairs")
    left = jnp.concatenate([teacher_first, student_first], axis=-2)
    right = jnp.concatenate([teacher_second, -student_second], axis=-2)
    num_tokens, width = teacher_first.shape[-2:]
    gram_diff = jnp.einsum(
        "lbnd,lbne->lbde", left, right, precision=jax.lax.Precision.HIGHEST
    ) / num_tokens
    per_pair = l2_norm(gram_diff, axis=(-2, -1))  # [pairs, batch]
    if form == "default":
        per_pair = per_pair / width
    return jnp.mean(jnp.sum(per_pair, axis=0))


def _checked_anchor(anchor: jax.Array, cls: jax.Array) -> jax.Array:
    """The anchor in float32 without gradient, after checking it fits ``cls`` [layers, batch, D]."""
    if anchor.shape != (cls.shape[0], cls.shape[-1]):
        raise FcdError(
            f"anchor has shape {anchor.shape} but the model gives {cls.shape[0]} anchor layers of "
            f"width {cls.shape[-1]}: initialise the anchor as [len(anchor_layers), width]"
        )
    return jax.lax.stop_gradient(anchor.astype(jnp.float32))


def anchor_distance(cls: jax.Array, anchor: jax.Array) -> jax.Array:
    """||cls - anchor||_2 per anchor layer and image: ``[num_anchor_layers, batch]`` (eqs. 2, 7).

    ``cls`` is ``[num_anchor_layers, batch, width]``; the anchor gets no gradient.
    """
    anchor = _checked_anchor(anchor, cls)
    return l2_norm(cls.astype(jnp.float32) - anchor[:, None, :])


def anchor_loss(
    student_blocks: jax.Array, anchor: jax.Array, anchor_layers: Sequence[int]
) -> jax.Array:
    """L_anchor = ||S_cls - anchor||_2 (METHOD.md "Losses" 2, paper eq. 2), summed over the anchor
    layers, mean over the batch. The anchor gets no gradient."""
    distance = anchor_distance(cls_tokens(student_blocks, anchor_layers), anchor)
    return jnp.mean(jnp.sum(distance, axis=0))


def update_anchor(
    anchor: jax.Array, num_seen: jax.Array, teacher_cls: jax.Array, method_config: Any
) -> jax.Array:
    """The anchor with one batch of teacher cls outputs folded in (METHOD.md "Losses" 2, eq. 1).

    ``teacher_cls``: ``[num_anchor_layers, batch, width]`` (see :func:`cls_tokens`); ``num_seen``:
    images folded in before this batch (a scalar; the train step derives it as step * batch).

    - ``anchor_update="mean"``: exact running mean, anchor += (batch_mean - anchor) * b / n_after,
      i.e. momentum 1 - n_before / n_after on the batch mean; after one pass over the data it is
      the mean of eq. 1 (the teacher is frozen).
    - ``anchor_update="ema"``: anchor = m * anchor + (1 - m) * batch_mean with
      m = ``anchor_momentum`` (the paper's sliding average); while ``num_seen == 0`` the anchor is
      set to the first batch's mean instead, so it does not start biased towards 0.

    No gradient flows through the update.
    """
    method = method_config.anchor_update
    _check_form(method, ANCHOR_UPDATES, "anchor_update")
    teacher_cls = jax.lax.stop_gradient(teacher_cls.astype(jnp.float32))
    anchor = _checked_anchor(anchor, teacher_cls)
    batch = teacher_cls.shape[1]
    batch_mean = jnp.mean(teacher_cls, axis=1)
    seen_before = jnp.asarray(num_seen).astype(jnp.float32)
    if method == "mean":
        new_anchor = anchor + (batch_mean - anchor) * (batch / (seen_before + batch))
    else:
        momentum = float(method_config.anchor_momentum)
        if not 0.0 <= momentum < 1.0:
            raise FcdError(f"anchor_momentum {momentum} must lie in [0, 1), e.g. 0.99")
        ema = momentum * anchor + (1.0 - momentum) * batch_mean
        new_anchor = jnp.where(seen_before == 0, batch_mean, ema)
    return new_anchor


def fcd_loss(
    teacher_blocks: jax.Array, student_blocks: jax.Array, anchor: jax.Array, config: Any
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L = L_distill + lam * (anchor_weight * L_anchor + gram_weight * L_Gram) (METHOD.md "Losses"
    4, paper eq. 6; the per-term weights of "The paper's ablations", Fig. 4; both 1 by default).

    ``teacher_blocks`` may hold only the first max(layers) + 1 blocks; ``anchor`` is
    ``[len(anchor_layers), width]``; ``config`` is ``config.method``. Returns the float32 loss and
    the metrics ``loss``, ``distill``, ``gram``, ``anchor``.
    """
    teacher_blocks = jax.lax.stop_gradient(teacher_blocks)
    distill = distill_loss(teacher_blocks, student_blocks, config.layers, config.distill_form)
    gram = gram_loss(teacher_blocks, student_blocks, gram_pairs(config), config.gram_form)
    anchor_term = anchor_loss(student_blocks, anchor, config.anchor_layers)
    weighted = float(config.anchor_weight) * anchor_term + float(config.gram_weight) * gram
    loss = distill + float(config.lam) * weighted
    return loss, {"loss": loss, "distill": distill, "gram": gram, "anchor": anchor_term}
