"""Evaluation metrics on the host (NumPy): AUROC, PRO, a threshold from normal data, and F1.

METHOD.md "Anomaly score" (decision: anomalous iff score >= threshold) and "Beyond the paper"
(pixel AUROC, PRO integrated to FPR 0.3, a threshold from held-out normal scores). Scores are
higher-is-more-anomalous; labels and masks are 1 (or True) for anomalous.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage, stats
from sklearn import metrics as sk_metrics

from fcd_jax.errors import DataError, TrainingError

# Two anomalous pixels touching by an edge or a corner belong to one region (8-connectivity, as
# in the MVTec AD evaluation code); the third axis keeps regions of different images apart.
_REGION_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_REGION_STRUCTURE[1] = True


def _finite_scores(values: ArrayLike, what: str) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
    if bad:
        raise TrainingError(
            f"{bad} of {values.size} {what} are NaN or infinite: the student diverged; "
            "retrain with a lower optim.lr or with optim.clip_norm > 0"
        )
    return values


def _binary(values: ArrayLike, what: str) -> np.ndarray:
    values = np.asarray(values)
    if values.dtype != bool and not np.isin(values, (0, 1)).all():
        raise DataError(
            f"{what} must be 0 (normal) or 1 (anomalous), got values {np.unique(values)[:5]}: "
            "binarise them first (e.g. mask > 0)"
        )
    return values.astype(bool)


def _scores_and_labels(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    scores = _finite_scores(scores, "anomaly scores").ravel()
    labels = _binary(labels, "labels").ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.size} scores but {labels.size} labels")
    return scores, labels


def _require_both_classes(labels: np.ndarray, metric: str, items: str) -> None:
    n_anomalous = int(labels.sum())
    if n_anomalous == 0 or n_anomalous == labels.size:
        kind = "normal" if n_anomalous == 0 else "anomalous"
        raise DataError(
            f"{metric} is undefined: all {labels.size} test {items} are {kind}; "
            "the test set needs both normal and anomalous ones"
        )


def _maps_and_masks(maps: ArrayLike, masks: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    maps = _finite_scores(maps, "anomaly-map values")
    masks = _binary(masks, "ground-truth masks")
    if maps.shape != masks.shape or maps.ndim != 3:
        raise ValueError(
            f"anomaly maps {maps.shape} and masks {masks.shape} must both be [n, H, W] "
            "(upsample the maps to the mask size first)"
        )
    return maps, masks


def _rank_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """AUROC as the Mann-Whitney statistic: P(anomalous score > normal score), ties count 1/2."""
    ranks = stats.rankdata(scores)  # average ranks of ties, 1-based
    n_anomalous = int(labels.sum())
    n_normal = labels.size - n_anomalous
    rank_sum = ranks[labels].sum() - n_anomalous * (n_anomalous + 1) / 2
    return float(rank_sum / (n_anomalous * n_normal))


def auroc_undefined_reason(labels: ArrayLike) -> str | None:
    """Why image AUROC cannot be computed on test labels [n] (None when it can): it needs both
    normal and anomalous images, and a user with no defect images has none or normal ones only."""
    labels = _binary(labels, "labels").ravel()
    n_anomalous = int(labels.sum())
    if labels.size == 0:
        return "no test images"
    if n_anomalous == 0:
        return "no anomalous test images"
    if n_anomalous == labels.size:
        return "no normal test images"
    return None


def auroc_text(value: float | None) -> str:
    """An AUROC for a log line: ``0.9512``, or ``n/a`` where it is undefined (None)."""
    return "n/a" if value is None else f"{value:.4f}"


def image_auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Image-level AUROC in [0, 1] (the paper's metric) of scores [n] against labels [n]."""
    scores, labels = _scores_and_labels(scores, labels)
    _require_both_classes(labels, "image AUROC", "images")
    return _rank_auroc(scores, labels)


def pixel_auroc(maps: ArrayLike, masks: ArrayLike) -> float:
    """Pixel-level AUROC in [0, 1] over all pixels of all test images; maps and masks [n, H, W]."""
    maps, masks = _maps_and_masks(maps, masks)
    _require_both_classes(masks.ravel(), "pixel AUROC", "pixels")
    return _rank_auroc(maps.ravel(), masks.ravel())


