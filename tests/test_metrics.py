"""Metrics against plain-NumPy references written here: pairwise AUROC, loop-over-thresholds PRO."""

import json

import numpy as np
import pytest
from sklearn import metrics as sk_metrics

from fcd_jax import metrics
from fcd_jax.errors import DataError, TrainingError


def pairwise_auroc(scores, labels):
    """P(anomalous score > normal score) + P(tie) / 2, by counting every pair."""
    anomalous, normal = scores[labels == 1], scores[labels == 0]
    wins = ties = 0
    for a in anomalous:
        for n in normal:
            wins += a > n
            ties += a == n
    return (wins + 0.5 * ties) / (len(anomalous) * len(normal))


def slow_pro_curve(maps, masks):
    """PRO and FPR at every distinct threshold, looping over thresholds and regions."""
    regions = []
    for image_index in range(len(masks)):
        labeled, count = _label_8_connected(masks[image_index])
        for region in range(1, count + 1):
            regions.append((image_index, labeled == region))
    normal = masks == 0
    points = [(0.0, 0.0)]
    for threshold in sorted(set(maps.ravel().tolist()), reverse=True):
        marked = maps >= threshold
        fpr = (marked & normal).sum() / normal.sum()
        overlaps = [(marked[i] & region).sum() / region.sum() for i, region in regions]
        points.append((fpr, sum(overlaps) / len(overlaps)))
    return points


def _label_8_connected(mask):
    """Connected components by flood fill (8 neighbours), independent of scipy."""
    labeled = np.zeros(mask.shape, dtype=int)
    count = 0
    for start in zip(*np.nonzero(mask), strict=True):
        if labeled[start]:
            continue
        count += 1
        stack = [start]
        while stack:
            y, x = stack.pop()
            if not (0 <= y < mask.shape[0] and 0 <= x < mask.shape[1]):
                continue
            if not mask[y, x] or labeled[y, x]:
                continue
            labeled[y, x] = count
            stack += [(y + dy, x + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    return labeled, count


def slow_pro_score(maps, masks, max_fpr):
    """Trapezoids under the slow curve up to max_fpr, the last one cut by interpolation."""
    points = slow_pro_curve(maps, masks)
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x0 >= max_fpr:
            break
        if x1 > max_fpr:
            y1 = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
            x1 = max_fpr
        area += (x1 - x0) * (y0 + y1) / 2
    return area / max_fpr


def random_blob_masks(rng, n, size):
    masks = np.zeros((n, size, size), dtype=np.uint8)
    for image in masks[1:]:  # image 0 stays normal
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, size - 2, 2)
            h, w = rng.integers(1, 4, 2)
            image[y : y + h, x : x + w] = 1
    return masks


def test_image_auroc_matches_pairwise_count_and_sklearn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 80)
    scores = np.round(rng.normal(size=80) + labels, 1)  # rounding makes ties
    expected = pairwise_auroc(scores, labels)
    assert metrics.image_auroc(scores, labels) == pytest.approx(expected, abs=1e-12)
    assert metrics.image_auroc(scores, labels.astype(bool)) == pytest.approx(
        sk_metrics.roc_auc_score(labels, scores), abs=1e-12
    )


def test_image_auroc_extremes():
    labels = np.array([0, 0, 1, 1])
    assert metrics.image_auroc([0.1, 0.2, 0.3, 0.4], labels) == 1.0
    assert metrics.image_auroc([0.4, 0.3, 0.2, 0.1], labels) == 0.0
    assert metrics.image_auroc([1.0, 1.0, 1.0, 1.0], labels) == 0.5


def test_pixel_auroc_pools_all_pixels():
    rng = np.random.default_rng(1)
    masks = random_blob_masks(rng, 3, 6)
    maps = np.round(rng.random((3, 6, 6)) + masks, 1)
    expected = pairwise_auroc(maps.ravel(), masks.ravel())
    assert metrics.pixel_auroc(maps, masks) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1, 1]])
def test_auroc_with_one_class_is_a_one_line_data_error(labels):
    with pytest.raises(DataError, match="undefined") as error:
        metrics.image_auroc([0.1, 0.2, 0.3], labels)
    assert "\n" not in str(error.value)


