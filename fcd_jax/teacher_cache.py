"""The teacher cache: the frozen teacher's features of every training image, computed once.

The teacher is frozen and the step has no augmentation, so its features (``train_step.
teacher_features``: the blocks the losses read) of a training image are the same at every step.
A group whose images are seen more than once can compute them once, keep them on the devices of
their split, and run the step that reads them instead of the teacher (a quarter of its FLOPs):
the very same numbers (a CNN's to float32 rounding: the cached teacher runs in another
program). ``train.teacher_cache``: "on", "off", or "auto" (:func:`use_teacher_cache`).

The cache is a pytree like the features (an array for a ViT, a tuple of taps for a CNN), each
leaf ``[splits, images, ...]``: one row per image, its batch axis moved first
(``Networks.feature_batch_axis``; ``train_step.features_from_cache`` reads them back).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from fcd_jax import parallel, sizing
from fcd_jax.datasets.split import ImageSource
from fcd_jax.errors import FcdError
from fcd_jax.networks import Networks
from fcd_jax.preprocessing import preprocess
from fcd_jax.train_step import teacher_features

SETTINGS = ("auto", "on", "off")


def cache_length(sources: Sequence[ImageSource], batch_size: int) -> int:
    """Images per split in the cache: the largest training set, in whole batches."""
    return -(-max(len(source) for source in sources) // batch_size) * batch_size


def cached_features(
    config: ml_collections.ConfigDict, networks: Networks, teacher_params: dict, images: jax.Array
) -> Any:
    """What the cache holds for uint8 ``images``: their preprocessed ``teacher_features``, the
    batch axis first (a ViT's ``[B, L, tokens, width]``, a CNN's taps ``[B, h, w, c]``)."""
    features = teacher_features(teacher_params, preprocess(images, config.data), networks)
    axis = networks.feature_batch_axis
    return jax.tree.map(lambda leaf: jnp.moveaxis(leaf, axis, 0), features)


def image_features(
    config: ml_collections.ConfigDict, networks: Networks, teacher_params: dict,
    image_shape: tuple[int, ...],
) -> Any:
    """Shape and dtype of one image's cache entry, ``[L, tokens, width]`` (a CNN: one per tap
    read), as ``jax.ShapeDtypeStruct`` leaves (nothing computed)."""
    features = jax.eval_shape(
        functools.partial(cached_features, config, networks), teacher_params,
        jax.ShapeDtypeStruct((1, *image_shape), jnp.uint8),
    )
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype), features)


def cache_bytes(per_image: Any, splits_per_device: int, length: int) -> int:
    """Device memory per device of a cache of ``length`` images for each of its splits."""
    return sum(splits_per_device * length * math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
               for leaf in jax.tree.leaves(per_image))


def use_teacher_cache(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, num_stacked: int,
    images_seen: int, largest_set: int, bytes_per_device: int,
) -> bool:
    """``train.teacher_cache``: "on", "off", or "auto" = when the group sees its training
    images more than once (``images_seen`` per split > ``largest_set``) and the train step (XLA's
    memory analysis, ``sizing.stacked_step_bytes`` as for ``parallel_splits="auto"``) and the
    cache together fit 90% of a device's memory. Every process takes process 0's decision, so
    all run the same program."""
    setting = str(config.train.teacher_cache)
    if setting not in SETTINGS:
        raise FcdError(f"train.teacher_cache={setting!r}: use 'auto', 'on' or 'off'")
    use = setting == "on"
    if setting == "auto":
        if images_seen > largest_set:
            step = sizing.stacked_step_bytes(
                config, num_stacked // mesh.shape[parallel.SPLIT],
                config.data.batch_size // mesh.shape[parallel.DATA], mesh.shape[parallel.SPLIT],
            )
            use = step + bytes_per_device <= 0.9 * sizing.device_memory_bytes()
        use = bool(multihost_utils.broadcast_one_to_all(np.bool_(use)))
    logging.info(
        "teacher cache %s (train.teacher_cache=%s): %.2f GiB per device",
        "on" if use else "off", setting, bytes_per_device / 2**30,
    )
    return use


def fill_teacher_cache(
    config: ml_collections.ConfigDict,
    networks: Networks,
    teacher_params: dict,
    sources: Sequence[ImageSource],
    mesh: jax.sharding.Mesh,
    num_stacked: int,
) -> Any:
    """The teacher's features of every image of every source (a split's training images), on
    the devices of its split: ``[num_stacked, N, L, tokens, width]`` (a CNN: a tuple of
    ``[num_stacked, N, h, w, c]``), N = :func:`cache_length`, image ``i`` of split ``s`` at
    ``[s, i]`` (padding rows and splits: features of zero images).

    Computed batch by batch, each process loading its block of each batch.
    """
    batch = config.data.batch_size
    length = cache_length(sources, batch)
    layout = parallel.GlobalBatch(
        parallel.batch_sharding(mesh), (num_stacked, batch, *sources[0].image_shape)
    )
    per_image = image_features(config, networks, teacher_params, sources[0].image_shape)
    stacked = parallel.stacked_sharding(mesh)

    sequential = parallel.runs_in_sequence(config.stack_mode, mesh.shape[parallel.SPLIT])

    def fill_batch(cache, teacher_params, images, start):
        features = functools.partial(cached_features, config, networks, teacher_params)
        new = parallel.map_stack(features, (0,), sequential)(images)  # as the train step runs
        return jax.tree.map(
            lambda rows, batch: jax.lax.dynamic_update_slice_in_dim(rows, batch, start, 1),
            cache, new)

    fill = parallel.jit_once(
        ("cache", ml_collections.FrozenConfigDict(config), networks, mesh),
        lambda: jax.jit(
            fill_batch, in_shardings=(stacked, parallel.replicated(mesh), layout.sharding, None),
            out_shardings=stacked, donate_argnums=0,
        ),
    )
    cache_shapes = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct((num_stacked, length, *leaf.shape), leaf.dtype),
        per_image)
    zeros = parallel.jit_once(
        ("cache_zeros", tuple(jax.tree.leaves(cache_shapes)), mesh),
        lambda: jax.jit(lambda: jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype),
                                             cache_shapes), out_shardings=stacked),
    )
    cache = zeros()
    local_sources = range(layout.splits.start, min(layout.splits.stop, len(sources)))
    for start in tqdm(
        range(0, length, batch), desc="teacher cache", unit="batch", leave=False,
        disable=jax.process_index() != 0, dynamic_ncols=True,
    ):
        wanted = np.arange(start + layout.rows.start, start + layout.rows.stop)
        parts = {
            split: sources[split].get_batch(wanted[wanted < len(sources[split])])
            for split in local_sources
        }
        cache = fill(cache, teacher_params, layout.assemble(parts), np.int32(start))
    return cache
