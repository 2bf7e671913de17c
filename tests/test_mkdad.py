"""fcd_jax.mkdad against a plain NumPy reading of METHOD.md "The paper's ablations"."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.ndimage

from fcd_jax import mkdad
from fcd_jax.errors import FcdError
from fcd_jax.losses import update_anchor
from fcd_jax.models import resnet, vgg

# Three taps of different resolution and width, as a CNN gives them (NHWC).
TAP_SHAPES = [(8, 8, 4), (4, 4, 6), (2, 2, 8)]


def method_config(**overrides):
    fields = dict(loss_taps=(0, 1, 2), score_taps=(1, 2), lambda_mse=0.01, lam=1.0,
                  anchor_weight=1.0, gram_weight=0.0, anchor_update="mean", anchor_momentum=0.99,
                  image_score="paper", map_sigma=1.5)
    return ml_collections.ConfigDict(fields | overrides)


def random_taps(seed, batch=3):
    rng = np.random.default_rng(seed)
    teacher = [np.maximum(rng.normal(size=(batch, *shape)), 0).astype(np.float32) * 3
               for shape in TAP_SHAPES]
    student = [(t + rng.normal(size=t.shape)).astype(np.float32) for t in teacher]
    anchor = rng.normal(size=(1, TAP_SHAPES[-1][-1])).astype(np.float32)
    return teacher, student, anchor


# ------------------------------------------------------------------------------------------------
# The plain reading, one image at a time, float64.


def np_cos_distance(t, s):
    """1 - cos; the cosine divides by max(||t|| ||s||, 1e-8) (torch's), so a ReLU's all-zero
    teacher vector gives 1, not NaN."""
    t, s = t.astype(np.float64).ravel(), s.astype(np.float64).ravel()
    return 1 - t @ s / max(np.linalg.norm(t) * np.linalg.norm(s), 1e-8)


def np_tap_terms(teacher, student, taps, lambda_mse, b):
    """sum over taps of 1 - cos(flat T_c, flat S_c) + lambda_mse * mean((T_c - S_c)^2)."""
    return sum(np_cos_distance(teacher[c][b], student[c][b])
               + lambda_mse * np.mean((teacher[c][b].astype(np.float64) - student[c][b]) ** 2)
               for c in taps)


def np_gap_distance(taps, anchor, b):
    return np.linalg.norm(taps[-1][b].astype(np.float64).mean(axis=(0, 1)) - anchor[0])


def np_loss(teacher, student, anchor, config):
    batch = teacher[0].shape[0]
    distill = np.mean([np_tap_terms(teacher, student, config.loss_taps, config.lambda_mse, b)
                       for b in range(batch)])
    anchor_term = np.mean([np_gap_distance(student, anchor, b) for b in range(batch)])
    return distill + config.lam * config.anchor_weight * anchor_term, distill, anchor_term


def np_upsample(grid, height, width):
    """Bilinear, pixel centres at (i + 0.5) * in / out - 0.5, clamped to the edge pixels."""
    out = np.zeros((height, width))
    for i in range(height):
        y = min(max((i + 0.5) * grid.shape[0] / height - 0.5, 0), grid.shape[0] - 1)
        y0 = int(np.floor(y))
        y1, fy = min(y0 + 1, grid.shape[0] - 1), y - y0
        for j in range(width):
            x = min(max((j + 0.5) * grid.shape[1] / width - 0.5, 0), grid.shape[1] - 1)
            x0 = int(np.floor(x))
            x1, fx = min(x0 + 1, grid.shape[1] - 1), x - x0
            out[i, j] = ((1 - fy) * ((1 - fx) * grid[y0, x0] + fx * grid[y0, x1])
                         + fy * ((1 - fx) * grid[y1, x0] + fx * grid[y1, x1]))
    return out


def np_map(teacher, student, taps, b, height, width, sigma):
    summed = np.zeros((height, width))
    for c in taps:
        t, s = teacher[c][b].astype(np.float64), student[c][b].astype(np.float64)
        diff = np.zeros(t.shape[:2])
        for y in range(t.shape[0]):
            for x in range(t.shape[1]):
                diff[y, x] = np.linalg.norm(t[y, x] - s[y, x]) + np_cos_distance(t[y, x], s[y, x])
        summed += np_upsample(diff, height, width)
    if sigma == 0:
        return summed
    return scipy.ndimage.gaussian_filter(summed, sigma, mode="reflect", truncate=4.0)


# ------------------------------------------------------------------------------------------------


CONFIGS = [
    {},
    dict(lambda_mse=0.5, lam=0.5),  # MKDAD's MVTec AD weight
    dict(anchor_weight=0.0),  # MKDAD alone
    dict(loss_taps=(2,), lambda_mse=0.0),  # direction only, one tap
]


@pytest.mark.parametrize("overrides", CONFIGS)
def test_loss_matches_numpy(overrides):
    config = method_config(**overrides)
    teacher, student, anchor = random_taps(0)
    loss, metrics = jax.jit(mkdad.mkdad_loss, static_argnames="config")(
        teacher, student, anchor, ml_collections.FrozenConfigDict(config))
    expected, distill, anchor_term = np_loss(teacher, student, anchor, config)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["distill"], distill, rtol=1e-5)
    np.testing.assert_allclose(metrics["anchor"], anchor_term, rtol=1e-5)
    assert metrics["loss"] == loss


def test_gradient_reaches_the_student_only():
    teacher, student, anchor = random_taps(1)
    grad_t, grad_s, grad_a = jax.grad(lambda *args: mkdad.mkdad_loss(*args, method_config())[0],
                                      argnums=(0, 1, 2))(teacher, student, anchor)
    assert all(float(jnp.abs(g).max()) == 0 for g in [*grad_t, grad_a])
    assert all(float(jnp.abs(g).max()) > 0 for g in grad_s)


@pytest.mark.parametrize("anchor_weight", [1.0, 0.0])
def test_scores_match_numpy(anchor_weight):
    config = method_config(anchor_weight=anchor_weight)
    teacher, student, anchor = random_taps(2)
    scores = mkdad.anomaly_scores(teacher, student, anchor, config)
    batch = teacher[0].shape[0]
    s_d = [np_tap_terms(teacher, student, config.score_taps, config.lambda_mse, b)
           for b in range(batch)]
    s_a = [np_gap_distance(teacher, anchor, b) + np_gap_distance(student, anchor, b)
           for b in range(batch)]
    np.testing.assert_allclose(scores["s_d"], s_d, rtol=1e-5)
    np.testing.assert_allclose(scores["s_a"], s_a, rtol=1e-5)
    expected = np.add(s_d, s_a) if anchor_weight else np.asarray(s_d)  # no S_A without L_anchor
    np.testing.assert_allclose(scores["score"], expected, rtol=1e-5)
    assert "map" not in scores


@pytest.mark.parametrize("sigma", [0.0, 2.0])
def test_maps_match_numpy(sigma):
    config = method_config(map_sigma=sigma)
    teacher, student, anchor = random_taps(3, batch=2)
    scores = mkdad.anomaly_scores(teacher, student, anchor, config, image_size=(16, 12))
    assert scores["map"].shape == (2, 16, 12)
    for b in range(2):
        expected = np_map(teacher, student, config.score_taps, b, 16, 12, sigma)
        np.testing.assert_allclose(scores["map"][b], expected, rtol=1e-5, atol=1e-6)
    maximum = mkdad.anomaly_scores(teacher, student, anchor,
                                   method_config(map_sigma=sigma, image_score="max"),
                                   image_size=(16, 12))
    np.testing.assert_allclose(maximum["score"], np.max(scores["map"], axis=(1, 2)))


@pytest.mark.parametrize("update", ["mean", "ema"])
def test_anchor_is_the_running_mean_of_the_teachers_gap_features(update):
    config = method_config(anchor_update=update, anchor_momentum=0.9)
    batches = [random_taps(seed, batch=seed + 1)[0] for seed in range(4)]  # batches of 1..4
    anchor, seen = jnp.zeros((1, TAP_SHAPES[-1][-1])), 0
    for teacher in batches:
        anchor = update_anchor(anchor, jnp.asarray(seen), mkdad.gap_features(teacher), config)
        seen += teacher[-1].shape[0]
    gaps = [t[-1].astype(np.float64).mean(axis=(1, 2)) for t in batches]  # [batch, C] each
    if update == "mean":
        expected = np.concatenate(gaps).mean(axis=0)  # eq. 1 over all 10 images
    else:
        expected = gaps[0].mean(axis=0)
        for gap in gaps[1:]:
            expected = 0.9 * expected + 0.1 * gap.mean(axis=0)
    assert int(seen) == 10
    np.testing.assert_allclose(anchor[0], expected, rtol=1e-5)


def test_bad_configs_and_taps_are_one_clear_error():
    teacher, student, anchor = random_taps(4)
    with pytest.raises(FcdError, match="L_Gram is defined for ViT blocks only"):
        mkdad.mkdad_loss(teacher, student, anchor, method_config(gram_weight=1.0))
    with pytest.raises(FcdError, match="lambda_mse = -1.0 is negative"):
        mkdad.mkdad_loss(teacher, student, anchor, method_config(lambda_mse=-1.0))
    with pytest.raises(FcdError, match=r"tap indices \[3\] outside 0..2"):
        mkdad.mkdad_loss(teacher, student, anchor, method_config(loss_taps=(1, 3)))
    with pytest.raises(FcdError, match="is empty"):
        mkdad.anomaly_scores(teacher, student, anchor, method_config(score_taps=()))
    narrow = [student[0][..., :2], *student[1:]]
    with pytest.raises(FcdError, match=r"tap 0 is \(3, 8, 8, 4\) in the teacher but"):
        mkdad.mkdad_loss(teacher, narrow, anchor, method_config())
    with pytest.raises(FcdError, match="unknown image_score 'mean'"):
        mkdad.anomaly_scores(teacher, student, anchor, method_config(image_score="mean"))
    with pytest.raises(FcdError, match="pass image_size"):
        mkdad.anomaly_scores(teacher, student, anchor, method_config(image_score="max"))
    with pytest.raises(FcdError, match="anchor has shape"):
        mkdad.anchor_loss(student, anchor[:, :4])


@pytest.mark.parametrize("backbone", ["vgg16_small_cloner", "resnet18"])
def test_one_training_step_on_real_taps(backbone):
    """The CNN method end to end as the train step will run it: student in training mode with
    its batch_stats, teacher frozen, MKDAD's taps; the loss drops after one SGD step."""
    if backbone == "resnet18":
        teacher, student = resnet.ResNet18(), resnet.ResNet18()
        config = method_config(**mkdad.TAPS["resnet18"])
    else:
        teacher, student = vgg.vgg16_teacher(), vgg.mkdad_cloner("small")
        config = method_config(**mkdad.TAPS["vgg16"])
    images = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    teacher_vars = jax.jit(teacher.init)(jax.random.key(1), images)
    student_vars = jax.jit(student.init)(jax.random.key(2), images)
    teacher_taps = jax.jit(teacher.apply)(teacher_vars, images)["taps"]
    anchor = update_anchor(jnp.zeros((1, 512)), jnp.zeros(()), mkdad.gap_features(teacher_taps),
                           config)

    @jax.jit
    def step(params, batch_stats):
        def loss_fn(params):
            out, updates = student.apply({"params": params, "batch_stats": batch_stats}, images,
                                         train=True, mutable=["batch_stats"])
            return mkdad.mkdad_loss(teacher_taps, out["taps"], anchor, config)[0], updates

        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        params = jax.tree.map(lambda p, g: p - 0.05 * g, params, grads)
        return loss, params, updates["batch_stats"]

    first, params, stats = step(student_vars["params"], student_vars["batch_stats"])
    second, _, _ = step(params, stats)
    assert np.isfinite(first) and second < first
    student_taps = jax.jit(student.apply)({"params": params, "batch_stats": stats}, images)["taps"]
    scores = mkdad.anomaly_scores(teacher_taps, student_taps, anchor, config, image_size=32)
    assert scores["score"].shape == (4,) and scores["map"].shape == (4, 32, 32)
    assert np.all(np.isfinite(scores["map"]))
