"""The FCD train step (METHOD.md "Losses", eq. 6): the teacher's features, the distillation step,
and the stacked step that production runs for any number of splits (one split: a stack of one).

uint8 images go in; each batch is preprocessed once, inside the step. The teacher's features
are computed in the step or read from the teacher cache (``fcd_jax.teacher_cache``), which holds
exactly what :func:`teacher_features` gives.

A CNN backbone (METHOD.md "The paper's ablations") runs through the same step: the teacher in
inference mode, the student's batch norm in training mode (its ``batch_stats`` updated in the
state), MKDAD's loss plus the anchor on GAP'd features (``fcd_jax.mkdad``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fcd_jax import mkdad, parallel
from fcd_jax.losses import fcd_loss, update_anchor
from fcd_jax.models import model_outputs
from fcd_jax.networks import Networks
from fcd_jax.preprocessing import preprocess
from fcd_jax.train_state import TrainState, learning_rate, make_optimizer


def teacher_features(teacher_params: dict, images: jax.Array, networks: Networks) -> Any:
    """The teacher's outputs at the blocks the losses read (``networks.plan.read``), without
    gradient: ``[len(read), batch, tokens, width]`` from preprocessed images; for a CNN the tuple
    of its taps ``read`` (``networks.TapPlan``), each ``[batch, h, w, channels]``."""
    outputs = model_outputs(networks.teacher, teacher_params, images)
    if networks.is_cnn:
        return jax.lax.stop_gradient(tuple(outputs["taps"][tap] for tap in networks.plan.read))
    return jax.lax.stop_gradient(outputs["blocks"][np.asarray(networks.plan.read)])


def features_from_cache(rows: Any, indices: jax.Array, networks: Networks) -> Any:
    """:func:`teacher_features` of the images ``indices`` from one split's teacher cache, whose
    rows hold one image each (``fcd_jax.teacher_cache``: the batch axis first)."""
    axis = networks.feature_batch_axis
    return jax.tree.map(lambda cached: jnp.moveaxis(cached[indices], 0, axis), rows)


def student_loss(
    params: Any, teacher_features: Any, images: jax.Array, anchor: jax.Array,
    method: ml_collections.ConfigDict, networks: Networks,
) -> tuple[jax.Array, tuple[dict[str, jax.Array], Any]]:
    """The loss of the student ``params`` (eq. 6; for a CNN MKDAD's + L_anchor) on the plan's
    renumbered indices ``method``, its metrics, and what the forward pass changed in ``params``:
    a CNN's ``batch_stats`` (batch norm in training mode), nothing ({}) for a ViT."""
    read = networks.plan.read
    if not networks.is_cnn:
        student_blocks = networks.student.apply({"params": params}, images)["blocks"]
        loss, metrics = fcd_loss(teacher_features, student_blocks[np.asarray(read)], anchor,
                                 method)
        return loss, (metrics, {})
    outputs, updates = networks.student.apply(
        params, images.astype(networks.student.dtype), train=True, mutable=["batch_stats"])
    student_taps = tuple(outputs["taps"][tap] for tap in read)
    loss, metrics = mkdad.mkdad_loss(teacher_features, student_taps, anchor, method)
    return loss, (metrics, dict(updates))


def anchor_features(teacher_features: Any, method: ml_collections.ConfigDict,
                    networks: Networks) -> jax.Array:
    """What the anchor averages (eq. 1): the teacher's cls tokens at the anchor layers, or a
    CNN's global-average-pooled last tap, ``[num_anchor_layers, batch, width]``."""
    if networks.is_cnn:
        return mkdad.gap_features(teacher_features)
    return teacher_features[np.asarray(method.anchor_layers), :, 0, :]


def distill_step(
    state: TrainState,
    teacher_blocks: Any,
    images: jax.Array,
    *,
    config: ml_collections.ConfigDict,
    networks: Networks,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One FCD step for one split, given the teacher's :func:`teacher_features` of the
    preprocessed ``images``: updated state and float32 metrics.

    The anchor is updated from this batch's teacher cls tokens before the loss uses it
    (METHOD.md "Losses" 2); the loss is eq. 6; gradients reach only the student. A CNN's
    ``teacher_blocks`` are its taps; its batch-norm statistics take the forward pass's update.
    """
    method = networks.plan.on_read().method(config.method)  # indices into teacher_blocks
    num_seen = state.step * images.shape[0]  # every step folds in one batch
    anchor = update_anchor(state.anchor, num_seen,
                           anchor_features(teacher_blocks, method, networks), method)

    def loss_fn(params):
        return student_loss(params, teacher_blocks, images, anchor, method, networks)

    (_, (metrics, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    tx = make_optimizer(config, state.params)
    directions, opt_state = tx.update(grads, state.opt_state, state.params)
    lr = learning_rate(state.step, state.total_steps, config.optim)
    params = jax.tree.map(lambda p, d: p - lr * d.astype(p.dtype), state.params, directions)
    if updates:  # batch_stats: frozen for the optimiser, they take the forward pass's update
        params = dict(params, **updates)
    metrics = dict(metrics, lr=lr, grad_norm=optax.tree.norm(grads))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              anchor=anchor)
    return new_state, metrics


def make_stacked_step(
    config: ml_collections.ConfigDict, networks: Networks, cached_teacher: bool = False,
    split_axis: int = 1,
) -> Callable[[TrainState, Any, Any], tuple[TrainState, dict]]:
    """The train step of S splits at once: one split's step mapped over the stack
    (``parallel.map_stack``: vectorised, or one split after another as ``config.stack_mode`` and
    the mesh's ``split_axis`` say), not yet jitted (:func:`stacked_train_step` is the compiled
    program).

    ``step(states, teacher_params, images uint8 [S, B, h, w, c])``; with ``cached_teacher``
    ``step(states, teacher_cache [S, N, L, T, D] (a CNN: a tuple of [S, N, h, w, c]), (images,
    indices [S, B] into the cache))``.
    A split that is not ``state.active`` (finished, or padding) keeps its state unchanged, so
    splits of different lengths train in one program exactly as they would alone.
    """

    def one_split(state, teacher, batch):
        images, indices = batch if cached_teacher else (batch, None)
        images = preprocess(images, config.data)
        if cached_teacher:
            teacher_blocks = features_from_cache(teacher, indices, networks)
        else:
            teacher_blocks = teacher_features(teacher, images, networks)
        new_state, metrics = distill_step(
            state, teacher_blocks, images, config=config, networks=networks
        )
        active = state.active
        new_state = jax.tree.map(lambda new, old: jnp.where(active, new, old), new_state, state)
        return new_state, metrics

    sequential = parallel.runs_in_sequence(config.stack_mode, split_axis)
    return parallel.map_stack(one_split, (0, 0 if cached_teacher else None, 0), sequential)


def stacked_train_step(
    config: ml_collections.ConfigDict, networks: Networks, mesh: jax.sharding.Mesh,
    cached_teacher: bool = False,
) -> Callable:
    """:func:`make_stacked_step` as one ``jax.jit`` with explicit shardings (states, batches and
    a teacher cache over ``split``, the teacher's parameters replicated) and the states donated.

    Built once per (config, networks, mesh): groups of one size trained one after another
    (``parallel_splits=N``) compile it once, not once per group.
    """
    stacked = parallel.stacked_sharding(mesh)

    def build():
        return jax.jit(
            make_stacked_step(config, networks, cached_teacher, mesh.shape[parallel.SPLIT]),
            in_shardings=(
                stacked, stacked if cached_teacher else parallel.replicated(mesh),
                parallel.batch_sharding(mesh),
            ),
            out_shardings=(stacked, stacked),
            donate_argnums=0,
        )

    key = ("step", ml_collections.FrozenConfigDict(config), networks, mesh, cached_teacher)
    return parallel.jit_once(key, build)
