"""Offline datasets that need no download, for the demo and the tests.

- ``digits``: scikit-learn's bundled 8x8 digits; one digit normal per run (10 runs, named "0".."9");
  a fixed seeded split of the normal digit into train and test; every other digit is anomalous.
- ``textures``: an MVTec-style folder generated from scikit-image's bundled ``brick``, ``grass`` and
  ``gravel`` photographs: normal crops for train and test from disjoint regions (rows above and
  below ``TRAIN_ROWS``) and test crops with synthetic defects with exact pixel masks. The folder is
  read back through ``folders.load_folder_split``, like MVTec AD. Same spec -> same bytes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from fcd_jax.datasets import folders
from fcd_jax.datasets.split import Split, one_class_split
from fcd_jax.errors import DataError

DIGITS = tuple(str(d) for d in range(10))
DIGITS_TEST_FRACTION = 0.3  # of the normal digit's images, kept for the test set


def load_digits_split(data_config, name: str) -> Split:
    """Run ``name`` ("0".."9") of ``digits``: uint8 ``[8, 8, 1]`` images, 0..16 scaled to 0..255."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    targets = digits.target.astype(np.int32)
    normal_class = DIGITS.index(name)
    normal = np.flatnonzero(targets == normal_class)
    order = np.random.default_rng(int(data_config.get("split_seed", 0))).permutation(len(normal))
    n_test_normal = int(round(len(normal) * DIGITS_TEST_FRACTION))
    train_idx = np.sort(normal[order[n_test_normal:]])
    test_idx = np.sort(
        np.concatenate([normal[order[:n_test_normal]], np.flatnonzero(targets != normal_class)])
    )
    return one_class_split(
        name,
        normal_images=images[train_idx],
        test_images=images[test_idx],
        test_labels=(targets[test_idx] != normal_class).astype(np.int32),
        test_classes=targets[test_idx],
        test_class_names=list(DIGITS),
        holdout_fraction=data_config.holdout_fraction,
    )


# --- textures ------------------------------------------------------------------------------------

TEXTURES = ("brick", "grass", "gravel")
DEFECTS = ("scratch", "hole", "patch", "stain")  # stain: a local intensity change
TRAIN_ROWS = 320  # of the 512-row photographs: rows above for train crops, below for test crops
PHOTO_ROWS = 512  # skimage's brick, grass and gravel are 512 x 512
MAX_CROP = min(TRAIN_ROWS, PHOTO_ROWS - TRAIN_ROWS)  # a crop must fit the train and the test rows
_COMPLETE = "textures_spec.json"  # written last; marks a finished folder and records its spec


@dataclasses.dataclass(frozen=True)
class TextureSpec:
    """What ``build_textures`` writes; every field changes the bytes."""

    crop: int = 64
    n_train: int = 80
    n_test_good: int = 12
    n_test_per_defect: int = 6  # per defect kind, so 4x this many anomalous test images
    seed: int = 0

    def dir_name(self) -> str:
        return (
            f"textures_{self.crop}px_seed{self.seed}_"
            f"{self.n_train}-{self.n_test_good}-{self.n_test_per_defect}"
        )


def _photographs() -> dict[str, np.ndarray]:
    import skimage.data

    return {name: np.asarray(getattr(skimage.data, name)(), np.uint8) for name in TEXTURES}


def _random_crop(photo: np.ndarray, rows: tuple[int, int], crop: int, rng) -> np.ndarray:
    top = rng.integers(rows[0], rows[1] - crop + 1)
    left = rng.integers(0, photo.shape[1] - crop + 1)
    return photo[top : top + crop, left : left + crop].copy()


def _ellipse_mask(crop: int, rng, radius_range: tuple[float, float]) -> np.ndarray:
    from skimage.draw import ellipse

    radii = rng.uniform(*radius_range, size=2) * crop
    center = rng.uniform(0.25, 0.75, size=2) * crop
    rr, cc = ellipse(
        center[0], center[1], radii[0], radii[1], shape=(crop, crop), rotation=rng.uniform(0, np.pi)
    )
    mask = np.zeros((crop, crop), bool)
    mask[rr, cc] = True
    return mask


def _scratch_mask(crop: int, rng) -> np.ndarray:
    """A straight line 1-3 px wide, 30-70% of the crop long, at a random angle."""
    from skimage.draw import polygon

    center = rng.uniform(0.3, 0.7, size=2) * crop
    angle = rng.uniform(0, np.pi)
    half_length = rng.uniform(0.15, 0.35) * crop
    half_width = rng.uniform(0.5, 1.5)
    along = np.array([np.sin(angle), np.cos(angle)])
    across = np.array([np.cos(angle), -np.sin(angle)])
    corners = np.stack(
        [
            center + sa * half_length * along + sc * half_width * across
            for sa, sc in ((1, 1), (1, -1), (-1, -1), (-1, 1))
        ]
    )
    rr, cc = polygon(corners[:, 0], corners[:, 1], shape=(crop, crop))
    mask = np.zeros((crop, crop), bool)
    mask[rr, cc] = True
    return mask


