"""The FCD train step (METHOD.md "Losses", eq. 6): the teacher's features, the distillation step,
and the stacked step that production runs for any number of splits (one split: a stack of one).

uint8 images go in; each batch is preprocessed once, inside the step. The teacher's features
are computed in the step or read from the teacher cache (``fcd_jax.teacher_cache``), which holds
exactly what :func:`teacher_features` gives.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fcd_jax import parallel
from fcd_jax.losses import fcd_loss, update_anchor
from fcd_jax.networks import Networks
from fcd_jax.preprocessing import preprocess
from fcd_jax.train_state import TrainState, learning_rate, make_optimizer


def teacher_features(teacher_params: dict, images: jax.Array, networks: Networks) -> jax.Array:
    """The teacher's outputs at the blocks the losses read (``networks.plan.read``), without
    gradient: ``[len(read), batch, tokens, width]`` from preprocessed images."""
    teacher = networks.teacher
    blocks = teacher.apply({"params": teacher_params}, images.astype(teacher.dtype))["blocks"]
    return jax.lax.stop_gradient(blocks[np.asarray(networks.plan.read)])


def distill_step(
    state: TrainState,
    teacher_blocks: jax.Array,
    images: jax.Array,
    *,
    config: ml_collections.ConfigDict,
    networks: Networks,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One FCD step for one split, given the teacher's :func:`teacher_features` of the
    preprocessed ``images``: updated state and float32 metrics.

    The anchor is updated from this batch's teacher cls tokens before the loss uses it
    (METHOD.md "Losses" 2); the loss is eq. 6; gradients reach only the student.
    """
    plan = networks.plan
    method = plan.on_read().method(config.method)  # block indices into teacher_blocks
    teacher_cls = teacher_blocks[np.asarray(method.anchor_layers), :, 0, :]
    num_seen = state.step * images.shape[0]  # every step folds in one batch
    anchor = update_anchor(state.anchor, num_seen, teacher_cls, method)

    def loss_fn(params):
        student_blocks = networks.student.apply({"params": params}, images)["blocks"]
        return fcd_loss(teacher_blocks, student_blocks[np.asarray(plan.read)], anchor, method)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    tx = make_optimizer(config, state.params)
    directions, opt_state = tx.update(grads, state.opt_state, state.params)
    lr = learning_rate(state.step, state.total_steps, config.optim)
    params = jax.tree.map(lambda p, d: p - lr * d.astype(p.dtype), state.params, directions)
    metrics = dict(metrics, lr=lr, grad_norm=optax.tree.norm(grads))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              anchor=anchor)
    return new_state, metrics


def make_stacked_step(
    config: ml_collections.ConfigDict, networks: Networks, cached_teacher: bool = False
) -> Callable[[TrainState, Any, Any], tuple[TrainState, dict]]:
    """The train step of S splits at once: one split's step ``jax.vmap``-ed over the stack, not
    yet jitted (:func:`stacked_train_step` is the compiled program).

    ``step(states, teacher_params, images uint8 [S, B, h, w, c])``; with ``cached_teacher``
    ``step(states, teacher_cache [S, N, L, T, D], (images, indices [S, B] into the cache))``.
    A split that is not ``state.active`` (finished, or padding) keeps its state unchanged, so
    splits of different lengths train in one program exactly as they would alone.
    """

    def one_split(state, teacher, batch):
        images, indices = batch if cached_teacher else (batch, None)
        images = preprocess(images, config.data)
        if cached_teacher:
            teacher_blocks = jnp.swapaxes(teacher[indices], 0, 1)  # [L, B, tokens, width]
        else:
            teacher_blocks = teacher_features(teacher, images, networks)
        new_state, metrics = distill_step(
            state, teacher_blocks, images, config=config, networks=networks
        )
        active = state.active
        new_state = jax.tree.map(lambda new, old: jnp.where(active, new, old), new_state, state)
        return new_state, metrics

    return jax.vmap(one_split, in_axes=(0, 0 if cached_teacher else None, 0))


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
            make_stacked_step(config, networks, cached_teacher),
            in_shardings=(
                stacked, stacked if cached_teacher else parallel.replicated(mesh),
                parallel.batch_sharding(mesh),
            ),
            out_shardings=(stacked, stacked),
            donate_argnums=0,
        )

    key = ("step", ml_collections.FrozenConfigDict(config), networks, mesh, cached_teacher)
    return parallel.jit_once(key, build)
