"""MVTec AD and any image folder of the same shape, read into host memory at one size.

Layout (MVTec AD, and what ``folder`` accepts under any category name)::

    <root>/<category>/train/good/*.png            normal training images
    <root>/<category>/test/good/*.png             normal test images (label 0)
    <root>/<category>/test/<defect>/*.png         anomalous test images (label 1), any defect names
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png   optional masks (non-zero = defect)

``test/`` is optional: without it (or with only ``test/good``) the split's test set is empty (or
all normal), which is what a user with no defect images has. Hidden entries (``.ipynb_checkpoints``,
``._*``) are never categories, defect classes or images. Reading single files (formats, EXIF
orientation, masks) is ``image_files``. Every bad input raises one ``DataError`` line naming the
file, unless ``skip_bad_images`` is set: then the image is skipped and listed in ``Split.skipped``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from fcd_jax.datasets.image_files import (
    IMAGE_SUFFIXES,
    list_image_files,
    load_images,
    load_mask,
    other_files_note,
    shown,
    visible_entries,
)
from fcd_jax.datasets.split import ArraySource, Split, one_class_split
from fcd_jax.errors import DataError
from fcd_jax.paper_results import MVTEC_CATEGORIES  # the paper's Table 4 order

GOOD = "good"
LAYOUT_HINT = "see the layout in fcd_jax/datasets/folders.py"


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"missing folder {shown(path)} ({what}); {LAYOUT_HINT}")
    return path


def subfolders(directory: Path) -> list[Path]:
    """The visible folders directly in ``directory``, sorted by name."""
    return [entry for entry in visible_entries(directory) if entry.is_dir()]


def _train_files(category_dir: Path) -> list[Path]:
    """The normal training images of ``category_dir``: ``train/good`` must hold at least one."""
    train_dir, good_dir = category_dir / "train", category_dir / "train" / GOOD
    if not good_dir.is_dir() and train_dir.is_dir() and list_image_files(train_dir):
        raise DataError(
            f"the normal training images must be in {shown(good_dir)}, not directly in "
            f"{shown(train_dir)}: move them into a {GOOD}/ subfolder"
        )
    _require_dir(good_dir, "normal training images")
    paths = list_image_files(good_dir)
    if not paths:
        raise DataError(
            f"empty training set: no {'/'.join(IMAGE_SUFFIXES)} images in {shown(good_dir)}"
            f"{other_files_note(good_dir)}; add normal images"
        )
    return paths


def _test_files(category_dir: Path) -> tuple[list[str], list[Path], list[int]]:
    """(class names: "good" first then the defects sorted, image paths, class index per path).

    No ``test/`` folder, or one without images, gives an empty test set named ``["good"]``.
    """
    test_dir = category_dir / "test"
    if not test_dir.is_dir():
        return [GOOD], [], []
    loose = list_image_files(test_dir)
    if loose:
        raise DataError(
            f"{len(loose)} image(s) directly in {shown(test_dir)} (e.g. {shown(loose[0].name)}): "
            f"put normal test images in {shown(test_dir / GOOD)} and defective ones in "
            f"{shown(test_dir)}/<defect name>/"
        )
    defects = [d.name for d in subfolders(test_dir) if d.name != GOOD]
    class_names = [GOOD, *defects] if (test_dir / GOOD).is_dir() or not defects else defects
    paths, classes = [], []
    for class_index, class_name in enumerate(class_names):
        files = list_image_files(test_dir / class_name) if (test_dir / class_name).is_dir() else []
        paths += files
        classes += [class_index] * len(files)
    return class_names, paths, classes


def _mask_path(ground_truth: Path, defect: str, image_path: Path) -> Path:
    for candidate in (f"{image_path.stem}_mask.png", f"{image_path.stem}.png"):
        path = ground_truth / defect / candidate
        if path.is_file():
            return path
    raise DataError(
        f"missing mask {shown(ground_truth / defect / (image_path.stem + '_mask.png'))} for "
        f"{shown(image_path)}; add it, or remove the ground_truth folder to run without masks"
    )


def _read_masks(
    ground_truth: Path, defects: list[str], paths: list[Path], image_size: int, skip: bool
) -> tuple[list[np.ndarray | None], list[str]]:
    """One mask per path (zeros for "good"; None where a bad mask was skipped), skipped paths."""
    for defect in defects:
        _require_dir(ground_truth / defect, f"masks of defect {defect!r}; remove "
                     f"{shown(ground_truth)} to run without masks")  # fmt: skip
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
            skipped.append(shown(path))
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
    train_paths = _train_files(category_dir)
    normal, _, skipped = load_images(train_paths, image_size, skip_bad_images)
    if len(normal) == 0:
        raise DataError(
            f"empty training set: every image in {shown(train_paths[0].parent)} was unreadable"
        )

    class_names, paths, classes = _test_files(category_dir)
    images, kept, bad_images = load_images(paths, image_size, skip_bad_images)
    paths, classes = [paths[i] for i in kept], np.asarray([classes[i] for i in kept], np.int32)
    masks = None
    if (category_dir / "ground_truth").is_dir():
        defects = [c for c in class_names if c != GOOD]
        read, bad_masks = _read_masks(
            category_dir / "ground_truth", defects, paths, image_size, skip_bad_images
        )
        ok = np.array([mask is not None for mask in read], bool)
        images, classes, paths = images[ok], classes[ok], [paths[i] for i in np.flatnonzero(ok)]
        masks = ArraySource(
            np.stack([mask for mask in read if mask is not None])
            if ok.any() else np.zeros((0, image_size, image_size), np.uint8)
        )
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


def resolved_root(root: str | os.PathLike) -> Path:
    """``root`` made absolute with ``~``, ``.`` and ``..`` resolved (symlinks kept), so that a
    root given as ``.`` or ``..`` is named after its folder."""
    return Path(os.path.abspath(os.path.expanduser(os.fspath(root))))


def _root(data_config) -> Path:
    if not data_config.get("root", ""):
        raise DataError(
            f"no data root for dataset {data_config.name!r}: set --config.data.root=DIR"
        )
    return resolved_root(data_config.root)


def _run_name(folder: Path) -> str:
    """The run name of a category folder: its name, which must be printable (UTF-8)."""
    if shown(folder.name) != folder.name or not folder.name:
        raise DataError(
            f"cannot name a run after the folder {shown(folder)}: its name is not UTF-8 text; "
            "rename the folder"
        )
    return folder.name


def list_folder_splits(data_config) -> list[str]:
    """The category folders under ``data_config.root`` (or the root itself if it has ``train/``)."""
    root = _root(data_config)
    _require_dir(root, "data root")
    if (root / "train").is_dir():
        available = [_run_name(root)]
    else:
        available = [_run_name(d) for d in subfolders(root) if (d / "train").is_dir()]
    if not available:
        raise DataError(
            f"no category folders with a train/ subfolder under {shown(root)}; {LAYOUT_HINT}"
        )
    chosen = _categories(data_config)
    if chosen is None:
        return available
    unknown = [c for c in chosen if c not in available]
    if unknown:
        raise DataError(
            f"unknown category {unknown[0]!r} under {shown(root)}; valid: {', '.join(available)}"
        )
    return chosen


def _category_dir(data_config, name: str, root: Path | None = None) -> Path:
    """Category ``name``'s folder: ``root`` itself when it holds ``train/`` and is named so."""
    root = resolved_root(root) if root is not None else _root(data_config)
    return root if (root / "train").is_dir() and root.name == name else root / name


def train_image_count(data_config, name: str) -> int:
    """How many normal training images category ``name`` lists (none decoded: a check before
    any work; a ``DataError`` if the folder has none)."""
    category_dir = _require_dir(_category_dir(data_config, name), f"category {name!r}")
    return len(_train_files(category_dir))


def load_root_split(data_config, name: str, root: Path | None = None) -> Split:
    """Loads category ``name`` of an MVTec-style root (``root`` overrides ``data_config.root``)."""
    return load_folder_split(
        _category_dir(data_config, name, root),
        name,
        image_size=data_config.image_size,
        holdout_fraction=data_config.holdout_fraction,
        skip_bad_images=data_config.skip_bad_images,
    )