def test_bad_inputs_are_named():
    with pytest.raises(DataError, match="0 .normal. or 1"):
        metrics.image_auroc([0.1, 0.2], [0, 255])
    with pytest.raises(TrainingError, match="1 of 2 anomaly scores are NaN"):
        metrics.image_auroc([0.1, np.nan], [0, 1])
    with pytest.raises(ValueError, match="3 scores but 2 labels"):
        metrics.image_auroc([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match="upsample"):
        metrics.pixel_auroc(np.zeros((1, 4, 4)), np.ones((1, 8, 8)))
    with pytest.raises(DataError, match="PRO is undefined"):
        metrics.pro_score(np.zeros((2, 4, 4)), np.zeros((2, 4, 4)))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("max_fpr", [0.3, 0.05, 1.0])
def test_pro_matches_slow_reference(seed, max_fpr):
    rng = np.random.default_rng(seed)
    masks = random_blob_masks(rng, 4, 8)
    maps = np.round(rng.random((4, 8, 8)) + 0.7 * masks, 2)  # ties between pixels
    expected = slow_pro_score(maps, masks, max_fpr)
    assert metrics.pro_score(maps, masks, max_fpr) == pytest.approx(expected, abs=1e-12)


def test_pro_curve_points_match_slow_reference():
    rng = np.random.default_rng(3)
    masks = random_blob_masks(rng, 3, 7)
    maps = np.round(rng.random((3, 7, 7)), 1)
    fpr, pro = metrics.pro_curve(maps, masks)
    np.testing.assert_allclose(np.stack([fpr, pro], 1), slow_pro_curve(maps, masks), atol=1e-12)


def test_pro_known_cases():
    rng = np.random.default_rng(4)
    masks = random_blob_masks(rng, 5, 10)
    assert metrics.pro_score(masks.astype(float), masks) == pytest.approx(1.0)
    assert metrics.pro_score(1.0 - masks, masks) == pytest.approx(0.0)
    # Every pixel tied: the curve is the diagonal, area 0.3**2 / 2 over 0.3.
    assert metrics.pro_score(np.ones(masks.shape), masks) == pytest.approx(0.15)


def test_pro_averages_over_regions_not_pixels():
    masks = np.zeros((1, 6, 6), dtype=bool)
    masks[0, :3, :3] = True  # 9 pixels
    masks[0, 5, 5] = True  # 1 pixel
    maps = np.zeros((1, 6, 6))
    maps[0, 5, 5] = 1.0  # only the small region found: PRO 1/2 at FPR 0
    # Curve (0, 0) -> (0, 0.5) -> (1, 1); area to 0.3: 0.3 * (0.5 + 0.65) / 2.
    assert metrics.pro_score(maps, masks) == pytest.approx((0.5 + 0.65) / 2)


def test_pro_regions_are_8_connected_within_one_image():
    masks = np.zeros((2, 5, 5), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True  # diagonal neighbours: one region
    masks[0, 4, 4] = True  # a second region
    masks[1, 0, 0:3] = True  # third region, in the next image, touching image 0's (0, 0)
    maps = np.zeros((2, 5, 5))
    maps[0, 4, 4] = 1.0
    fpr, pro = metrics.pro_curve(maps, masks)
    assert (fpr[1], pro[1]) == (0.0, pytest.approx(1 / 3))


def test_threshold_from_normal_by_hand():
    normal = np.arange(1.0, 11.0)  # 1..10
    assert metrics.threshold_from_normal(normal, 0.9) == pytest.approx(9.1)  # 9 + 0.1 * (10 - 9)
    assert metrics.threshold_from_normal(normal, 1.0) == 10.0
    assert metrics.threshold_from_normal(normal, 0.5) == 5.5
    with pytest.raises(DataError, match="holdout_fraction"):
        metrics.threshold_from_normal([], 0.9)
    with pytest.raises(ValueError, match="threshold_quantile"):
        metrics.threshold_from_normal(normal, 99)


def test_precision_recall_f1_by_hand():
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.2])
    labels = np.array([0, 0, 1, 1, 1])
    # threshold 0.35 flags 0.4, 0.35 (>= is anomalous) and 0.8: tp 2, fp 1, fn 1.
    result = metrics.precision_recall_f1(scores, labels, 0.35)
    assert result == pytest.approx(dict(precision=2 / 3, recall=2 / 3, f1=2 / 3))
    assert result["f1"] == pytest.approx(sk_metrics.f1_score(labels, scores >= 0.35))
    # threshold 0.1 flags all: tp 3, fp 2 -> precision 3/5, recall 1, F1 2 * 3 / (5 + 3).
    assert metrics.precision_recall_f1(scores, labels, 0.1) == pytest.approx(
        dict(precision=0.6, recall=1.0, f1=0.75)
    )
    # nothing flagged: precision and F1 are 0, not NaN.
    assert metrics.precision_recall_f1(scores, labels, 5.0) == dict(
        precision=0.0, recall=0.0, f1=0.0
    )


def test_summarise_run_is_json_safe_and_consistent():
    rng = np.random.default_rng(5)
    masks = random_blob_masks(rng, 6, 8)
    labels = masks.reshape(6, -1).any(1).astype(int)
    maps = rng.random((6, 8, 8)) + masks
    scores = maps.reshape(6, -1).max(1)
    summary = metrics.summarise_run("bottle", scores, labels, 1.2, maps, masks)
    assert json.loads(json.dumps(summary)) == summary
    assert summary["name"] == "bottle" and summary["n_test"] == 6 and summary["n_anomalous"] == 5
    assert summary["image_auroc"] == metrics.image_auroc(scores, labels)
    assert summary["f1"] == metrics.precision_recall_f1(scores, labels, 1.2)["f1"]
    assert summary["pro"] == metrics.pro_score(maps, masks)
    assert summary["pixel_auroc"] == metrics.pixel_auroc(maps, masks)
    no_pixels = metrics.summarise_run("cat", scores, labels, 1.2)
    assert no_pixels["pixel_auroc"] is None and no_pixels["pro"] is None
