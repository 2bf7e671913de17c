"""Image and mask files -> uint8 arrays at one size (the per-file half of ``folders``; ``predict``).

- Listing: files whose suffix is in ``IMAGE_SUFFIXES``; hidden entries (``.ipynb_checkpoints``,
  ``.DS_Store``, macOS's AppleDouble ``._*`` files) are never read; a dangling symlink is listed,
  so that reading it reports it like any unreadable image.
- Images: the EXIF orientation is applied (``ImageOps.exif_transpose``: the image as a viewer shows
  it); gray, 16-bit, palette, CMYK, RGB and RGBA (alpha dropped) become RGB uint8, resized once
  on the host with PIL bilinear.
- Masks: EXIF orientation applied; gray, 16-bit, bilevel or RGB(A) with a non-zero value in any
  colour channel marking a defect pixel (RGBA and palette: where it is not transparent); resized
  with nearest neighbour. A mask must have its image's size.

Names that are not UTF-8 (bytes on Linux, decoded with surrogate escapes) are read like any other;
messages show them with the undecodable bytes escaped (``shown``). Every bad file raises one
``DataError`` line naming the file and the fix.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from fcd_jax.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SKIP_HINT = "fix or delete it, or set --config.data.skip_bad_images=True to skip bad images"
EXIF_ORIENTATION = 0x0112  # values 5-8 turn the image by 90 degrees: width and height swap
_MASK_HINT = "save masks as gray or RGB PNGs (0 = normal, non-zero = defect)"


def shown(path: str | os.PathLike) -> str:
    """``path`` for a message: undecodable bytes of a non-UTF-8 name as ``\\xNN``."""
    return os.fsencode(os.fspath(path)).decode("utf-8", "backslashreplace")


def is_hidden(path: Path) -> bool:
    """Hidden files and folders (``.*``, which covers macOS's ``._*`` AppleDouble files)."""
    return path.name.startswith(".")


def visible_entries(directory: Path) -> list[Path]:
    """The entries of ``directory`` that are not hidden, sorted by name."""
    return sorted(entry for entry in directory.iterdir() if not is_hidden(entry))


def is_image_file(path: Path) -> bool:
    """An image suffix on a file, or on a dangling symlink (reading it then reports it)."""
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return False
    return path.is_file() or (path.is_symlink() and not path.exists())


def list_image_files(directory: Path) -> list[Path]:
    """The visible image files directly in ``directory``, sorted by name."""
    return [path for path in visible_entries(Path(directory)) if is_image_file(path)]


def other_files_note(directory: Path) -> str:
    """" (it holds 3 files of other types: .gif, .webp)" or "" : for "no images" messages."""
    others = [p for p in visible_entries(directory) if p.is_file() and not is_image_file(p)]
    if not others:
        return ""
    suffixes = sorted({p.suffix.lower() or "(no suffix)" for p in others})
    return f" (it holds {len(others)} file(s) of other types: {', '.join(suffixes[:5])})"


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def open_upright(path: Path, what: str = "image") -> Image.Image:
    """Opens and fully decodes ``path`` (truncated files fail here), EXIF orientation applied."""
    if path.is_symlink() and not path.exists():
        raise DataError(
            f"cannot read {what} {shown(path)}: it is a symlink to {shown(os.readlink(path))}, "
            f"which does not exist; {SKIP_HINT}"
        )
    try:
        with Image.open(path) as image:
            image.load()
            return ImageOps.exif_transpose(image)
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBomb..
        raise DataError(f"cannot read {what} {shown(path)} ({_one_line(error)}); {SKIP_HINT}") \
            from None


def upright_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file as ``open_upright`` gives it, from its header only."""
    with Image.open(path) as image:
        width, height = image.size
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def to_rgb(image: Image.Image) -> np.ndarray:
    """Any PIL mode -> uint8 ``[h, w, 3]``; 16-bit gray is scaled, alpha is dropped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        gray = np.clip(np.round(values * (255.0 / peak)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if image.mode == "F":
        raise ValueError("floating-point images are not supported; save it as 8-bit")
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def resize_to_square(array: np.ndarray, image_size: int, resample: int) -> np.ndarray:
    if array.shape[:2] == (image_size, image_size):
        return array
    resized = Image.fromarray(array).resize((image_size, image_size), resample)
    return np.asarray(resized, dtype=np.uint8)


def load_image(path: str | os.PathLike, image_size: int) -> np.ndarray:
    """One image file -> RGB uint8 ``[image_size, image_size, 3]`` (PIL bilinear resize)."""
    path = Path(path)
    image = open_upright(path)
    try:
        array = to_rgb(image)
    except ValueError as error:
        raise DataError(f"cannot read image {shown(path)} ({error}); {SKIP_HINT}") from None
    return resize_to_square(array, image_size, Image.BILINEAR)


def mask_to_binary(mask: Image.Image) -> np.ndarray:
    """A mask image -> uint8 ``[h, w]`` in {0, 1}: 1 where any colour channel is non-zero (and,
    with transparency, where the pixel is not transparent); ``ValueError`` for other modes."""
    if mask.mode in ("1", "L", "I", "I;16", "I;16B", "I;16L", "F"):
        return (np.asarray(mask) > 0).astype(np.uint8)
    if mask.mode in ("P", "PA"):
        mask = mask.convert("RGBA")
    if mask.mode in ("LA", "RGB", "RGBA"):
        values = np.asarray(mask).reshape(mask.height, mask.width, -1)
        colour = values if mask.mode == "RGB" else values[..., :-1]
        defect = (colour > 0).any(axis=-1)
        if mask.mode != "RGB":  # the last channel is alpha: transparent pixels are normal
            defect &= values[..., -1] > 0
        return defect.astype(np.uint8)
    raise ValueError(f"a {mask.mode} mask has no defect/normal reading")


def load_mask(path: Path, image_path: Path, image_size: int) -> np.ndarray:
    """A mask file -> uint8 ``[image_size, image_size]`` in {0, 1} (nearest-neighbour resize).

    The mask must have its image's size (both upright, checked before any resizing).
    """
    mask = open_upright(path, "mask")
    image_wh = upright_size(image_path)
    if mask.size != image_wh:
        raise DataError(
            f"mask {shown(path)} is {mask.size[0]}x{mask.size[1]} but its image "
            f"{shown(image_path)} is {image_wh[0]}x{image_wh[1]}; masks must have their image's "
            f"size ({SKIP_HINT})"
        )
    try:
        binary = mask_to_binary(mask)
    except ValueError as error:
        raise DataError(f"cannot read mask {shown(path)} ({error}): {_MASK_HINT}") from None
    return resize_to_square(binary, image_size, Image.NEAREST)


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
    skipped = [shown(paths[i]) for i, result in enumerate(results) if isinstance(result, DataError)]
    images = (
        np.stack([results[i] for i in kept])
        if kept
        else np.zeros((0, image_size, image_size, 3), np.uint8)
    )
    return images, kept, skipped
