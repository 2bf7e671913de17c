"""Heat-map pictures drawn as pixels: an image with its anomaly map over it, in panels.

``reports`` writes them (the evaluation's grid of test images, predict's one picture per image).
They are composed here with NumPy and PIL, not matplotlib: a matplotlib figure of 16 panels took
~1.3 s to lay out and render, most of a small job's wall time (BENCHMARKS.md, "The whole job");
this draws the same grid in a few milliseconds. Every function is pure (arrays in, a uint8 RGB
array out); saving the PNG is the caller's.

Colours: the map is coloured with matplotlib's ``jet`` colormap between one ``low`` and ``high``
for all panels of a picture (so colours compare across images), blended half over the grey or
colour image; the ground-truth mask's outline is drawn in white.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from numpy.typing import ArrayLike
from PIL import Image, ImageDraw, ImageFont

PANEL = 176  # pixels of a panel's longer side
MARGIN = 6  # pixels between panels
TEXT_SIZE = 12
CMAP = "jet"
WHITE = (255, 255, 255)


def _font(size: int = TEXT_SIZE) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def displayable(image: ArrayLike) -> np.ndarray:
    """An image as uint8 RGB ``[H, W, 3]``: uint8 kept, other dtypes rescaled from [0, 1] (or
    from their own range when outside it, e.g. normalised to [-1, 1]); grey replicated."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.dtype != np.uint8:
        image = image.astype(np.float64)
        low, high = image.min(initial=0.0), image.max(initial=0.0)
        if low < 0.0 or high > 1.0:
            image = (image - low) / (high - low) if high > low else np.zeros_like(image)
        image = np.round(image * 255).astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return image[..., :3]


def panel(image: ArrayLike, longer: int = PANEL) -> np.ndarray:
    """``image`` (any :func:`displayable` form) as a uint8 RGB panel, its longer side ``longer``
    pixels (bilinear)."""
    image = displayable(image)
    scale = longer / max(image.shape[:2])
    size = max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale))
    return resized(image, size, smooth=True)


def resized(array: np.ndarray, size: tuple[int, int], smooth: bool) -> np.ndarray:
    """``array`` ([h, w] float or [h, w, 3] uint8) at ``size`` = (height, width), bilinear
    (``smooth``) or nearest."""
    resample = Image.BILINEAR if smooth else Image.NEAREST
    if array.ndim == 2:
        picture = Image.fromarray(np.asarray(array, np.float32), mode="F")
    else:
        picture = Image.fromarray(array)
    return np.asarray(picture.resize((size[1], size[0]), resample))


@functools.cache
def _colour_table() -> np.ndarray:
    """The ``jet`` colormap as 256 uint8 RGB rows."""
    return (colormaps[CMAP](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)


def colorize(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """uint8 RGB of ``values`` on the ``jet`` colormap, ``low`` to ``high``."""
    table = _colour_table()
    scaled = (np.asarray(values, np.float64) - low) / max(high - low, 1e-12)
    return table[np.clip(np.round(scaled * 255), 0, 255).astype(np.int64)]


def outline(mask: np.ndarray) -> np.ndarray:
    """The boundary pixels of a boolean mask (inside pixels with a 4-neighbour outside)."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    return mask & ~inner


def overlay(image: np.ndarray, heat_map: ArrayLike, low: float, high: float,
            mask: ArrayLike | None = None) -> np.ndarray:
    """A panel: the uint8 RGB ``image`` (already at panel size) with ``heat_map`` (any size,
    stretched bilinearly) coloured half over it, and ``mask``'s outline in white."""
    size = image.shape[:2]
    heat = colorize(resized(np.asarray(heat_map, np.float32), size, smooth=True), low, high)
    blended = (0.5 * image.astype(np.float32) + 0.5 * heat).round().astype(np.uint8)
    if mask is not None:
        edge = outline(resized(np.asarray(mask, np.float32), size, smooth=False) > 0.5)
        blended[edge] = WHITE
    return blended


def titled(panel: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    """``panel`` below its title lines (black on white)."""
    font = _font()
    strip = Image.new("RGB", (panel.shape[1], (TEXT_SIZE + 3) * len(lines) + 2), WHITE)
    draw = ImageDraw.Draw(strip)
    for index, line in enumerate(lines):
        draw.text((panel.shape[1] // 2, 1 + index * (TEXT_SIZE + 3)), line, fill=(0, 0, 0),
                  font=font, anchor="ma")
    return np.concatenate([np.asarray(strip), panel])


def colorbar(low: float, high: float, height: int, label: str = "anomaly map") -> np.ndarray:
    """A vertical colour scale ``height`` pixels high, ``low`` at the bottom, with 5 values and
    ``label`` written beside it."""
    font = _font(TEXT_SIZE - 1)
    bar_height, bar_width = max(height - 2 * TEXT_SIZE, 8), 14
    values = np.linspace(high, low, bar_height)[:, None].repeat(bar_width, axis=1)
    picture = Image.new("RGB", (bar_width + 70, height), WHITE)
    picture.paste(Image.fromarray(colorize(values, low, high)), (0, TEXT_SIZE))
    draw = ImageDraw.Draw(picture)
    for fraction in np.linspace(0.0, 1.0, 5):
        y = TEXT_SIZE + round((1 - fraction) * (bar_height - 1))
        draw.line([(bar_width, y), (bar_width + 3, y)], fill=(0, 0, 0))
        draw.text((bar_width + 5, y), f"{low + fraction * (high - low):.3g}", fill=(0, 0, 0),
                  font=font, anchor="lm")
    label_picture = Image.new("RGB", (height, TEXT_SIZE + 4), WHITE)
    ImageDraw.Draw(label_picture).text((height // 2, 1), label, fill=(0, 0, 0), font=font,
                                       anchor="ma")
    picture.paste(label_picture.rotate(90, expand=True), (bar_width + 52, 0))
    return np.asarray(picture)


def stack(pictures: Sequence[np.ndarray], axis: int, margin: int = MARGIN) -> np.ndarray:
    """Pictures side by side (``axis=1``) or one above the other (``axis=0``), white between
    them and around the smaller ones."""
    cross = 1 - axis
    extent = max(picture.shape[cross] for picture in pictures)
    parts = []
    for index, picture in enumerate(pictures):
        pad = [(0, 0), (0, 0), (0, 0)]
        pad[cross] = (0, extent - picture.shape[cross])
        if index:
            pad[axis] = (margin, 0)
        parts.append(np.pad(picture, pad, constant_values=255))
    return np.concatenate(parts, axis=axis)


def header(picture: np.ndarray, title: str) -> np.ndarray:
    """``picture`` under a title line in a larger font, with a white margin all round."""
    font = _font(TEXT_SIZE + 3)
    strip = Image.new("RGB", (picture.shape[1], TEXT_SIZE + 12), WHITE)
    ImageDraw.Draw(strip).text((picture.shape[1] // 2, 4), title, fill=(0, 0, 0), font=font,
                               anchor="ma")
    whole = np.concatenate([np.asarray(strip), picture])
    return np.pad(whole, [(MARGIN, MARGIN), (MARGIN, MARGIN), (0, 0)], constant_values=255)


def map_range(maps: ArrayLike) -> tuple[float, float]:
    """One colour scale over all maps: their minimum and maximum (a constant map gets a
    non-empty range)."""
    maps = np.asarray(maps, np.float64)
    low, high = float(maps.min()), float(maps.max())
    return low, max(high, low + 1e-12)
