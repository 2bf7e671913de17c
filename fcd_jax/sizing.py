"""How much fits: device memory of the compiled train step, and how many splits train together.

The numbers come from XLA's own memory analysis of the production stacked step
(``train_step.make_stacked_step``), compiled for shapes only: ``parallel_splits="auto"`` picks the
largest group whose step fits 90% of a device, ``train.teacher_cache="auto"`` whether the cache
fits beside it (``fcd_jax.teacher_cache``).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from fcd_jax import parallel
from fcd_jax.errors import FcdError
from fcd_jax.networks import build_networks
from fcd_jax.train_state import create_train_state
from fcd_jax.train_step import make_stacked_step

_STEP_MEMORY: dict[tuple[str, int, int | None, bool], int] = {}


def step_memory_bytes(
    config: ml_collections.ConfigDict, num_splits: int, batch_per_device: int | None = None,
    split_axis: int = 1,
) -> int:
    """Device memory of the stacked train step for ``num_splits`` splits on ONE device, read
    from the compiled program's own memory analysis (arguments + outputs + temporaries, less
    what donation aliases), the stack run as on a mesh of ``split_axis`` (``config.stack_mode``).
    Compiled once per (config, splits, batch, stack mode) in a process."""
    sequential = parallel.runs_in_sequence(config.stack_mode, split_axis)
    key = (config.to_json(), num_splits, batch_per_device, sequential)
    if key not in _STEP_MEMORY:
        _STEP_MEMORY[key] = _compiled_step_memory(config, num_splits, batch_per_device,
                                                  split_axis)
    return _STEP_MEMORY[key]


def _compiled_step_memory(
    config: ml_collections.ConfigDict, num_splits: int, batch_per_device: int | None,
    split_axis: int,
) -> int:
    networks = build_networks(config)
    size = config.data.image_size
    batch = batch_per_device or config.data.batch_size
    teacher_shapes = jax.eval_shape(lambda: networks.init_teacher(size, jax.random.key(0)))

    def init(index, teacher_params):
        return create_train_state(
            config, teacher_params, networks, jax.random.fold_in(jax.random.key(0), index), 1
        )

    states = jax.eval_shape(
        jax.vmap(init, in_axes=(0, None)), jnp.arange(num_splits), teacher_shapes
    )
    images = jax.ShapeDtypeStruct((num_splits, batch, size, size, 3), jnp.uint8)
    step = jax.jit(make_stacked_step(config, networks, split_axis=split_axis), donate_argnums=0)
    analysis = step.lower(states, teacher_shapes, images).compile().memory_analysis()
    return int(
        analysis.argument_size_in_bytes + analysis.output_size_in_bytes
        + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes
    )


def memory_line(
    config: ml_collections.ConfigDict, batch_per_device: int | None = None, split_axis: int = 1,
) -> tuple[int, int]:
    """``(fixed, per_split)`` bytes of the stacked train step on one device of a mesh with
    ``split_axis``: the line through XLA's analysis (:func:`step_memory_bytes`) of the two
    smallest stacks that run the stack's program, one and two splits vectorised, two and three
    in sequence (a stack of one runs no loop: its program is not on the line of those that do).
    Two compiles, at once, shared by every question asked."""
    sizes = (2, 3) if parallel.runs_in_sequence(config.stack_mode, split_axis) else (1, 2)
    with ThreadPoolExecutor(2) as pool:  # both at once: XLA compiles without Python's lock
        low, high = pool.map(
            lambda splits: step_memory_bytes(config, splits, batch_per_device, split_axis),
            sizes)
    per_split = max(high - low, 1)
    return low - sizes[0] * per_split, per_split


def stacked_step_bytes(
    config: ml_collections.ConfigDict, splits_per_device: int, batch_per_device: int | None = None,
    split_axis: int = 1,
) -> int:
    """Device memory of the stacked train step with ``splits_per_device`` splits on each device
    of a mesh with ``split_axis``: a stack of one compiled for it, any larger one on
    :func:`memory_line`."""
    if splits_per_device <= 1:
        return step_memory_bytes(config, 1, batch_per_device, split_axis)
    fixed, per_split = memory_line(config, batch_per_device, split_axis)
    return fixed + splits_per_device * per_split


def device_memory_bytes() -> int:
    """Memory of one device: the allocator's limit on GPU/TPU, half the host RAM on CPU."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def group_size_for(config: ml_collections.ConfigDict, num_splits: int) -> int:
    """How many splits train together: ``parallel_splits`` as an int, or "auto" (see
    :func:`auto_parallel_splits`: the most that fit the device memory)."""
    value = str(config.parallel_splits).strip()
    if value == "auto":
        return auto_parallel_splits(config, num_splits)
    if not value.isdigit() or int(value) < 1:
        raise FcdError(f"parallel_splits={value!r}: use 'auto' or a positive integer")
    return min(int(value), num_splits)


def auto_parallel_splits(config: ml_collections.ConfigDict, num_splits: int) -> int:
    """The largest group of splits whose train step fits the device memory (90% of it).

    Memory grows linearly in the splits per device (:func:`memory_line`).
    """
    num_devices = jax.device_count()
    split_axis, data_axis = (
        tuple(config.mesh_shape) or parallel.choose_mesh_shape(
            num_splits, config.data.batch_size, num_devices
        )
    )
    batch_per_device = max(config.data.batch_size // data_axis, 1)
    fixed, per_split = memory_line(config, batch_per_device, split_axis)
    budget = 0.9 * device_memory_bytes()
    fits_per_device = int((budget - fixed) // per_split)
    if fits_per_device < 2:  # a stack of one has a program of its own
        one = stacked_step_bytes(config, 1, batch_per_device, split_axis)
        if one > budget:
            raise FcdError(
                f"one split needs {one / 2**30:.1f} GiB per device, more than the device has: "
                "lower --config.data.batch_size, keep less for the backward "
                "(--config.model.remat=True --config.model.remat_policy=nothing) or use more "
                "devices on 'data'"
            )
        fits_per_device = 1
    group = min(num_splits, fits_per_device * split_axis)
    # Every process must train the same groups: process 0's measurement decides.
    group = int(multihost_utils.broadcast_one_to_all(np.int32(group)))
    logging.info(
        "parallel_splits=auto: %.2f GiB per split, %.2f GiB fixed, %d of %d splits at once",
        per_split / 2**30, max(fixed, 0) / 2**30, group, num_splits,
    )
    return group
