"""Dummy MVTec AD folders for tests (anomalib-style): small random images with square defects.

``make_mvtec_folder(tmp_path)`` writes ``<root>/<category>/{train/good, test/good, test/<defect>,
ground_truth/<defect>/<stem>_mask.png}``; each defect image has one bright square whose exact
pixels are its mask. Deterministic from ``seed``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image


def default_data_config(**overrides):
    """``configs/default.py``'s ``config.data`` (loaded by path, not on sys.path)."""
    path = Path(__file__).resolve().parents[1] / "configs" / "default.py"
    spec = importlib.util.spec_from_file_location("fcd_default_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    data = module.get_config().data
    data.update(overrides)
    return data


def _normal_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random RGB image (a 4x4 grid upsampled), darker than 200 everywhere."""
    coarse = rng.integers(20, 180, size=(4, 4, 3), dtype=np.uint8)
    return np.array(Image.fromarray(coarse).resize((size, size), Image.BILINEAR))


def defect_square(rng: np.random.Generator, size: int) -> tuple[slice, slice]:
    side = max(size // 4, 2)
    top, left = rng.integers(0, size - side + 1, size=2)
    return slice(top, top + side), slice(left, left + side)


def make_mvtec_folder(
    root: str | Path,
    categories: Sequence[str] = ("bottle",),
    n_train: int = 6,
    n_test_good: int = 3,
    defects: Sequence[str] = ("broken", "contamination"),
    n_test_per_defect: int = 2,
    size: int = 32,
    seed: int = 0,
    masks: bool = True,
) -> Path:
    """Writes the dummy folder and returns ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for category in categories:
        base = root / category
        for folder, count in (("train/good", n_train), ("test/good", n_test_good)):
            (base / folder).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(_normal_image(rng, size)).save(base / folder / f"{i:03d}.png")
        for defect in defects:
            (base / "test" / defect).mkdir(parents=True, exist_ok=True)
            if masks:
                (base / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
            for i in range(n_test_per_defect):
                image = _normal_image(rng, size)
                mask = np.zeros((size, size), np.uint8)
                rows, cols = defect_square(rng, size)
                image[rows, cols] = 255
                mask[rows, cols] = 255
                Image.fromarray(image).save(base / "test" / defect / f"{i:03d}.png")
                if masks:
                    Image.fromarray(mask).save(base / "ground_truth" / defect / f"{i:03d}_mask.png")
    return root
