"""The train state of a student and what moves it: the optimiser and the learning-rate schedule.

A state holds one student: its parameters, the optimiser state, the anchor (METHOD.md "Losses"
2, eq. 1) and the step count; what follows from them is derived, not stored (the images averaged
into the anchor: ``step * batch``; whether the split still trains: ``step < total_steps``). The
teacher's parameters are never part of it. Many splits train at once as states stacked on a
leading axis (:func:`init_stacked_states`), sharded over the mesh's ``split`` axis.

A CNN student's params are its Flax variables (``networks.init_model``): ``params``, which the
optimiser trains, and ``batch_stats``, the batch-norm running statistics, which it does not (the
train step writes their update): so they are checkpointed, saved with the final model and read
by the score step with the rest.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct

from fcd_jax import parallel
from fcd_jax.errors import FcdError
from fcd_jax.input_pipeline import steps_per_epoch
from fcd_jax.networks import Networks, init_model, split_keys

FROZEN_POS_EMBEDDING = "copy_frozen"


class TrainState(struct.PyTreeNode):
    """Everything that changes during training of one student (or a stack of students)."""

    step: jax.Array  # int32 []: optimiser steps taken
    total_steps: jax.Array  # int32 []: steps this split trains for (drives the lr schedule)
    params: Any  # the student's parameters (a frozen position embedding, a CNN's batch_stats)
    opt_state: Any
    anchor: jax.Array  # float32 [num_anchor_layers, width]: running centre of T's cls (eq. 1)
    # (a CNN: [1, channels], the running centre of the teacher's GAP'd last tap)

    @property
    def active(self) -> jax.Array:
        """Whether the split still trains (a finished or padding split keeps its state)."""
        return self.step < self.total_steps


def total_steps_for(config: ml_collections.ConfigDict, num_train_images: int) -> int:
    """``train.steps`` if set, else ``train.epochs`` passes over this split's training images."""
    if config.train.steps > 0:
        return int(config.train.steps)
    return int(config.train.epochs) * steps_per_epoch(num_train_images, config.data.batch_size)


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
    """'frozen' for the position embedding copied from the teacher (paper Fig. 7, strategy 2)
    and for a CNN's batch-norm statistics (``batch_stats``: the step writes them)."""
    frozen = method_config.pos_embedding == FROZEN_POS_EMBEDDING
    labels = {name: jax.tree.map(lambda _: "train", leaf) for name, leaf in params.items()}
    if frozen and "pos_embedding" in labels:
        labels["pos_embedding"] = "frozen"
    if "batch_stats" in labels:
        labels["batch_stats"] = jax.tree.map(lambda _: "frozen", params["batch_stats"])
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
    train = optax.chain(*parts) if parts else optax.identity()  # optax.chain() needs a part
    return optax.multi_transform(
        {"train": train, "frozen": optax.set_to_zero()},
        trainable_labels(params, config.method),
    )


def teacher_pos_embedding_of(teacher: Mapping | jax.Array | None) -> jax.Array | None:
    """The teacher's position embedding from its params (a CNN's have none: None), or the
    embedding itself (what callers passed before CNNs)."""
    if isinstance(teacher, Mapping):
        return teacher.get("pos_embedding")
    return teacher


def create_train_state(
    config: ml_collections.ConfigDict,
    teacher_pos_embedding: Mapping | jax.Array | None,
    networks: Networks,
    key: jax.Array,
    total_steps: int | jax.Array,
) -> TrainState:
    """A fresh student: random weights, the teacher's position embedding copied in (Fig. 7).

    ``teacher_pos_embedding``: the teacher's params (``Networks.teacher_params``; a CNN's have no
    position embedding) or, as before CNNs, its ``pos_embedding`` array.
    """
    params = init_model(networks.student, config.data.image_size, key)
    teacher_pos_embedding = teacher_pos_embedding_of(teacher_pos_embedding)
    if not networks.is_cnn and config.method.pos_embedding == FROZEN_POS_EMBEDDING:
        if teacher_pos_embedding.shape != params["pos_embedding"].shape:
            raise FcdError(
                f"teacher position embedding {teacher_pos_embedding.shape} does not fit "
                f"the student {params['pos_embedding'].shape}: convert the teacher at "
                f"image_size={config.data.image_size}"
            )
        # A copy: the state is donated to the step, the teacher's parameters are not.
        pos_embedding = jnp.array(teacher_pos_embedding, jnp.float32, copy=True)
        params = dict(params, pos_embedding=pos_embedding)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        total_steps=jnp.asarray(total_steps, jnp.int32),
        params=params,
        opt_state=make_optimizer(config, params).init(params),
        anchor=jnp.zeros(networks.anchor_shape(config.data.image_size), jnp.float32),
    )


def init_stacked_states(
    config: ml_collections.ConfigDict,
    teacher_pos_embedding: Mapping | jax.Array | None,
    networks: Networks,
    split_indices: np.ndarray,
    total_steps: np.ndarray,
    mesh: jax.sharding.Mesh,
) -> TrainState:
    """One fresh student per split, stacked and created directly with its sharding (every leaf
    over ``split``: ``parallel.stacked_sharding``).

    Student ``i``'s weights depend only on the seed and its split index, so a split trains the
    same alone or in a group. ``teacher_pos_embedding``: as in :func:`create_train_state`.
    """
    teacher_pos_embedding = teacher_pos_embedding_of(teacher_pos_embedding)
    _, student_key = split_keys(config.seed)

    def init(split_index, total, pos_embedding):
        key = jax.random.fold_in(student_key, split_index)
        return create_train_state(config, pos_embedding, networks, key, total)

    stacked_init = parallel.jit_once(
        ("init", ml_collections.FrozenConfigDict(config), networks, mesh),
        lambda: jax.jit(
            jax.vmap(init, in_axes=(0, 0, None)), out_shardings=parallel.stacked_sharding(mesh)
        ),
    )
    return stacked_init(
        jnp.asarray(split_indices, jnp.int32), jnp.asarray(total_steps, jnp.int32),
        teacher_pos_embedding,
    )
