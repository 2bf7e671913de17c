"""The train state and the one jit-compiled FCD train step (METHOD.md "Losses", eq. 6).

A state holds one student: its parameters, the optimiser state, and the anchor (eq. 1-2) with the
count of images it averages. The teacher's parameters are an argument of the step, never part of
what the optimiser sees. Many splits train at once by stacking states on a leading axis and
``jax.vmap``-ing the same step (see ``fcd_jax.parallel``); one split is simply a stack of one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import struct
from jax.experimental import multihost_utils
from tensorboardX import SummaryWriter
from tqdm.auto import tqdm

from fcd_jax import checkpoints, parallel, reports
from fcd_jax.datasets.split import Split
from fcd_jax.errors import FcdError, TrainingError
from fcd_jax.evaluate import evaluate_split, make_score_step
from fcd_jax.input_pipeline import (
    list_splits,
    load_split,
    prefetch,
    preprocess,
    steps_per_epoch,
    train_batches,
)
from fcd_jax.losses import fcd_loss, loss_blocks, on_loss_blocks, update_anchor
from fcd_jax.models import build_vit, init_params, truncate_params
from fcd_jax.teacher import load_teacher

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
    train = optax.chain(*parts) if parts else optax.identity()  # optax.chain() needs a part
    return optax.multi_transform(
        {"train": train, "frozen": optax.set_to_zero()},
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
        # A copy: the state is donated to the step, the teacher's parameters are not.
        pos_embedding = jnp.array(teacher_pos_embedding, jnp.float32, copy=True)
        params = dict(params, pos_embedding=pos_embedding)
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


def teacher_features(
    teacher_params: dict,
    images: jax.Array,
    *,
    config: ml_collections.ConfigDict,
    teacher_model: nn.Module,
) -> jax.Array:
    """The teacher's outputs at the blocks the losses read (``losses.loss_blocks``), without
    gradient: ``[num_loss_blocks, batch, tokens, width]`` from uint8 images."""
    images = preprocess(images, config.data.image_size, config.data.mean, config.data.std)
    blocks = teacher_model.apply({"params": teacher_params}, images.astype(teacher_model.dtype))
    return jax.lax.stop_gradient(blocks["blocks"][np.asarray(loss_blocks(config.method))])


def distill_step(
    state: TrainState,
    teacher_blocks: jax.Array,
    images: jax.Array,
    *,
    config: ml_collections.ConfigDict,
    student_model: nn.Module,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One FCD step for one split, given the teacher's ``teacher_features`` of ``images``
    (computed in the step, or read from the teacher cache): updated state and float32 metrics.

    The anchor is updated from this batch's teacher cls tokens before the loss uses it
    (METHOD.md "Losses" 2); the loss is eq. 6; gradients reach only the student.
    """
    images = preprocess(images, config.data.image_size, config.data.mean, config.data.std)
    method = on_loss_blocks(config.method)  # block indices into teacher_blocks
    teacher_cls = teacher_blocks[np.asarray(method.anchor_layers), :, 0, :]
    anchor, num_seen = update_anchor(state.anchor, state.num_seen, teacher_cls, method)
    student_blocks_read = np.asarray(loss_blocks(config.method))

    def loss_fn(params):
        student_blocks = student_model.apply({"params": params}, images)["blocks"]
        return fcd_loss(teacher_blocks, student_blocks[student_blocks_read], anchor, method)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    tx = make_optimizer(config, state.params)
    directions, opt_state = tx.update(grads, state.opt_state, state.params)
    lr = learning_rate(state.step, state.total_steps, config.optim)
    params = jax.tree.map(lambda p, d: p - lr * d.astype(p.dtype), state.params, directions)
    metrics = dict(metrics, lr=lr, grad_norm=optax.tree.norm(grads))
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state, anchor=anchor, num_seen=num_seen
    )
    return new_state, metrics


