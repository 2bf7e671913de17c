"""MVTec AD and any image folder of the same shape, read into host memory at one size.

Layout (MVTec AD, and what ``folder`` accepts under any category name)::

    <root>/<category>/train/good/*.png            normal training images
    <root>/<category>/test/good/*.png             normal test images (label 0)
    <root>/<category>/test/<defect>/*.png         anomalous test images (label 1), any defect names
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png   optional masks (non-zero = defect)

Images (PNG, JPEG, BMP, TIFF; gray, RGB or RGBA with the alpha dropped) become RGB uint8 resized
once on the host to ``image_size`` x ``image_size`` (PIL bilinear); masks are resized with nearest
neighbour to the same size. Every bad input raises one ``DataError`` line naming the file, unless
``skip_bad_images`` is set: then the image is skipped and listed in ``Split.skipped``.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from fcd_jax.datasets.split import ArraySource, Split, one_class_split
from fcd_jax.errors import DataError
from fcd_jax.paper_results import MVTEC_CATEGORIES  # the paper's Table 4 order

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
GOOD = "good"
SKIP_HINT = "fix or delete it, or set --config.data.skip_bad_images=True to skip bad images"


def list_image_files(directory: Path) -> list[Path]:
    """The image files directly in ``directory``, sorted by name."""
    return sorted(
        p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )


def _to_uint8_array(image: Image.Image) -> np.ndarray:
    """Any PIL mode -> uint8 ``[h, w, 3]``; 16-bit gray is scaled, alpha is dropped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        gray = np.clip(np.round(values * (255.0 / peak)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if image.mode == "F":
        raise ValueError("floating-point images are not supported; save it as 8-bit")
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _open(path: Path) -> Image.Image:
    """Opens and fully decodes ``path`` (so that truncated files fail here)."""
    try:
        image = Image.open(path)
        image.load()
        return image
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, ...
        raise DataError(f"cannot read image {path} ({error}); {SKIP_HINT}") from None


def load_image(path: str | os.PathLike, image_size: int) -> np.ndarray:
    """One image file -> RGB uint8 ``[image_size, image_size, 3]`` (PIL bilinear resize)."""
    path = Path(path)
    image = _open(path)
    try:
        array = _to_uint8_array(image)
    except ValueError as error:
        raise DataError(f"cannot read image {path} ({error}); {SKIP_HINT}") from None
    if array.shape[:2] != (image_size, image_size):
        resized = Image.fromarray(array).resize((image_size, image_size), Image.BILINEAR)
        array = np.asarray(resized, dtype=np.uint8)
    return array


def load_mask(path: Path, image_path: Path, image_size: int) -> np.ndarray:
    """A mask file -> uint8 ``[image_size, image_size]`` in {0, 1} (nearest-neighbour resize).

    The mask must have its image's size (checked before any resizing).
    """
    mask = _open(path)
    with Image.open(image_path) as image:
        image_hw = image.size
    if mask.size != image_hw:
        raise DataError(
            f"mask {path} is {mask.size[0]}x{mask.size[1]} but its image {image_path} is "
            f"{image_hw[0]}x{image_hw[1]}; masks must have their image's size ({SKIP_HINT})"
        )
    binary = (np.asarray(mask.convert("L")) > 0).astype(np.uint8)
    if binary.shape != (image_size, image_size):
        resized = Image.fromarray(binary).resize((image_size, image_size), Image.NEAREST)
        binary = np.asarray(resized, dtype=np.uint8)
    return binary


def load_images(
    paths: Sequence[Path], image_size: int, skip_bad_images: bool = False
) -> tuple[np.ndarray, list[int], list[str]]:
    """Reads ``paths`` in parallel threads.

    Returns ``(images [n_ok, s, s, 3], kept positions into paths, skipped paths)``.
    """

    def read(path):
        try:
            return load_image(path, image_size)
        except DataError as error:
            if not skip_bad_images:
                raise
            return error

    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        results = list(pool.map(read, paths))
    kept = [i for i, result in enumerate(results) if not isinstance(result, DataError)]
    skipped = [str(paths[i]) for i, result in enumerate(results) if isinstance(result, DataError)]
    images = (
        np.stack([results[i] for i in kept])
        if kept
        else np.zeros((0, image_size, image_size, 3), np.uint8)
    )
    return images, kept, skipped


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(
            f"missing folder {path} ({what}); see the layout in fcd_jax/datasets/folders.py"
        )
    return path


def _mask_path(ground_truth: Path, defect: str, image_path: Path) -> Path:
    for candidate in (f"{image_path.stem}_mask.png", f"{image_path.stem}.png"):
        path = ground_truth / defect / candidate
        if path.is_file():
            return path
    raise DataError(
        f"missing mask {ground_truth / defect / (image_path.stem + '_mask.png')} for {image_path}; "
        "add it, or remove the ground_truth folder to run without masks"
    )


def _test_files(test_dir: Path) -> tuple[list[str], list[Path], list[int]]:
    """(class names: "good" first then the defects sorted, image paths, class index per path)."""
    defects = sorted(d.name for d in test_dir.iterdir() if d.is_dir() and d.name != GOOD)
    class_names = [GOOD, *defects] if (test_dir / GOOD).is_dir() else defects
    paths, classes = [], []
    for class_index, class_name in enumerate(class_names):
        files = list_image_files(test_dir / class_name)
        paths += files
        classes += [class_index] * len(files)
    if not paths:
        raise DataError(f"empty test set: no images in the subfolders of {test_dir}")
    return class_names, paths, classes


def _read_masks(
    ground_truth: Path, defects: list[str], paths: list[Path], image_size: int, skip: bool
) -> tuple[list[np.ndarray | None], list[str]]:
    """One mask per path (zeros for "good"; None where a bad mask was skipped), skipped paths."""
    for defect in defects:
        _require_dir(ground_truth / defect, f"masks of defect {defect!r}; remove {ground_truth} "
                     "to run without masks")  # fmt: skip
    masks, skipped = [], []
    for path in paths:
        try:
            if path.parent.name == GOOD:
                masks.append(np.zeros((image_size, image_size), np.uint8))
            else:
                mask_path = _mask_path(ground_truth, path.parent.name, path)
                masks.append(load_mask(mask_path, path, image_size))
        except DataError:
            if not skip:
                raise
            masks.append(None)
            skipped.append(str(path))
    return masks, skipped


def load_folder_split(
    category_dir: str | os.PathLike,
    name: str,
    image_size: int,
    holdout_fraction: float = 0.0,
    skip_bad_images: bool = False,
) -> Split:
    """Reads one category folder (layout above) into a ``Split``."""
    category_dir = Path(category_dir)
    _require_dir(category_dir, f"category {name!r}")
    train_dir = _require_dir(category_dir / "train" / GOOD, "normal training images")
    test_dir = _require_dir(category_dir / "test", "test images")

    train_paths = list_image_files(train_dir)
    if not train_paths:
        raise DataError(f"empty training set: no {'/'.join(IMAGE_SUFFIXES)} images in {train_dir}")
    normal, _, skipped = load_images(train_paths, image_size, skip_bad_images)
    if len(normal) == 0:
        raise DataError(f"empty training set: every image in {train_dir} was unreadable")

    class_names, paths, classes = _test_files(test_dir)
    images, kept, bad_images = load_images(paths, image_size, skip_bad_images)
    paths, classes = [paths[i] for i in kept], np.asarray([classes[i] for i in kept], np.int32)
    masks = None
    if (category_dir / "ground_truth").is_dir():
        defects = [c for c in class_names if c != GOOD]
        masks, bad_masks = _read_masks(
            category_dir / "ground_truth", defects, paths, image_size, skip_bad_images
        )
        ok = np.array([mask is not None for mask in masks], bool)
        images, classes, paths = (
            images[ok],
            classes[ok],
            [p for p, k in zip(paths, ok, strict=True) if k],
        )
        masks = ArraySource(np.stack([mask for mask in masks if mask is not None]))
        bad_images += bad_masks
    return one_class_split(
        name,
        normal_images=normal,
        test_images=images,
        test_labels=np.array([class_names[c] != GOOD for c in classes], np.int32),
        test_classes=classes,
        test_class_names=class_names,
        holdout_fraction=holdout_fraction,
        test_masks=masks,
        test_paths=[str(p) for p in paths],
        skipped=skipped + bad_images,
    )


def _categories(data_config) -> list[str] | None:
    """The comma-separated ``data_config.category`` as a list; None when empty."""
    names = [c.strip() for c in str(data_config.get("category", "") or "").split(",")]
    return [c for c in names if c] or None


def list_mvtec_splits(data_config) -> list[str]:
    """The MVTec AD categories (METHOD.md order), or the configured subset."""
    chosen = _categories(data_config)
    if chosen is None:
        return list(MVTEC_CATEGORIES)
    unknown = [c for c in chosen if c not in MVTEC_CATEGORIES]
    if unknown:
        raise DataError(
            f"unknown MVTec AD category {unknown[0]!r}; valid: {', '.join(MVTEC_CATEGORIES)}"
        )
    return chosen


def _root(data_config) -> Path:
    if not data_config.get("root", ""):
        raise DataError(
            f"no data root for dataset {data_config.name!r}: set --config.data.root=DIR"
        )
    return Path(data_config.root).expanduser()


def list_folder_splits(data_config) -> list[str]:
    """The category folders under ``data_config.root`` (or the root itself if it has ``train/``)."""
    root = _root(data_config)
    _require_dir(root, "data root")
    if (root / "train").is_dir():
        available = [root.name]
    else:
        available = sorted(d.name for d in root.iterdir() if (d / "train").is_dir())
    if not available:
        raise DataError(f"no category folders with a train/ subfolder under {root}")
    chosen = _categories(data_config)
    if chosen is None:
        return available
    unknown = [c for c in chosen if c not in available]
    if unknown:
        raise DataError(
            f"unknown category {unknown[0]!r} under {root}; valid: {', '.join(available)}"
        )
    return chosen


def load_root_split(data_config, name: str, root: Path | None = None) -> Split:
    """Loads category ``name`` of an MVTec-style root (``root`` overrides ``data_config.root``)."""
    root = root or _root(data_config)
    category_dir = root if (root / "train").is_dir() and root.name == name else root / name
    return load_folder_split(
        category_dir,
        name,
        image_size=data_config.image_size,
        holdout_fraction=data_config.holdout_fraction,
        skip_bad_images=data_config.skip_bad_images,
    )
