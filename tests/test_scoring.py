"""fcd_jax.scoring against plain NumPy / scipy (METHOD.md eqs. 7-10 and the anomaly map)."""

import contextlib
import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.ndimage

from fcd_jax import evaluate, scoring
from fcd_jax.errors import FcdError
from fcd_jax.networks import build_networks
from fcd_jax.preprocessing import preprocess


def method_config(layers, anchor_layers, top_k, image_score="paper", map_sigma=1.5,
                  anchor_weight=1.0):
    return ml_collections.ConfigDict(
        dict(layers=layers, anchor_layers=anchor_layers, top_k=top_k, image_score=image_score,
             map_sigma=map_sigma, anchor_weight=anchor_weight, gram_weight=1.0)
    )


def random_features(seed, num_layers, batch, tokens, width):
    rng = np.random.default_rng(seed)
    teacher = rng.normal(size=(num_layers, batch, tokens, width)).astype(np.float32) * 2
    student = (teacher + rng.normal(size=teacher.shape) * 2).astype(np.float32)
    anchor = rng.normal(size=(num_layers, width)).astype(np.float32)
    return teacher, student, anchor


def np_scores(teacher, student, anchor, layers, anchor_layers, top_k, grid_w):
    """Eqs. 7-10 and the patch grid, one image and one token at a time, in float64."""
    def diff(t, s):
        t, s = t.astype(np.float64), s.astype(np.float64)
        return np.linalg.norm(t - s) + 1 - t @ s / (np.linalg.norm(t) * np.linalg.norm(s))

    batch, tokens = teacher.shape[1], teacher.shape[2]
    s_d, s_a = np.zeros(batch), np.zeros(batch)
    patch_diff = np.zeros((batch, (tokens - 1) // grid_w, grid_w))
    for b in range(batch):
        for c in layers:
            patches = [diff(teacher[c, b, p], student[c, b, p]) for p in range(1, tokens)]
            s_d[b] += diff(teacher[c, b, 0], student[c, b, 0])
            s_d[b] += np.mean(sorted(patches, reverse=True)[:top_k])
            for p, value in enumerate(patches):
                patch_diff[b, p // grid_w, p % grid_w] += value
        for i, c in enumerate(anchor_layers):
            s_a[b] += np.linalg.norm(teacher[c, b, 0] - anchor[i].astype(np.float64))
            s_a[b] += np.linalg.norm(student[c, b, 0] - anchor[i].astype(np.float64))
    return s_d, s_a, patch_diff


def np_bilinear(grid, height, width):
    """Half-pixel-centre bilinear upsampling of one [h, w] grid, edges clamped."""
    def taps(out_size, in_size):
        source = np.clip((np.arange(out_size) + 0.5) * in_size / out_size - 0.5, 0, in_size - 1)
        low = np.floor(source).astype(int)
        high = np.minimum(low + 1, in_size - 1)
        return low, high, source - low

    rows_low, rows_high, row_frac = taps(height, grid.shape[0])
    cols_low, cols_high, col_frac = taps(width, grid.shape[1])
    rows = grid[rows_low] * (1 - row_frac)[:, None] + grid[rows_high] * row_frac[:, None]
    return rows[:, cols_low] * (1 - col_frac) + rows[:, cols_high] * col_frac


# (num_layers, batch, grid_h, grid_w, width, layers, anchor_layers, top_k)
CASES = [
    (4, 2, 3, 3, 8, (3,), (3,), 1),  # one-layer groupc, k = 1
    (5, 3, 2, 4, 6, (0, 2, 4), (2, 4), 8),  # several anchor layers, k = number of patches
    (12, 2, 4, 4, 16, (3, 6, 9, 11), (11,), 5),  # the paper's groupc
]


@pytest.mark.parametrize("case", CASES)
def test_anomaly_scores_match_numpy(case):
    num_layers, batch, grid_h, grid_w, width, layers, anchor_layers, top_k = case
    teacher, student, anchor_base = random_features(
        0, num_layers, batch, 1 + grid_h * grid_w, width
    )
    anchor = anchor_base[list(anchor_layers)]
    config = method_config(layers, anchor_layers, top_k)
    got = jax.jit(
        lambda t, s, a: scoring.anomaly_scores(t, s, a, config, grid_shape=(grid_h, grid_w))
    )(teacher[: max(layers) + 1], student, anchor)
    s_d, s_a, patch_diff = np_scores(teacher, student, anchor, layers, anchor_layers, top_k, grid_w)
    np.testing.assert_allclose(got["s_d"], s_d, rtol=1e-5)
    np.testing.assert_allclose(got["s_a"], s_a, rtol=1e-5)
    np.testing.assert_allclose(got["score"], s_d + s_a, rtol=1e-5)
    np.testing.assert_allclose(got["patch_diff"], patch_diff, rtol=1e-5)
    assert got["patch_diff"].shape == (batch, grid_h, grid_w)
    assert "map" not in got


@pytest.mark.parametrize("anchor_weight", [0.0, 0.5])
def test_score_drops_s_a_only_without_the_anchor_term(anchor_weight):
    """anchor_weight 0: score = S_D (no S_A without L_anchor, "The paper's ablations"); any other
    weight keeps eq. 10 unweighted."""
    num_layers, batch, grid_h, grid_w, width, layers, anchor_layers, top_k = CASES[-1]
    teacher, student, anchor_base = random_features(
        3, num_layers, batch, 1 + grid_h * grid_w, width
    )
    anchor = anchor_base[list(anchor_layers)]
    config = method_config(layers, anchor_layers, top_k, anchor_weight=anchor_weight)
    got = jax.jit(
        lambda t, s, a: scoring.anomaly_scores(t, s, a, config, grid_shape=(grid_h, grid_w))
    )(teacher, student, anchor)
    s_d, s_a, _ = np_scores(teacher, student, anchor, layers, anchor_layers, top_k, grid_w)
    want = s_d if anchor_weight == 0.0 else s_d + s_a
    np.testing.assert_allclose(got["score"], want, rtol=1e-5)
    np.testing.assert_allclose(got["s_a"], s_a, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_top_k_mean_matches_sorting(k):
    values = np.random.default_rng(1).normal(size=(2, 3, 7)).astype(np.float32)
    want = np.sort(values, axis=-1)[..., ::-1][..., :k].mean(axis=-1)
    np.testing.assert_allclose(scoring.top_k_mean(jnp.asarray(values), k), want, rtol=1e-6)


@pytest.mark.parametrize("k", [0, 8])
def test_top_k_mean_rejects_k_outside_the_patches(k):
    with pytest.raises(FcdError, match="between 1 and 7"):
        scoring.top_k_mean(jnp.zeros((2, 7)), k)


def test_max_image_score_is_the_maximum_of_the_smoothed_map():
    teacher, student, anchor = random_features(2, 3, 2, 1 + 16, 8)
    config = method_config((0, 2), (2,), 4, image_score="max", map_sigma=2.0)
    got = jax.jit(
        lambda t, s, a: scoring.anomaly_scores(t, s, a, config, image_size=(16, 12))
    )(teacher, student, anchor[2:])
    want_map = np.stack([
        scipy.ndimage.gaussian_filter(np_bilinear(grid.astype(np.float64), 16, 12), 2.0)
        for grid in np.asarray(got["patch_diff"])
    ])
    assert got["map"].shape == (2, 16, 12)
    np.testing.assert_allclose(got["map"], want_map, rtol=1e-5)
    np.testing.assert_allclose(got["score"], np.max(want_map, axis=(1, 2)), rtol=1e-5)
    with pytest.raises(FcdError, match="pass image_size"):
        scoring.anomaly_scores(teacher, student, anchor[2:], config)


def test_anomaly_scores_reject_bad_grid_and_image_score():
    teacher, student, anchor = random_features(3, 2, 1, 1 + 6, 4)
    with pytest.raises(FcdError, match="square grid"):
        scoring.anomaly_scores(teacher, student, anchor[1:], method_config((1,), (1,), 2))
    with pytest.raises(FcdError, match="unknown image_score"):
        scoring.anomaly_scores(
            teacher, student, anchor[1:], method_config((1,), (1,), 2, image_score="mean"),
            grid_shape=(2, 3),
        )


def test_upsampling_a_constant_grid_gives_a_constant_map():
    anomaly_map = jax.jit(scoring.anomaly_map, static_argnums=(1, 2))
    grid = jnp.full((2, 3, 5), 1.75)
    for sigma in (0.0, 3.0):
        np.testing.assert_allclose(anomaly_map(grid, (17, 23), sigma), 1.75, rtol=1e-6)


def test_upsampling_is_half_pixel_bilinear():
    grid = np.random.default_rng(4).normal(size=(2, 3, 4)).astype(np.float32)
    got = jax.jit(scoring.anomaly_map, static_argnums=(1, 2))(jnp.asarray(grid), (12, 20), 0.0)
    want = np.stack([np_bilinear(g.astype(np.float64), 12, 20) for g in grid])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("in_size, out_size", [(3, 17), (14, 224), (16, 15), (56, 40), (9, 2)])
def test_upsample_matrix_is_jax_image_resize_without_compiling(in_size, out_size):
    want = jax.image.resize(jnp.eye(in_size), (out_size, in_size), "bilinear")
    scoring.upsample_matrix.cache_clear()
    with jax.log_compiles(True), _captured_logs() as records:
        got = scoring.upsample_matrix(in_size, out_size)
    np.testing.assert_allclose(got, want, atol=2e-6)  # jax computes the positions in float32
    assert not [r for r in records if "Compiling" in r.getMessage()]


@contextlib.contextmanager
def _captured_logs():
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


@pytest.mark.parametrize("sigma", [0.6, 2.0, 4.0, 9.0])
def test_gaussian_blur_matches_scipy_reflect(sigma):
    maps = np.random.default_rng(5).normal(size=(2, 20, 26)).astype(np.float32)
    got = jax.jit(scoring.gaussian_blur, static_argnums=1)(jnp.asarray(maps), sigma)
    want = np.stack(
        [scipy.ndimage.gaussian_filter(m.astype(np.float64), sigma, mode="reflect") for m in maps]
    )
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_score_step_runs_a_tiny_vit_end_to_end(tiny_config):
    """The production score step, uint8 images in: eqs. 7-10 on the ViTs' blocks."""
    config = tiny_config(layers=(1, 3), anchor_layers=(3,), top_k=5, map_sigma=2.0)
    networks = build_networks(config)
    rng = np.random.default_rng(6)
    images = rng.integers(0, 256, size=(1, 3, 16, 16, 3), dtype=np.uint8)
    # Random parameters of the right shapes, without compiling the initialisers.
    shapes = jax.eval_shape(
        lambda: networks.student.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
    )
    random_params = lambda: jax.tree.map(
        lambda leaf: jnp.asarray(rng.normal(size=leaf.shape) * 0.3, jnp.float32), shapes
    )
    teacher_params, student_params = random_params(), random_params()
    anchor = jnp.zeros((1, 32))
    score_step = evaluate.make_score_step(config, networks)

    got = score_step(teacher_params, student_params, anchor, images)
    assert got["score"].shape == (3,) and got["map"].shape == (3, 16, 16)
    assert all(np.all(np.isfinite(value)) for value in got.values())
    normalised = preprocess(images[0], config.data)
    blocks = jax.jit(lambda p: networks.student.apply({"params": p}, normalised)["blocks"])
    teacher_blocks, student_blocks = blocks(teacher_params), blocks(student_params)
    s_d, s_a, _ = np_scores(
        np.asarray(teacher_blocks), np.asarray(student_blocks), np.zeros((1, 32)), (1, 3), (3,),
        5, grid_w=4,
    )
    np.testing.assert_allclose(got["score"], s_d + s_a, rtol=1e-5)
    # A student equal to its teacher has no feature difference: S_D = 0, S_A = 2 ||T_cls||.
    same = score_step(teacher_params, teacher_params, anchor, images)
    np.testing.assert_allclose(same["map"], 0.0, atol=1e-4)
    cls = np.asarray(teacher_blocks)[3, :, 0]
    np.testing.assert_allclose(same["score"], 2 * np.linalg.norm(cls, axis=-1), rtol=1e-4)


@pytest.mark.parametrize("image_score", ["paper", "max"])
def test_score_step_without_maps_gives_the_same_scores(tiny_config, image_score):
    """``with_maps=False`` leaves out the full-resolution map (for "max" it is still scored)."""
    config = tiny_config(image_score=image_score)
    networks = build_networks(config)
    rng = np.random.default_rng(7)
    shapes = jax.eval_shape(
        lambda: networks.student.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
    )
    teacher_params, student_params = (
        jax.tree.map(lambda leaf: jnp.asarray(rng.normal(size=leaf.shape) * 0.3), shapes)
        for _ in range(2)
    )
    images = rng.integers(0, 256, size=(1, 4, 16, 16, 3), dtype=np.uint8)
    step = evaluate.make_score_step(config, networks)
    anchor = jnp.ones((1, 32))
    with_maps = step(teacher_params, student_params, anchor, images)
    scores_only = step(teacher_params, student_params, anchor, images, with_maps=False)
    assert set(with_maps) == {"score", "map"} and set(scores_only) == {"score"}
    np.testing.assert_array_equal(scores_only["score"], with_maps["score"])
