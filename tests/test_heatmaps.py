"""``fcd_jax.heatmaps``: heat-map pictures drawn as pixels, against plain NumPy and matplotlib's
own colormap; and the grid ``reports.plot_heatmap_grid`` writes with them."""

import numpy as np
from matplotlib import colormaps
from PIL import Image

from fcd_jax import heatmaps, reports


def jet(fraction):
    return (np.asarray(colormaps["jet"](fraction))[..., :3] * 255).round().astype(np.uint8)


def test_colorize_is_matplotlibs_jet_between_low_and_high():
    values = np.array([[-1.0, 2.0, 5.0, 9.0]])
    np.testing.assert_array_equal(heatmaps.colorize(values, 2.0, 5.0)[0],
                                  jet(np.array([0.0, 0.0, 1.0, 1.0])))
    np.testing.assert_array_equal(heatmaps.colorize(np.array([3.5]), 2.0, 5.0)[0],
                                  jet(np.round(0.5 * 255) / 255))


def test_outline_is_the_masks_boundary():
    mask = np.zeros((10, 10), bool)
    mask[2:6, 3:8] = True  # 4 x 5
    edge = heatmaps.outline(mask)
    assert edge.sum() == 2 * 5 + 2 * (4 - 2)
    assert not edge[3:5, 4:7].any() and edge[2, 3] and edge[5, 7]


def test_overlay_blends_half_and_draws_the_outline_white():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    mask = np.zeros((8, 8))
    mask[2:6, 2:6] = 1
    picture = heatmaps.overlay(image, np.zeros((2, 2)), 0.0, 1.0, mask)
    expected = np.round(0.5 * image + 0.5 * jet(0.0)).astype(np.uint8)
    edge = heatmaps.outline(mask > 0.5)
    np.testing.assert_array_equal(picture[~edge], expected[~edge])
    assert (picture[edge] == 255).all()


def test_displayable_rescales_and_replicates_grey():
    grey = np.array([[-1.0, 1.0]])
    np.testing.assert_array_equal(heatmaps.displayable(grey), [[[0, 0, 0], [255, 255, 255]]])
    unit = np.array([[[0.5]]])
    assert heatmaps.displayable(unit).shape == (1, 1, 3)


def test_grid_lays_out_images_in_rows_and_columns(tmp_path):
    rng = np.random.default_rng(0)

    def grid(n, masks):
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        path = tmp_path / f"{n}_{masks}.png"
        reports.plot_heatmap_grid(path, images, rng.random((n, 4, 4)),
                                  np.ones((n, 32, 32)) if masks else None, rng.random(n),
                                  np.arange(n) % 2, threshold=0.5)
        with Image.open(path) as picture:
            return picture.size

    (w8, h8), (w9, _), (w4, h4) = grid(8, True), grid(9, True), grid(4, True)
    w8_no_masks, _ = grid(8, False)
    panel = heatmaps.PANEL + heatmaps.MARGIN
    assert w8 - w8_no_masks == panel  # the ground-truth column
    assert w9 - w8 > 2 * panel  # 9 images: two groups of rows side by side
    assert h8 - h4 >= 4 * heatmaps.PANEL
    assert w4 == w8
