"""The train state and the one jit-compiled FCD train step (METHOD.md "Losses", eq. 6).

A state holds one student: its parameters, the optimiser state, and the anchor (eq. 1-2) with the
count of images it averages. The teacher's parameters are an argument of the step, never part of
what the optimiser sees. Many splits train at once by stacking states on a leading axis and
``jax.vmap``-ing the same step (see ``fcd_jax.parallel``); one split is simply a stack of one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct

from fcd_jax.errors import FcdError
from fcd_jax.input_pipeline import preprocess
from fcd_jax.losses import fcd_loss, update_anchor
from fcd_jax.models import build_vit, truncate_params

FROZEN_POS_EMBEDDING = "copy_frozen"


class TrainState(struct.PyTreeNode):
    """Everything that changes during training of one student (or a stack of students)."""

    step: jax.Array  # int32 []: optimiser steps taken
    total_steps: jax.Array  # int32 []: steps this split trains for (drives the lr schedule)
    params: Any  # the student's parameters (a frozen position embedding included)
    opt_state: Any
    anchor: jax.Array  # float32 [num_anchor_layers, width]: running centre of T's cls (eq. 1)
    num_seen: jax.Array  # float32 []: training images averaged into the anchor so far


def teacher_depth(method_config: ml_collections.ConfigDict) -> int:
    """The teacher need not run past the last block that a loss or score reads."""
    return max(*method_config.layers, *method_config.anchor_layers) + 1


def build_models(config: ml_collections.ConfigDict) -> tuple[nn.Module, nn.Module]:
    """(teacher, student): the same ViT; the teacher stops after the last block it needs."""
    student = build_vit(config.model)
    if teacher_depth(config.method) > student.depth:
        raise FcdError(
            f"method.layers/anchor_layers reach block {teacher_depth(config.method) - 1} but the "
            f"model has {student.depth} blocks: use 0-based block indices below {student.depth}"
        )
    return student.clone(depth=teacher_depth(config.method)), student


def init_params(model: nn.Module, image_size: int, key: jax.Array) -> dict:
    """Random parameters of ``model`` for ``image_size`` x ``image_size`` RGB input."""
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    return model.init(key, images)["params"]


def learning_rate(step: jax.Array, total_steps: jax.Array, optim: ml_collections.ConfigDict):
    """Linear warmup to ``optim.lr`` over ``warmup_steps``, then constant or cosine to zero."""
    step = step.astype(jnp.float32)
    warmup = jnp.minimum(1.0, (step + 1.0) / max(optim.warmup_steps, 1))
    if optim.schedule == "constant":
        decay = 1.0
    elif optim.schedule == "cosine":
        decay_steps = jnp.maximum(total_steps - optim.warmup_steps, 1).astype(jnp.float32)
        progress = jnp.clip((step - optim.warmup_steps) / decay_steps, 0.0, 1.0)
        decay = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    else:
        raise FcdError(f"unknown optim.schedule {optim.schedule!r}: use 'constant' or 'cosine'")
    return optim.lr * warmup * decay


def trainable_labels(params: dict, method_config: ml_collections.ConfigDict) -> dict:
    """'frozen' for the position embedding copied from the teacher (paper Fig. 7, strategy 2)."""
    frozen = method_config.pos_embedding == FROZEN_POS_EMBEDDING
    labels = {name: jax.tree.map(lambda _: "train", leaf) for name, leaf in params.items()}
    if frozen:
        labels["pos_embedding"] = "frozen"
    return labels


def make_optimizer(config: ml_collections.ConfigDict, params: dict) -> optax.GradientTransformation:
    """Gradient direction without the learning rate (the step scales by ``learning_rate``).

    Clipping by global norm (METHOD.md "Stability") sees only the trainable parameters.
    """
    optim = config.optim
    parts = [optax.clip_by_global_norm(optim.clip_norm)] if optim.clip_norm > 0 else []
    if optim.weight_decay:
        parts.append(optax.add_decayed_weights(optim.weight_decay))
    if optim.name == "sgd":
        if optim.momentum:
            parts.append(optax.trace(decay=optim.momentum, nesterov=optim.nesterov))
    elif optim.name == "adam":
        parts.append(optax.scale_by_adam())
    else:
        raise FcdError(f"unknown optim.name {optim.name!r}: use 'sgd' or 'adam'")
    if config.method.pos_embedding not in (FROZEN_POS_EMBEDDING, "learned"):
        raise FcdError(
            f"unknown method.pos_embedding {config.method.pos_embedding!r}: "
            "use 'copy_frozen' or 'learned'"
        )
    return optax.multi_transform(
        {"train": optax.chain(*parts), "frozen": optax.set_to_zero()},
        trainable_labels(params, config.method),
    )


def create_train_state(
    config: ml_collections.ConfigDict,
    teacher_pos_embedding: jax.Array,
    student_model: nn.Module,
    key: jax.Array,
    total_steps: int | jax.Array,
) -> TrainState:
    """A fresh student: random weights, the teacher's position embedding copied in (Fig. 7)."""
    params = init_params(student_model, config.data.image_size, key)
    if config.method.pos_embedding == FROZEN_POS_EMBEDDING:
        if teacher_pos_embedding.shape != params["pos_embedding"].shape:
            raise FcdError(
                f"teacher position embedding {teacher_pos_embedding.shape} does not fit "
                f"the student {params['pos_embedding'].shape}: convert the teacher at "
                f"image_size={config.data.image_size}"
            )
        params = dict(params, pos_embedding=jnp.asarray(teacher_pos_embedding, jnp.float32))
    width = params["cls"].shape[-1]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        total_steps=jnp.asarray(total_steps, jnp.int32),
        params=params,
        opt_state=make_optimizer(config, params).init(params),
        anchor=jnp.zeros((len(config.method.anchor_layers), width), jnp.float32),
        num_seen=jnp.zeros((), jnp.float32),
    )


