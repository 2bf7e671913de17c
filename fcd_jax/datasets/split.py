"""One run's data: the one-class ``Split`` and the in-memory image sources it holds.

METHOD.md "Training and data protocol": train on normal images only; test on normal and anomalous
images with a binary label (1 = anomalous). Every source holds uint8 images at one fixed host size;
resizing to the model size and normalisation happen on the device (``input_pipeline.preprocess``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Hashable
from typing import Protocol

import numpy as np

from fcd_jax import metrics


class ImageSource(Protocol):
    """Index-addressable uint8 images ``[h, w, c]``, all of one size (c = 1 or 3)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> np.ndarray: ...

    def get_batch(self, indices: np.ndarray) -> np.ndarray: ...


class ArraySource:
    """An ``ImageSource`` (or mask source) over one uint8 host array ``[n, h, w(, c)]``."""

    def __init__(self, images: np.ndarray):
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise TypeError(f"images must be uint8, got {images.dtype}")
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.images[index]

    def get_batch(self, indices: np.ndarray) -> np.ndarray:
        return self.images[np.asarray(indices, dtype=np.int64)]

    @property
    def image_shape(self) -> tuple[int, ...]:
        """The shape of one item, e.g. ``(32, 32, 3)``."""
        return tuple(self.images.shape[1:])

    def subset(self, indices: np.ndarray) -> ArraySource:
        return ArraySource(self.images[np.asarray(indices, dtype=np.int64)])

    @functools.cached_property
    def identity(self) -> Hashable:
        """What the images are, not where they came from: shape and a digest of the bytes, so
        that the runs of one dataset (CIFAR-10's ten classes) are seen to share one test set
        however each loaded it. Computed on first use (about 30 ms for CIFAR's 10,000 images)."""
        images = np.ascontiguousarray(self.images)
        return images.shape, hashlib.blake2b(images.data, digest_size=16).hexdigest()


def source_identity(source: ImageSource) -> Hashable:
    """A key equal for two sources exactly when they hold the same images in the same order:
    ``ArraySource.identity``, else the object itself (a source equals only itself)."""
    identity = getattr(source, "identity", None)
    return ("object", id(source)) if identity is None else ("images", identity)


MaskSource = ArraySource  # masks: [n, H, W] uint8 in {0, 1}, at the images' host size


@dataclasses.dataclass
class Split:
    """One run of the one-class protocol: one normal class, or one category of a folder set."""

    name: str
    train_images: ArraySource  # normal images only, minus the held-out part
    holdout_images: ArraySource  # normal training images held out to set the threshold
    test_images: ArraySource
    test_labels: np.ndarray  # int32 [n_test], 1 = anomalous
    test_classes: np.ndarray  # int32 [n_test], index into test_class_names
    test_class_names: list[str]
    test_masks: MaskSource | None = None  # [n_test, H, W] uint8 {0, 1}; None without masks
    test_paths: list[str] | None = None  # the test images' files, where they come from files
    skipped: list[str] = dataclasses.field(default_factory=list)  # bad files skipped on request

    @property
    def auroc_undefined_reason(self) -> str | None:
        """Why image AUROC cannot be computed on this test set (None when it can): a folder with
        no ``test/``, or with normal test images only, is a legitimate split."""
        return metrics.auroc_undefined_reason(self.test_labels)


def holdout_count(n: int, fraction: float) -> int:
    """How many of ``n`` normal training images ``holdout_fraction`` holds out: ``fraction * n``
    rounded (half to even), keeping at least one image in train."""
    return min(int(round(n * fraction)), max(n - 1, 0))


def holdout_indices(n: int, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Splits ``range(n)`` into (train, held-out) sorted index arrays, ``holdout_count`` held out.

    At least one image stays in train; the choice is a fixed seeded permutation.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {fraction}")
    n_holdout = holdout_count(n, fraction)
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_holdout:]), np.sort(order[:n_holdout])


def one_class_split(
    name: str,
    normal_images: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    test_classes: np.ndarray,
    test_class_names: list[str],
    holdout_fraction: float,
    **extras,
) -> Split:
    """Builds a ``Split``, holding out ``holdout_fraction`` of the normal training images."""
    train_idx, holdout_idx = holdout_indices(len(normal_images), holdout_fraction)
    normal = ArraySource(normal_images)
    return Split(
        name=name,
        train_images=normal.subset(train_idx),
        holdout_images=normal.subset(holdout_idx),
        test_images=ArraySource(test_images),
        test_labels=np.asarray(test_labels, dtype=np.int32),
        test_classes=np.asarray(test_classes, dtype=np.int32),
        test_class_names=list(test_class_names),
        **extras,
    )