def add_defect(
    image: np.ndarray, kind: str, other: np.ndarray, rng
) -> tuple[np.ndarray, np.ndarray]:
    """Returns (defective copy of gray ``image``, uint8 {0, 1} mask of the changed region).

    ``other`` is a crop of another texture, pasted inside the region for ``kind="patch"``.
    """
    crop = image.shape[0]
    out = image.astype(np.float64)
    if kind == "scratch":
        mask = _scratch_mask(crop, rng)
        out[mask] = rng.uniform(225, 255) if rng.random() < 0.5 else rng.uniform(0, 30)
    elif kind == "hole":
        mask = _ellipse_mask(crop, rng, (0.06, 0.14))
        out[mask] = rng.uniform(5, 30) + rng.normal(0, 4, size=int(mask.sum()))
    elif kind == "patch":
        mask = _ellipse_mask(crop, rng, (0.1, 0.2))
        out[mask] = other[mask]
    elif kind == "stain":
        mask = _ellipse_mask(crop, rng, (0.1, 0.2))
        out[mask] = out[mask] * 0.5 if rng.random() < 0.5 else out[mask] * 0.5 + 127
    else:
        raise ValueError(f"unknown defect kind {kind!r}; use one of {DEFECTS}")
    return np.clip(np.round(out), 0, 255).astype(np.uint8), mask.astype(np.uint8)


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="png", optimize=False)


def build_textures(root: str | os.PathLike, spec: TextureSpec = TextureSpec()) -> Path:
    """Writes the MVTec-style ``textures`` folder to ``root`` (atomically); returns ``root``.

    Deterministic: the same spec writes the same bytes.
    """
    root = Path(root)
    photos = _photographs()
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    for t, texture in enumerate(TEXTURES):
        rng = np.random.default_rng([spec.seed, t])
        photo = photos[texture]
        train_rows, test_rows = (0, TRAIN_ROWS), (TRAIN_ROWS, PHOTO_ROWS)
        base = staging / texture
        for i in range(spec.n_train):
            _save_png(
                _random_crop(photo, train_rows, spec.crop, rng),
                base / "train/good" / f"{i:03d}.png",
            )
        for i in range(spec.n_test_good):
            _save_png(
                _random_crop(photo, test_rows, spec.crop, rng), base / "test/good" / f"{i:03d}.png"
            )
        others = [photos[o] for o in TEXTURES if o != texture]
        for kind in DEFECTS:
            for i in range(spec.n_test_per_defect):
                image = _random_crop(photo, test_rows, spec.crop, rng)
                other = _random_crop(others[i % len(others)], (0, PHOTO_ROWS), spec.crop, rng)
                defective, mask = add_defect(image, kind, other, rng)
                _save_png(defective, base / "test" / kind / f"{i:03d}.png")
                _save_png(mask * 255, base / "ground_truth" / kind / f"{i:03d}_mask.png")
    (staging / _COMPLETE).write_text(json.dumps(dataclasses.asdict(spec), sort_keys=True))
    if root.exists():
        shutil.rmtree(root)
    try:
        os.replace(staging, root)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    return root


def texture_spec(data_config) -> TextureSpec:
    """The ``TextureSpec`` from the optional ``data_config.textures`` fields, else defaults."""
    overrides = dict(data_config.get("textures", None) or {})
    unknown = set(overrides) - {f.name for f in dataclasses.fields(TextureSpec)}
    if unknown:
        raise DataError(
            f"unknown config.data.textures field(s) {sorted(unknown)}; "
            f"valid: {[f.name for f in dataclasses.fields(TextureSpec)]}"
        )
    spec = TextureSpec(**overrides)
    if not 1 <= spec.crop <= MAX_CROP:
        raise DataError(
            f"config.data.textures.crop={spec.crop}: use 1..{MAX_CROP} pixels (a crop must fit "
            f"the {TRAIN_ROWS} training rows and the {PHOTO_ROWS - TRAIN_ROWS} test rows)"
        )
    for field, least in dict(n_train=1, n_test_good=0, n_test_per_defect=0).items():
        if getattr(spec, field) < least:
            raise DataError(
                f"config.data.textures.{field}={getattr(spec, field)}: use at least {least}"
            )
    return spec


def textures_location(data_config) -> tuple[Path, TextureSpec, bool]:
    """``(root, spec, built)``: ``data_config.root`` if set, else a per-spec folder in the user
    cache, and whether the textures of ``spec`` are there already. Nothing is written; a
    ``DataError`` line if the folder cannot take them (a file, or a folder of other files)."""
    spec = texture_spec(data_config)
    if data_config.get("root", ""):
        root = folders.resolved_root(data_config.root)
    else:
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        root = cache / "fcd_jax" / spec.dir_name()
    marker = root / _COMPLETE
    if marker.is_file() and json.loads(marker.read_text()) == dataclasses.asdict(spec):
        return root, spec, True
    if root.exists() and not root.is_dir():
        raise DataError(f"{root} is a file: point --config.data.root to an empty or new folder")
    if root.exists() and any(root.iterdir()) and not marker.is_file():
        raise DataError(
            f"{root} is not empty and holds no generated textures; "
            "point --config.data.root to an empty or new folder"
        )
    return root, spec, False


def textures_root(data_config) -> Path:
    """The textures' folder (``textures_location``), built on first use."""
    root, spec, built = textures_location(data_config)
    return root if built else build_textures(root, spec)


def load_textures_split(data_config, name: str) -> Split:
    return folders.load_root_split(data_config, name, root=textures_root(data_config))
