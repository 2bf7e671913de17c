"""Device mesh, shardings and global batches: many splits and data parallelism in one program.

One ``Mesh`` with axes ``("split", "data")``. Student states of S splits are stacked on a leading
axis sharded over ``split``; each batch is ``[S, B, h, w, c]`` sharded over ``("split", "data")``;
the teacher's parameters are replicated. ``jax.jit`` with these ``NamedSharding``s is the whole
parallel engine: XLA inserts the gradient all-reduce over ``data``. The same code runs on one CPU,
8 GPUs or a multi-host TPU pod (``jax.distributed``): each process loads only its block of every
batch and :class:`GlobalBatch` assembles the global ``jax.Array`` from it.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Hashable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fcd_jax.errors import FcdError

SPLIT, DATA = "split", "data"


def choose_mesh_shape(num_splits: int, batch_size: int, num_devices: int) -> tuple[int, int]:
    """(split, data) axis sizes: splits first.

    The largest split axis that divides the devices, is at most ``num_splits`` and leaves a data
    axis that divides the batch; if there is none (e.g. one split of batch 4 on 8 devices), the
    smallest larger split axis that does, filled with padding splits. Split axis = devices
    (data axis 1) always fits.
    """
    fits = [
        split_axis for split_axis in _divisors(num_devices)
        if batch_size % (num_devices // split_axis) == 0
    ]
    within = [split_axis for split_axis in fits if split_axis <= max(num_splits, 1)]
    split_axis = max(within) if within else min(fits)
    return split_axis, num_devices // split_axis


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def make_mesh(
    num_splits: int,
    batch_size: int,
    mesh_shape: Sequence[int] = (),
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """The ``("split", "data")`` mesh over all (or the given) devices.

    Axis types are Auto: the model's ``concatenate([cls, patches])`` needs no sharding annotations.
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = tuple(mesh_shape) or choose_mesh_shape(num_splits, batch_size, len(devices))
    if len(shape) != 2 or math.prod(shape) != len(devices):
        raise FcdError(
            f"mesh_shape {tuple(shape)} does not use the {len(devices)} devices: give "
            f"(split, data) with split * data = {len(devices)}"
        )
    if batch_size % shape[1]:
        raise FcdError(
            f"batch size {batch_size} is not divisible by the data axis {shape[1]} of the mesh: "
            "change --config.data.batch_size or --config.mesh_shape"
        )
    return Mesh(
        np.asarray(devices).reshape(shape), (SPLIT, DATA),
        axis_types=(jax.sharding.AxisType.Auto,) * 2,
    )


def padded_num_splits(num_splits: int, mesh: Mesh) -> int:
    """Splits rounded up to a multiple of the split axis (padding splits are never reported)."""
    return -(-num_splits // mesh.shape[SPLIT]) * mesh.shape[SPLIT]


def stacked_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis over ``split``: stacked states, per-split metrics and flags."""
    return NamedSharding(mesh, P(SPLIT))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """``[split, batch, ...]`` over ``(split, data)``."""
    return NamedSharding(mesh, P(SPLIT, DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


STACK_MODES = ("auto", "vmap", "map")


def runs_in_sequence(stack_mode: str, split_axis: int) -> bool:
    """Whether the splits of a stack run one after another inside the program (``jax.lax.map``)
    rather than vectorised (``jax.vmap``). ``stack_mode`` "auto": in sequence on CPU when the
    stack is not spread over devices (``split`` axis 1), vectorised elsewhere (accelerators, or
    a stack sharded over ``split``, which a loop over its axis would gather)."""
    if stack_mode == "auto":
        return split_axis == 1 and jax.default_backend() == "cpu"
    return stack_mode == "map"


def map_stack(function: Callable, in_axes: Sequence[int | None], sequential: bool) -> Callable:
    """``function`` over a stack's leading axis (each ``in_axes`` entry 0 or None: mapped, or
    the same for every split): ``jax.vmap``, or with ``sequential`` ``jax.lax.map``, where each
    split runs exactly the program it runs alone (bit-identical) and only one split's
    activations are alive at a time. A stack of one calls ``function`` as it is: under vmap the
    stack axis of parameters ``[S, depth, ...]`` moves inside ``nn.scan``'s depth axis, and
    XLA:CPU copies every stacked parameter (and gradient) to that layout although a size-1 axis
    moves no data (327 MB at ViT-B/16; BENCHMARKS.md "Step level")."""
    in_axes = tuple(in_axes)
    vmapped = jax.vmap(function, in_axes=in_axes)

    def mapped(*args):
        stacked = [arg for arg, axis in zip(args, in_axes, strict=True) if axis is not None]

        def one_split(split_slices):  # the stacked arguments' slices of one split
            slices = iter(split_slices)
            return function(*(arg if axis is None else next(slices)
                              for arg, axis in zip(args, in_axes, strict=True)))

        if all(leaf.shape[0] == 1 for leaf in jax.tree.leaves(stacked)):
            outputs = one_split(jax.tree.map(lambda leaf: leaf[0], stacked))
            return jax.tree.map(lambda leaf: leaf[None], outputs)
        return jax.lax.map(one_split, stacked) if sequential else vmapped(*args)

    return mapped


def all_devices_sharding(mesh: Mesh) -> NamedSharding:
    """``[1, batch, ...]``: one split's batch over every device of the mesh (evaluation)."""
    return NamedSharding(mesh, P(None, (SPLIT, DATA)))