def train_step(
    state: TrainState,
    teacher_params: dict,
    images: jax.Array,
    *,
    config: ml_collections.ConfigDict,
    teacher_model: nn.Module,
    student_model: nn.Module,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One FCD step for one split: uint8 images in, updated state and float32 metrics out
    (the teacher forward, then ``distill_step``)."""
    teacher_blocks = teacher_features(
        teacher_params, images, config=config, teacher_model=teacher_model
    )
    return distill_step(state, teacher_blocks, images, config=config, student_model=student_model)


def make_stacked_train_step(
    config: ml_collections.ConfigDict,
    teacher_model: nn.Module,
    student_model: nn.Module,
    cached_teacher: bool = False,
) -> Callable[[TrainState, Any, Any, jax.Array], tuple[TrainState, dict]]:
    """``train_step`` vmapped over a leading split axis, not yet jitted (see ``fcd_jax.parallel``).

    ``step(states, teacher_params, images [S, B, h, w, c], active bool [S])``: a split that is not
    ``active`` (finished, or padding) keeps its state unchanged, so splits of different lengths
    train in one program exactly as they would alone. With ``cached_teacher`` the teacher's
    features are read, not computed: ``step(states, teacher_cache [S, N, L, T, D] (see
    ``GroupTrainer.teacher_cache``), (images, indices [S, B] into the cache), active)``.
    """

    def one_split(state, teacher, batch, active):
        if cached_teacher:
            images, indices = batch
            teacher_blocks = jnp.swapaxes(teacher[indices], 0, 1)  # [L, B, tokens, width]
        else:
            images = batch
            teacher_blocks = teacher_features(
                teacher, images, config=config, teacher_model=teacher_model
            )
        new_state, metrics = distill_step(
            state, teacher_blocks, images, config=config, student_model=student_model
        )
        new_state = jax.tree.map(lambda new, old: jnp.where(active, new, old), new_state, state)
        return new_state, metrics

    return jax.vmap(one_split, in_axes=(0, 0 if cached_teacher else None, 0, 0))


def make_train_step(
    config: ml_collections.ConfigDict, teacher_model: nn.Module, student_model: nn.Module
) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]:
    """The single-split ``train_step`` as one ``jax.jit`` with the state donated."""
    step = functools.partial(
        train_step, config=config, teacher_model=teacher_model, student_model=student_model
    )
    return jax.jit(step, donate_argnums=0)


# --------------------------------------------------------------------------------------------
# The experiment: every split of a dataset, trained in groups, checkpointed, scored, reported.
# --------------------------------------------------------------------------------------------

def split_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(teacher key, base key of the students); student ``i`` uses ``fold_in(base, i)``."""
    teacher_key, student_key = jax.random.split(jax.random.key(seed))
    return teacher_key, student_key


def total_steps_for(config: ml_collections.ConfigDict, num_train_images: int) -> int:
    """``train.steps`` if set, else ``train.epochs`` passes over this split's training images."""
    if config.train.steps > 0:
        return int(config.train.steps)
    return int(config.train.epochs) * steps_per_epoch(num_train_images, config.data.batch_size)


def init_stacked_states(
    config: ml_collections.ConfigDict,
    teacher_pos_embedding: jax.Array,
    student_model: nn.Module,
    split_indices: np.ndarray,
    total_steps: np.ndarray,
    mesh: jax.sharding.Mesh,
) -> TrainState:
    """One fresh student per split, stacked and created directly with its sharding (every leaf
    over ``split``: ``parallel.stacked_sharding``).

    Student ``i``'s weights depend only on the seed and its split index, so a split trains the
    same alone or in a group.
    """
    _, student_key = split_keys(config.seed)

    def init(split_index, total, pos_embedding):
        key = jax.random.fold_in(student_key, split_index)
        return create_train_state(config, pos_embedding, student_model, key, total)

    stacked_init = parallel.jit_once(
        ("init", ml_collections.FrozenConfigDict(config), student_model, mesh),
        lambda: jax.jit(
            jax.vmap(init, in_axes=(0, 0, None)), out_shardings=parallel.stacked_sharding(mesh)
        ),
    )
    return stacked_init(
        jnp.asarray(split_indices, jnp.int32), jnp.asarray(total_steps, jnp.int32),
        teacher_pos_embedding,
    )


def select_splits(config: ml_collections.ConfigDict) -> list[str]:
    """The dataset's run names, restricted to ``config.splits`` unless it is "all"."""
    names = list_splits(config.data)
    if config.splits in ("all", "", None):
        return names
    wanted = [name.strip() for name in str(config.splits).split(",") if name.strip()]
    unknown = [name for name in wanted if name not in names]
    if unknown:
        raise FcdError(
            f"unknown split(s) {', '.join(unknown)} for dataset {config.data.name}: "
            f"choose from {', '.join(names)}"
        )
    return wanted


def group_size_for(config: ml_collections.ConfigDict, num_splits: int) -> int:
    """How many splits train together: ``parallel_splits`` as an int, or "auto" (see
    ``auto_parallel_splits``: the most that fit the device memory)."""
    value = str(config.parallel_splits).strip()
    if value == "auto":
        return auto_parallel_splits(config, num_splits)
    if not value.isdigit() or int(value) < 1:
        raise FcdError(f"parallel_splits={value!r}: use 'auto' or a positive integer")
    return min(int(value), num_splits)


class GroupTrainer:
    """Trains a group of splits as one stacked, sharded, checkpointed program."""

    @staticmethod
    def stacked_step(
        config: ml_collections.ConfigDict, teacher_model: nn.Module, student_model: nn.Module,
        mesh: jax.sharding.Mesh, cached_teacher: bool = False,
    ) -> Callable:
        """The jitted stacked step, one per (config, models, mesh): groups of one size trained
        one after another (``parallel_splits=N``) compile it once, not once per group."""
        stacked = parallel.stacked_sharding(mesh)
        return parallel.jit_once(
            ("step", ml_collections.FrozenConfigDict(config), teacher_model, student_model, mesh,
             cached_teacher),
            lambda: parallel.jit_stacked_step(
                make_stacked_train_step(config, teacher_model, student_model, cached_teacher),
                mesh, stacked, teacher_sharding=stacked if cached_teacher else None,
            ),
        )

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        workdir: str,
        splits: list[Split],
        split_indices: list[int],
        teacher_params: dict,
        teacher_model: nn.Module,
        student_model: nn.Module,
        group_size: int | None = None,
    ):
        """``group_size``: the stack is sized for this many splits (a smaller last group is
        padded to it, so it reuses the compiled programs of the full groups)."""
        self.config = config
        self.splits = splits
        group_size = max(group_size or len(splits), len(splits))
        self.mesh = parallel.make_mesh(group_size, config.data.batch_size, config.mesh_shape)
        self.num_stacked = parallel.padded_num_splits(group_size, self.mesh)
        padding = self.num_stacked - len(splits)
        self.totals = np.asarray(
            [total_steps_for(config, len(split.train_images)) for split in splits] + [0] * padding,
            np.int32,
        )
        indices = np.asarray(list(split_indices) + [split_indices[0]] * padding, np.int32)
        self.teacher_params = jax.device_put(teacher_params, parallel.replicated(self.mesh))
        self.states = init_stacked_states(
            config, self.teacher_params["pos_embedding"], student_model, indices, self.totals,
            self.mesh,
        )
        self.teacher_model = teacher_model
        self.cached_teacher = self.use_teacher_cache()
        self.step_fn = self.stacked_step(
            config, teacher_model, student_model, self.mesh, self.cached_teacher
        )
        group_name = "+".join(split.name for split in splits)
        if len(group_name) > 80:
            group_name = f"{splits[0].name}+{len(splits) - 1}_more"
        self.checkpoints = checkpoints.training_manager(
            os.path.join(workdir, "checkpoints", file_name(group_name))
        )
        self.writers = (
            {split.name: SummaryWriter(os.path.join(workdir, "tensorboard", file_name(split.name)))
             for split in splits}
            if jax.process_index() == 0 else {}
        )

    @functools.cached_property
    def cached_image_features(self) -> jax.ShapeDtypeStruct:
        """Shape and dtype of one image's entry in ``teacher_cache``: ``[L, tokens, width]``."""
        features = jax.eval_shape(
            functools.partial(teacher_features, config=self.config,
                              teacher_model=self.teacher_model),
            self.teacher_params,
            jax.ShapeDtypeStruct((1, *self.global_batch_shape()[2:]), jnp.uint8),
        )
        return jax.ShapeDtypeStruct(
            (features.shape[0], *features.shape[2:]), features.dtype
        )

    def teacher_cache_bytes(self) -> int:
        """Device memory per device of ``teacher_cache``."""
        per_image = self.cached_image_features
        splits_per_device = self.num_stacked // self.mesh.shape[parallel.SPLIT]
        return (splits_per_device * self.cache_length() * math.prod(per_image.shape)
                * jnp.dtype(per_image.dtype).itemsize)

    def cache_length(self) -> int:
        """Images per split in the teacher cache: the largest training set, in whole batches."""
        batch = self.config.data.batch_size
        return -(-max(len(split.train_images) for split in self.splits) // batch) * batch

    def use_teacher_cache(self) -> bool:
        """``train.teacher_cache``: "on", "off", or "auto" = when the group sees its training
        images more than once and the train step (XLA's memory analysis, as for
        ``parallel_splits="auto"``) and the cache together fit 90% of a device's memory."""
        setting = str(self.config.train.teacher_cache)
        if setting not in ("auto", "on", "off"):
            raise FcdError(
                f"train.teacher_cache={setting!r}: use 'auto', 'on' or 'off'"
            )
        use = setting == "on"
        if setting == "auto":
            images_seen = int(self.totals.max()) * self.config.data.batch_size
            if images_seen > max(len(split.train_images) for split in self.splits):
                step = step_memory_bytes(
                    self.config, self.num_stacked // self.mesh.shape[parallel.SPLIT],
                    self.config.data.batch_size // self.mesh.shape[parallel.DATA],
                )
                use = step + self.teacher_cache_bytes() <= 0.9 * device_memory_bytes()
            # Every process must run the same program: process 0's measurement decides.
            use = bool(multihost_utils.broadcast_one_to_all(np.bool_(use)))
        logging.info(
            "teacher cache %s (train.teacher_cache=%s): %.2f GiB per device",
            "on" if use else "off", setting, self.teacher_cache_bytes() / 2**30,
        )
        return use

    def teacher_cache(self) -> jax.Array:
        """The teacher's features (``teacher_features``) of every training image of every split
        of the group, on the devices of its split: ``[S, N, L, tokens, width]``, N =
        ``cache_length()``, image ``i`` of split ``s`` at ``[s, i]``.

        The teacher is frozen and the step has no augmentation, so these are what the step would
        compute; the step then reads them instead of running the teacher (1/4 of its FLOPs).
        Computed once per group, batch by batch (also on resume: it is not checkpointed).
        """
        config, mesh = self.config, self.mesh
        batch, length = config.data.batch_size, self.cache_length()
        global_shape = self.global_batch_shape()
        image_shape = global_shape[2:]
        stacked, batched = parallel.stacked_sharding(mesh), parallel.batch_sharding(mesh)
        features = functools.partial(
            teacher_features, config=config, teacher_model=self.teacher_model
        )
        per_image = self.cached_image_features

        def fill_batch(cache, teacher_params, images, start):
            new = jax.vmap(features, in_axes=(None, 0))(teacher_params, images)
            return jax.lax.dynamic_update_slice_in_dim(cache, jnp.swapaxes(new, 1, 2), start, 1)

        fill = parallel.jit_once(
            ("cache", ml_collections.FrozenConfigDict(config), self.teacher_model, mesh),
            lambda: jax.jit(
                fill_batch, in_shardings=(stacked, parallel.replicated(mesh), batched, None),
                out_shardings=stacked, donate_argnums=0,
            ),
        )
        cache_shape = (self.num_stacked, length, *per_image.shape)
        zeros = parallel.jit_once(
            ("cache_zeros", cache_shape, per_image.dtype, mesh),
            lambda: jax.jit(lambda: jnp.zeros(cache_shape, per_image.dtype),
                            out_shardings=stacked),
        )
        cache = zeros()
        split_rows, batch_rows = parallel.local_block(batched, global_shape)
        for start in tqdm(
            range(0, length, batch), desc="teacher cache", unit="batch", leave=False,
            disable=jax.process_index() != 0, dynamic_ncols=True,
        ):
            local = np.zeros(
                (split_rows.stop - split_rows.start, batch_rows.stop - batch_rows.start,
                 *image_shape), np.uint8,
            )
            for index in range(split_rows.start, min(split_rows.stop, len(self.splits))):
                source = self.splits[index].train_images
                wanted = np.arange(start + batch_rows.start, start + batch_rows.stop)
                wanted = wanted[wanted < len(source)]
                local[index - split_rows.start, : len(wanted)] = source.get_batch(wanted)
            images = parallel.global_array(local, batched, global_shape)
            cache = fill(cache, self.teacher_params, images, np.int32(start))
        return cache

    def global_batch_shape(self) -> tuple[int, ...]:
        image_shape = self.splits[0].train_images.image_shape
        return (self.num_stacked, self.config.data.batch_size, *image_shape)

    def batch_streams(
        self, start_step: int
    ) -> dict[int, Iterator[tuple[np.ndarray, np.ndarray]]]:
        """This process's rows of every batch, ``(images, indices)``, for the splits it holds
        (padding splits: none)."""
        split_rows, batch_rows = parallel.local_block(
            parallel.batch_sharding(self.mesh), self.global_batch_shape()
        )
        rows = batch_rows.stop - batch_rows.start
        streams = {}
        for index in range(split_rows.start, split_rows.stop):
            if index < len(self.splits):
                streams[index] = train_batches(
                    self.splits[index].train_images, self.config.data.batch_size,
                    seed=self.config.seed, start_step=start_step,
                    process_index=batch_rows.start // rows,
                    process_count=self.config.data.batch_size // rows,
                    with_indices=True,
                )
        self.local_rows = (split_rows, rows)
        return streams

    def global_batches(self, start_step: int, stop_step: int) -> Iterator[Any]:
        """The global uint8 batches ``[S, B, h, w, c]`` of steps ``start_step..stop_step - 1``
        (with the teacher cache: ``(images, indices [S, B])``), each process loading only its
        block; prefetched in a background thread so that the device does not wait for the host."""
        streams = self.batch_streams(start_step)
        split_rows, rows = self.local_rows
        global_shape = self.global_batch_shape()
        sharding = parallel.batch_sharding(self.mesh)

        def produce():
            for _ in range(start_step, stop_step):
                local = np.zeros((split_rows.stop - split_rows.start, rows, *global_shape[2:]),
                                 np.uint8)
                local_indices = np.zeros(local.shape[:2], np.int32)
                for index, stream in streams.items():
                    local[index - split_rows.start], local_indices[index - split_rows.start] = (
                        next(stream)
                    )
                images = parallel.global_array(local, sharding, global_shape)
                if self.cached_teacher:
                    yield images, parallel.global_array(local_indices, sharding, global_shape[:2])
                else:
                    yield images

        return prefetch(produce(), size=2)

    def check_finite(self, losses: np.ndarray, step: int, active: np.ndarray) -> None:
        for split, loss, is_active in zip(self.splits, losses, active, strict=False):
            if is_active and not np.isfinite(loss):
                self.checkpoints.wait_until_finished()  # keep what was written so far
                kept = self.checkpoints.latest_step()
                raise TrainingError(
                    f"run {split.name}: the loss became {loss} at step {step}; lower "
                    f"--config.optim.lr or keep --config.optim.clip_norm=1.0 ("
                    + ("no checkpoint was written yet" if kept is None else
                       f"checkpoints up to step {kept} are kept in {self.checkpoints.directory};"
                       " a rerun resumes from them: delete it or use another --workdir to start"
                       " afresh")
                    + ")"
                )

    def train(self) -> None:
        self.states, restored = checkpoints.restore_latest(self.checkpoints, self.states)
        start = int(restored or 0)
        last = int(self.totals.max())
        if restored is not None:
            logging.info("resuming %s at step %d of %d", self.checkpoints.directory, start, last)
        names = ", ".join(split.name for split in self.splits)
        with tqdm(
            total=last, initial=start, desc=f"train {names}"[:60], unit="step",
            disable=jax.process_index() != 0, dynamic_ncols=True,
        ) as bar:
            self.run_steps(start, last, bar)
        self.checkpoints.wait_until_finished()
        for writer in self.writers.values():
            writer.flush()

    def run_steps(self, start: int, last: int, bar: tqdm) -> None:
        """Steps ``start`` to ``last``: log, check for NaN and save on the configured steps only
        (the loop never waits for the device otherwise)."""
        config = self.config
        images_per_step = len(self.splits) * config.data.batch_size
        active_sharding = parallel.stacked_sharding(self.mesh)
        teacher = (
            self.teacher_cache() if self.cached_teacher and start < last else self.teacher_params
        )
        tick, tick_step = time.perf_counter(), start
        for step, batch in zip(range(start, last), self.global_batches(start, last), strict=True):
            active_np = step < self.totals
            active = jax.device_put(active_np, active_sharding)
            self.states, metrics = self.step_fn(self.states, teacher, batch, active)
            done = step + 1
            save = done % config.train.checkpoint_every == 0 or done == last
            if save or done % config.train.log_every == 0:
                metrics = multihost_utils.process_allgather(metrics, tiled=True)
                self.check_finite(np.asarray(metrics["loss"]), done, active_np)
                now = time.perf_counter()
                rate = (done - tick_step) * images_per_step / max(now - tick, 1e-9)
                tick, tick_step = now, done
                bar.set_postfix(loss=f"{float(np.mean(metrics['loss'][: len(self.splits)])):.3f}",
                                img_s=f"{rate:.0f}")
                bar.update(done - bar.n)
                for index, split in enumerate(self.splits):
                    if split.name in self.writers and active_np[index]:
                        for key, values in metrics.items():
                            self.writers[split.name].add_scalar(
                                f"train/{key}", float(values[index]), done
                            )
            if save:
                self.checkpoints.save(done, args=ocp.args.StandardSave(self.states))

    def final_models(self) -> list[dict]:
        """Each split's trained ``{"params", "anchor"}``, replicated over the mesh."""
        take = parallel.jit_once(("take", self.mesh), lambda: jax.jit(
            lambda states, index: jax.tree.map(lambda leaf: leaf[index], states),
            out_shardings=parallel.replicated(self.mesh),
        ))
        models = []
        for index in range(len(self.splits)):
            state = take(self.states, index)
            models.append({"params": state.params, "anchor": state.anchor})
        return models


def file_name(run_name: str) -> str:
    """A run name as a file name: ``T-shirt/top`` -> ``T-shirt_top``."""
    return run_name.replace("/", "_")


def run_dir(workdir: str, name: str) -> str:
    return os.path.join(workdir, "runs", file_name(name))


def read_finished(workdir: str, name: str) -> dict | None:
    """The ``results.json`` entry of a run that finished earlier, or None."""
    path = os.path.join(run_dir(workdir, name), "result.json")
    if not os.path.exists(path):
        return None
    with open(path) as file:
        return json.load(file)


def write_finished(workdir: str, summary: dict) -> None:
    path = os.path.join(run_dir(workdir, summary["name"]), "result.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    reports.write_atomically(path, json.dumps(summary, indent=2))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains and scores every selected split, then writes results.json, results.md and plots.

    Finished runs are skipped; an interrupted group resumes from its last orbax checkpoint and
    ends with the same numbers as an uninterrupted run.
    """
    os.makedirs(workdir, exist_ok=True)
    names = select_splits(config)
    teacher_key, _ = split_keys(config.seed)
    teacher_params, teacher_is_random = load_teacher(config, workdir, teacher_key)
    teacher_model, student_model = build_models(config)
    teacher_params = prepare_teacher_params(teacher_params, config.method)
    score_step = make_score_step(config, teacher_model, student_model)

    summaries = {name: read_finished(workdir, name) for name in names}
    for name, summary in summaries.items():
        if summary is not None:
            logging.info("run %s already finished (image AUROC %.4f): skipped", name,
                         summary["image_auroc"])
    # Groups are fixed by the selection, not by what is left: a group interrupted between its
    # runs' evaluations restores its final checkpoint, since a split trained in another group
    # would differ in the last float bits.
    todo = [name for name in names if summaries[name] is None]
    group_size = group_size_for(config, len(names)) if todo else 1
    for start in range(0, len(names), group_size):
        group = names[start: start + group_size]
        if not set(group) & set(todo):
            continue
        splits = [load_split(config.data, name) for name in group]
        trainer = GroupTrainer(
            config, workdir, splits, [names.index(name) for name in group],
            teacher_params, teacher_model, student_model, group_size,
        )
        trainer.train()
        for split, model in zip(splits, trainer.final_models(), strict=True):
            if split.name not in todo:
                continue
            directory = run_dir(workdir, split.name)
            checkpoints.save_tree(os.path.join(directory, "model"), model)
            summary = evaluate_split(
                config, split, model, trainer.teacher_params, score_step, trainer.mesh, directory
            )
            if jax.process_index() == 0:
                write_finished(workdir, summary)
            summaries[split.name] = summary
            logging.info(
                "run %s: image AUROC %.4f, F1 %.3f at threshold %.4f%s", split.name,
                summary["image_auroc"], summary["f1"], summary["threshold"],
                "" if summary["pixel_auroc"] is None
                else f", pixel AUROC {summary['pixel_auroc']:.4f}, PRO {summary['pro']:.4f}",
            )
    runs = [summaries[name] for name in names]
    if jax.process_index() == 0:
        write_reports(config, workdir, runs, teacher_is_random)
    return {"runs": runs, "teacher_is_random": teacher_is_random}


def write_reports(
    config: ml_collections.ConfigDict, workdir: str, runs: list[dict], teacher_is_random: bool
) -> dict:
    """results.json, results.md, ROC curves and score histograms over every run."""
    results = reports.write_results(workdir, config.data.name, config, runs, teacher_is_random)
    arrays = [
        reports.load_run_arrays(os.path.join(run_dir(workdir, run["name"]), "scores.npz"))
        for run in runs
    ]
    reports.plot_roc_curves(os.path.join(workdir, "roc_curves.png"), arrays)
    reports.plot_score_histograms(os.path.join(workdir, "score_histograms.png"), arrays)
    return results


_STEP_MEMORY: dict[tuple[str, int, int | None], int] = {}


def step_memory_bytes(
    config: ml_collections.ConfigDict, num_splits: int, batch_per_device: int | None = None
) -> int:
    """Device memory of the stacked train step for ``num_splits`` splits on ONE device, read
    from the compiled program's own memory analysis (arguments + outputs + temporaries, less
    what donation aliases). Compiled once per (config, splits, batch) in a process."""
    key = (config.to_json(), num_splits, batch_per_device)
    if key not in _STEP_MEMORY:
        _STEP_MEMORY[key] = _compiled_step_memory(config, num_splits, batch_per_device)
    return _STEP_MEMORY[key]


def _compiled_step_memory(
    config: ml_collections.ConfigDict, num_splits: int, batch_per_device: int | None
) -> int:
    teacher_model, student_model = build_models(config)
    size = config.data.image_size
    batch = batch_per_device or config.data.batch_size
    teacher_shapes = jax.eval_shape(
        lambda: init_params(teacher_model, size, jax.random.key(0))
    )

    def init(index):
        pos_embedding = jnp.zeros(teacher_shapes["pos_embedding"].shape, jnp.float32)
        return create_train_state(
            config, pos_embedding, student_model, jax.random.fold_in(jax.random.key(0), index), 1
        )

    states = jax.eval_shape(jax.vmap(init), jnp.arange(num_splits))
    images = jax.ShapeDtypeStruct((num_splits, batch, size, size, 3), jnp.uint8)
    active = jax.ShapeDtypeStruct((num_splits,), jnp.bool_)
    step = make_stacked_train_step(config, teacher_model, student_model)
    lowered = jax.jit(step, donate_argnums=0).lower(states, teacher_shapes, images, active)
    compiled = lowered.compile()
    analysis = compiled.memory_analysis()
    return int(
        analysis.argument_size_in_bytes + analysis.output_size_in_bytes
        + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes
    )


def device_memory_bytes() -> int:
    """Memory of one device: the allocator's limit on GPU/TPU, half the host RAM on CPU."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def auto_parallel_splits(config: ml_collections.ConfigDict, num_splits: int) -> int:
    """The largest group of splits whose train step fits the device memory (90% of it).

    Memory grows linearly in the splits per device: compile for one and two, extrapolate.
    """
    num_devices = jax.device_count()
    split_axis, data_axis = (
        tuple(config.mesh_shape) or parallel.choose_mesh_shape(
            num_splits, config.data.batch_size, num_devices
        )
    )
    batch_per_device = max(config.data.batch_size // data_axis, 1)
    one = step_memory_bytes(config, 1, batch_per_device)
    two = step_memory_bytes(config, 2, batch_per_device)
    per_split = max(two - one, 1)
    fits_per_device = int((0.9 * device_memory_bytes() - (one - per_split)) // per_split)
    if fits_per_device < 1:
        raise FcdError(
            f"one split needs {one / 2**30:.1f} GiB per device, more than the device has: lower "
            "--config.data.batch_size, use --config.model.remat=True or more devices on 'data'"
        )
    group = min(num_splits, fits_per_device * split_axis)
    # Every process must train the same groups: process 0's measurement decides.
    group = int(multihost_utils.broadcast_one_to_all(np.int32(group)))
    logging.info(
        "parallel_splits=auto: %.2f GiB per split, %.2f GiB fixed, %d of %d splits at once",
        per_split / 2**30, (one - per_split) / 2**30, group, num_splits,
    )
    return group


@dataclasses.dataclass
class SavedRunScorer:
    """What scoring saved runs needs: the teacher on every device and the jitted score step."""

    teacher_params: dict
    teacher_is_random: bool
    score_step: Callable
    mesh: jax.sharding.Mesh

    @classmethod
    def create(cls, config: ml_collections.ConfigDict, workdir: str) -> SavedRunScorer:
        teacher_key, _ = split_keys(config.seed)
        teacher_params, teacher_is_random = load_teacher(config, workdir, teacher_key)
        teacher_model, student_model = build_models(config)
        mesh = parallel.data_mesh()
        teacher_params = jax.device_put(
            prepare_teacher_params(teacher_params, config.method), parallel.replicated(mesh)
        )
        score_step = make_score_step(config, teacher_model, student_model)
        return cls(teacher_params, teacher_is_random, score_step, mesh)

    def load_model(self, workdir: str, name: str) -> dict:
        """The trained ``{"params", "anchor"}`` of run ``name``."""
        return checkpoints.load_tree(os.path.join(run_dir(workdir, name), "model"))


def evaluate_saved(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """``--mode=eval``: scores every trained run of ``workdir`` again and rewrites the reports."""
    names = [name for name in select_splits(config) if read_finished(workdir, name) is not None]
    if not names:
        raise FcdError(f"no trained run in {workdir}: train first (--mode=train_and_eval)")
    scorer = SavedRunScorer.create(config, workdir)
    teacher_params, score_step, mesh = scorer.teacher_params, scorer.score_step, scorer.mesh
    teacher_is_random = scorer.teacher_is_random
    runs = []
    for name in names:
        summary = evaluate_split(
            config, load_split(config.data, name), scorer.load_model(workdir, name),
            teacher_params, score_step, mesh, run_dir(workdir, name),
        )
        if jax.process_index() == 0:
            write_finished(workdir, summary)
        runs.append(summary)
    if jax.process_index() == 0:
        write_reports(config, workdir, runs, teacher_is_random)
    return {"runs": runs, "teacher_is_random": teacher_is_random}