def roc_curve(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """The ROC curve (false positive rates, true positive rates) of image scores, for plots."""
    scores, labels = _scores_and_labels(scores, labels)
    _require_both_classes(labels, "the ROC curve", "images")
    fpr, tpr, _ = sk_metrics.roc_curve(labels, scores)
    return fpr, tpr


def pro_curve(maps: ArrayLike, masks: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Per-region overlap against false positive rate at every distinct threshold of the maps.

    Regions are the connected components of each ground-truth mask. At threshold t a pixel is
    anomalous iff its map value >= t; PRO(t) is the mean over all regions of the fraction of the
    region so marked, FPR(t) the fraction of normal pixels (of all images) so marked. Exact and
    O(N log N): one sort of all pixels, then cumulative sums of each pixel's contribution.
    Returns (fpr, pro), both non-decreasing, from (0, 0) to (1, 1).
    """
    maps, masks = _maps_and_masks(maps, masks)
    region_ids, n_regions = ndimage.label(masks, structure=_REGION_STRUCTURE)
    region_ids = region_ids.ravel()
    region_sizes = np.bincount(region_ids, minlength=n_regions + 1)
    n_normal = int(region_sizes[0])
    if n_regions == 0 or n_normal == 0:
        kind = "no anomalous" if n_regions == 0 else "only anomalous"
        raise DataError(
            f"PRO is undefined: the ground-truth masks have {kind} pixels; "
            "the test set needs normal and anomalous pixels"
        )
    # What each pixel adds to FPR and to PRO once the threshold falls to its value.
    is_normal = region_ids == 0
    pro_step = np.where(is_normal, 0.0, 1.0 / (region_sizes[region_ids] * n_regions))

    values = maps.ravel()
    order = np.argsort(values, kind="stable")[::-1]
    sorted_values = values[order]
    fpr = np.cumsum(is_normal[order], dtype=np.int64) / n_normal
    pro = np.cumsum(pro_step[order])
    # Pixels tied in value enter together: keep the last point of each run of equal values.
    last_of_tie = np.append(sorted_values[1:] != sorted_values[:-1], True)
    fpr = np.concatenate([[0.0], fpr[last_of_tie]])
    pro = np.concatenate([[0.0], np.minimum(pro[last_of_tie], 1.0)])
    return fpr, pro


def _area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoidal area under y(x) for x in [0, x_max], x non-decreasing from 0 to >= x_max."""
    n_inside = int(np.searchsorted(x, x_max, side="right"))
    xs, ys = x[:n_inside], y[:n_inside]
    if xs[-1] < x_max:  # close the area with y linearly interpolated at x_max
        x0, x1, y0, y1 = xs[-1], x[n_inside], ys[-1], y[n_inside]
        xs = np.append(xs, x_max)
        ys = np.append(ys, y0 + (y1 - y0) * (x_max - x0) / (x1 - x0))
    return float(np.trapezoid(ys, xs))


def pro_score(maps: ArrayLike, masks: ArrayLike, max_fpr: float = 0.3) -> float:
    """Area under the PRO-vs-FPR curve up to ``max_fpr``, divided by ``max_fpr`` (perfect = 1.0).

    The per-region-overlap metric of MVTec AD (Bergmann et al.); maps and masks [n, H, W].
    """
    if not 0.0 < max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
    fpr, pro = pro_curve(maps, masks)
    return _area_up_to(fpr, pro, max_fpr) / max_fpr


def threshold_from_normal(normal_scores: ArrayLike, quantile: float) -> float:
    """Decision threshold delta: the ``quantile`` of held-out normal images' scores.

    With "anomalous iff score >= delta", about 1 - quantile of normal images are flagged.
    """
    normal_scores = _finite_scores(normal_scores, "held-out normal scores").ravel()
    if normal_scores.size == 0:
        raise DataError(
            "no held-out normal images to set the threshold: raise data.holdout_fraction"
        )
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"eval.threshold_quantile must be in [0, 1], got {quantile}")
    return float(np.quantile(normal_scores, quantile))


def precision_recall_f1(scores: ArrayLike, labels: ArrayLike, threshold: float) -> dict[str, float]:
    """Precision, recall and F1 of the decision "anomalous iff score >= threshold".

    Anomalous is the positive class; a ratio with a zero denominator is 0.
    """
    scores, labels = _scores_and_labels(scores, labels)
    predicted = scores >= threshold
    true_positives = int(np.count_nonzero(predicted & labels))
    n_predicted, n_anomalous = int(predicted.sum()), int(labels.sum())
    precision = true_positives / n_predicted if n_predicted else 0.0
    recall = true_positives / n_anomalous if n_anomalous else 0.0
    f1 = 2 * true_positives / (n_predicted + n_anomalous) if n_predicted + n_anomalous else 0.0
    return dict(precision=precision, recall=recall, f1=f1)


def summarise_run(
    name: str,
    scores: ArrayLike,
    labels: ArrayLike,
    threshold: float,
    maps: ArrayLike | None = None,
    masks: ArrayLike | None = None,
    max_fpr: float = 0.3,
) -> dict[str, Any]:
    """One run's entry of ``results.json``: every metric, as plain JSON-safe Python values.

    ``pixel_auroc`` and ``pro`` are None unless both maps and masks [n, H, W] are given; every
    AUROC is None, with ``auroc_undefined`` saying why, on a test set without both classes
    (a run can still set its threshold and predict).
    """
    scores, labels = _scores_and_labels(scores, labels)
    undefined = auroc_undefined_reason(labels)
    with_pixels = maps is not None and masks is not None and undefined is None
    return dict(
        name=str(name),
        image_auroc=None if undefined else image_auroc(scores, labels),
        auroc_undefined=undefined,
        n_test=int(scores.size),
        n_anomalous=int(labels.sum()),
        threshold=float(threshold),
        **precision_recall_f1(scores, labels, threshold),
        pixel_auroc=pixel_auroc(maps, masks) if with_pixels else None,
        pro=pro_score(maps, masks, max_fpr) if with_pixels else None,
    )