def prepare_teacher_params(teacher_params: dict, method_config: ml_collections.ConfigDict) -> dict:
    """The teacher's parameters truncated to the blocks the method reads."""
    return truncate_params(teacher_params, teacher_depth(method_config))


def train_step(
    state: TrainState,
    teacher_params: dict,
    images: jax.Array,
    *,
    config: ml_collections.ConfigDict,
    teacher_model: nn.Module,
    student_model: nn.Module,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One FCD step for one split: uint8 images in, updated state and float32 metrics out.

    The anchor is updated from this batch's teacher cls tokens before the loss uses it
    (METHOD.md "Losses" 2); the loss is eq. 6; gradients reach only the student.
    """
    images = preprocess(images, config.data.image_size, config.data.mean, config.data.std)
    teacher_images = images.astype(teacher_model.dtype)
    teacher_blocks = jax.lax.stop_gradient(
        teacher_model.apply({"params": teacher_params}, teacher_images)["blocks"]
    )
    teacher_cls = teacher_blocks[np.asarray(config.method.anchor_layers), :, 0, :]
    anchor, num_seen = update_anchor(state.anchor, state.num_seen, teacher_cls, config.method)

    def loss_fn(params):
        student_blocks = student_model.apply({"params": params}, images)["blocks"]
        return fcd_loss(teacher_blocks, student_blocks, anchor, config.method)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    tx = make_optimizer(config, state.params)
    directions, opt_state = tx.update(grads, state.opt_state, state.params)
    lr = learning_rate(state.step, state.total_steps, config.optim)
    params = jax.tree.map(lambda p, d: p - lr * d.astype(p.dtype), state.params, directions)
    metrics = dict(metrics, lr=lr, grad_norm=optax.global_norm(grads))
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state, anchor=anchor, num_seen=num_seen
    )
    return new_state, metrics


def make_stacked_train_step(
    config: ml_collections.ConfigDict, teacher_model: nn.Module, student_model: nn.Module
) -> Callable[[TrainState, dict, jax.Array, jax.Array], tuple[TrainState, dict]]:
    """``train_step`` vmapped over a leading split axis, not yet jitted (see ``fcd_jax.parallel``).

    ``step(states, teacher_params, images [S, B, h, w, c], active bool [S])``: a split that is not
    ``active`` (finished, or padding) keeps its state unchanged, so splits of different lengths
    train in one program exactly as they would alone.
    """

    def one_split(state, teacher_params, images, active):
        new_state, metrics = train_step(
            state, teacher_params, images,
            config=config, teacher_model=teacher_model, student_model=student_model,
        )
        new_state = jax.tree.map(lambda new, old: jnp.where(active, new, old), new_state, state)
        return new_state, metrics

    return jax.vmap(one_split, in_axes=(0, None, 0, 0))


def make_train_step(
    config: ml_collections.ConfigDict, teacher_model: nn.Module, student_model: nn.Module
) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]:
    """The single-split ``train_step`` as one ``jax.jit`` with the state donated."""
    step = functools.partial(
        train_step, config=config, teacher_model=teacher_model, student_model=student_model
    )
    return jax.jit(step, donate_argnums=0)