@dataclasses.dataclass(frozen=True)
class GlobalBatch:
    """A global batch ``[S, B, ...]`` (S splits of B rows) laid out by ``sharding``, the block of it
    that this process provides (``splits`` x ``rows``), and its assembly from that block.

    Training and the teacher-cache fill use ``batch_sharding`` (one row block per split);
    evaluation uses ``[1, B, ...]`` over ``all_devices_sharding``.
    """

    sharding: NamedSharding
    shape: tuple[int, ...]

    @functools.cached_property
    def _block(self) -> tuple[slice, slice]:
        return _local_block(self.sharding, self.shape)

    @property
    def splits(self) -> slice:
        """The splits whose rows this process provides."""
        return self._block[0]

    @property
    def rows(self) -> slice:
        """The rows of each of those splits that this process provides."""
        return self._block[1]

    @property
    def process_slot(self) -> tuple[int, int]:
        """(index, count) of this process's rows among equal blocks of the B rows, as
        ``input_pipeline.train_batches`` / ``eval_batches`` take them."""
        num_rows = self.rows.stop - self.rows.start
        return self.rows.start // num_rows, self.shape[1] // num_rows

    def assemble(self, parts: Mapping[int, np.ndarray], dtype=np.uint8) -> jax.Array:
        """The global ``jax.Array`` from ``parts[s]``, this process's rows of split ``s`` (fewer
        rows are zero-padded; splits without a part, e.g. padding splits, are zeros)."""
        local = np.zeros(
            (self.splits.stop - self.splits.start, self.rows.stop - self.rows.start,
             *self.shape[2:]), dtype,
        )
        for split, part in parts.items():
            local[split - self.splits.start, : len(part)] = part
        return jax.make_array_from_process_local_data(self.sharding, local, self.shape)


def _local_block(sharding: NamedSharding, global_shape: tuple[int, ...]) -> tuple[slice, slice]:
    """The block of the two leading axes held by this process's devices; a ``FcdError`` if they
    hold no single block (the mesh interleaves the processes)."""
    num_dims = 2
    index_map = sharding.addressable_devices_indices_map(global_shape)
    blocks = {
        tuple(
            range(*index.indices(size))
            for index, size in zip(indices[:num_dims], global_shape[:num_dims], strict=True)
        )
        for indices in index_map.values()
    }
    spans = tuple(
        slice(min(block[dim][0] for block in blocks), max(block[dim][-1] for block in blocks) + 1)
        for dim in range(num_dims)
    )
    covered = {point for block in blocks for point in itertools.product(*block)}
    if len(covered) != math.prod(span.stop - span.start for span in spans):
        raise FcdError(
            f"the devices of process {jax.process_index()} hold no single block of the "
            f"{global_shape[:num_dims]} batch: build the mesh with each process's devices "
            "side by side (--config.mesh_shape)"
        )
    return spans


_JITTED: dict[Hashable, Callable] = {}


def jit_once(key: Hashable, build: Callable[[], Callable]) -> Callable:
    """The jitted function built for ``key``, built on first use and kept for the process.

    ``jax.jit`` caches compilations per function object: a program rebuilt for every group of
    splits (``parallel_splits=N``) would compile again for every group.
    """
    if key not in _JITTED:
        _JITTED[key] = build()
    return _JITTED[key]


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Every device on ``data`` (one split): evaluation and prediction."""
    devices = list(devices if devices is not None else jax.devices())
    return make_mesh(1, len(devices), (1, len(devices)), devices)
