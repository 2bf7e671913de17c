"""Data for the runs: which splits, the one-class split API, deterministic host-side batching.

METHOD.md "Training and data protocol". The host holds uint8 images at their native (tfds) or
configured (folders) size and slices batches by index; ``fcd_jax.preprocessing`` (inside the
jitted programs) resizes them to the model size and normalises them with the teacher's mean/std.

Multi-host: ``train_batches`` / ``eval_batches`` take ``process_index`` / ``process_count`` and
return only this process's rows of each global batch (``batch_size // process_count`` rows), so each
host reads only its share; ``parallel.GlobalBatch`` assembles the global batch from the shares.
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Iterable, Iterator

import numpy as np

from fcd_jax.datasets import embedded, folders, tfds_one_class
from fcd_jax.datasets.split import ArraySource, ImageSource, MaskSource, Split
from fcd_jax.errors import DataError, FcdError

__all__ = [
    "ArraySource", "ImageSource", "MaskSource", "Split", "DATASETS", "list_splits", "load_split",
    "named_splits", "select_splits", "steps_per_epoch", "train_batches", "eval_batches",
    "eval_batch", "prefetch",
]  # fmt: skip

DATASETS = ("cifar10", "cifar100", "fashion_mnist", "mvtec", "folder", "digits", "textures")


def list_splits(data_config) -> list[str]:
    """Every run name of ``data_config.name``, in the paper's order (a ``DataError`` if unknown)."""
    dataset = data_config.name
    if dataset in tfds_one_class.RUN_LABELS:
        return tfds_one_class.list_runs(dataset)
    if dataset == "mvtec":
        return folders.list_mvtec_splits(data_config)
    if dataset == "folder":
        return folders.list_folder_splits(data_config)
    if dataset == "digits":
        return list(embedded.DIGITS)
    if dataset == "textures":
        return list(embedded.TEXTURES)
    raise DataError(f"unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}")


def named_splits(config) -> list[str] | None:
    """The run names ``config.splits`` lists (comma-separated), or None for "all"."""
    if config.splits in ("all", "", None):
        return None
    return [name.strip() for name in str(config.splits).split(",") if name.strip()]


def select_splits(config) -> list[str]:
    """The dataset's run names, restricted to ``config.splits`` unless it is "all"."""
    names = list_splits(config.data)
    wanted = named_splits(config)
    if wanted is None:
        return names
    unknown = [name for name in wanted if name not in names]
    if unknown:
        raise FcdError(
            f"unknown split(s) {', '.join(unknown)} for dataset {config.data.name}: "
            f"choose from {', '.join(names)}"
        )
    return wanted


def load_split(data_config, name: str) -> Split:
    """Reads run ``name`` of ``data_config.name`` into host memory (``DataError`` on problems)."""
    runs = list_splits(data_config)
    if name not in runs:
        raise DataError(
            f"unknown run {name!r} of dataset {data_config.name!r}; valid: {', '.join(runs)}"
        )
    dataset = data_config.name
    if dataset in tfds_one_class.RUN_LABELS:
        return tfds_one_class.load_split(data_config, name)
    if dataset in ("mvtec", "folder"):
        return folders.load_root_split(data_config, name)
    if dataset == "digits":
        return embedded.load_digits_split(data_config, name)
    return embedded.load_textures_split(data_config, name)


# --- Batching -------------------------------------------------------------------------------------


def steps_per_epoch(n_images: int, batch_size: int) -> int:
    """Full batches per epoch (the last partial batch is dropped); 1 if the set is smaller."""
    return max(n_images // batch_size, 1)


def _process_rows(batch_size: int, process_index: int, process_count: int) -> slice:
    if batch_size % process_count:
        raise ValueError(
            f"batch_size {batch_size} is not divisible by process_count {process_count}"
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    local = batch_size // process_count
    return slice(process_index * local, (process_index + 1) * local)


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """Epoch ``epoch``'s order; cached, since every step of the epoch reads it (read-only)."""
    permutation = np.random.default_rng([seed, epoch]).permutation(n)
    permutation.flags.writeable = False
    return permutation


def train_batch_indices(n_images: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """The global batch of training step ``step``: image indices ``[batch_size]``.

    Epoch e visits ``permutation(seed, e)`` in order, one full batch per step, dropping the rest.
    A set smaller than a batch is read as one endless stream of epoch permutations (wrap-around).
    """
    if n_images == 0:
        raise DataError("no training images: the training set is empty")
    if n_images >= batch_size:
        epoch, position = divmod(step, n_images // batch_size)
        start = position * batch_size
        return _epoch_permutation(seed, epoch, n_images)[start : start + batch_size]
    stream = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs, offsets = np.divmod(stream, n_images)
    pairs = zip(epochs, offsets, strict=True)
    return np.array([_epoch_permutation(seed, e, n_images)[o] for e, o in pairs])


def train_batches(
    source: ImageSource,
    batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    with_indices: bool = False,
) -> Iterator[np.ndarray] | Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless training batches from ``start_step`` on: this process's rows, uint8 ``[b, h, w, c]``
    (with ``with_indices``: ``(images, their int32 indices into source)``).

    Step s is a pure function of (seed, s), so resuming at ``start_step`` repeats the very batches
    of an uninterrupted run.
    """
    rows = _process_rows(batch_size, process_index, process_count)
    step = start_step
    while True:
        indices = train_batch_indices(len(source), batch_size, seed, step)[rows]
        images = source.get_batch(indices)
        yield (images, indices.astype(np.int32)) if with_indices else images
        step += 1


def eval_batches(
    source: ImageSource, batch_size: int, process_index: int = 0, process_count: int = 1
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every image once, in order: ``(images [b, ...], valid bool [b])``, this process's rows.

    Global batch k holds images ``k * batch_size ...``; the last one is padded with zero images
    (``valid`` False). Every process yields the same number of batches.
    """
    for start in range(0, len(source), batch_size):
        yield eval_batch(source, batch_size, start, process_index, process_count)


def eval_batch(
    source: ImageSource, batch_size: int, start: int, process_index: int = 0,
    process_count: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """This process's rows of the global batch of images ``start .. start + batch_size - 1``:
    ``(images [b, ...], valid bool [b])``, zero images (``valid`` False) past the end."""
    rows = _process_rows(batch_size, process_index, process_count)
    indices = np.arange(start, start + batch_size)[rows]
    valid = indices < len(source)
    images = np.zeros((len(indices), *np.shape(source[0])), np.uint8)
    if valid.any():
        images[valid] = source.get_batch(indices[valid])
    return images, valid


def prefetch(iterator: Iterable, size: int = 2) -> Iterator:
    """Runs ``iterator`` ``size`` items ahead in a background thread (host-side prefetch)."""
    buffer: queue.Queue = queue.Queue(maxsize=size)
    done = object()

    def produce():
        try:
            for item in iterator:
                buffer.put(item)
        except BaseException as error:  # re-raised in the consumer
            buffer.put(error)
        buffer.put(done)

    threading.Thread(target=produce, daemon=True).start()
    while (item := buffer.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item
