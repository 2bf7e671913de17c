"""What an evaluation leaves in the workdir: results.json, results.md, PNG plots, predictions.

I/O at the edge: the metrics come from ``fcd_jax.metrics``; this module only formats and writes.
Plots use matplotlib's object API (``Figure``, rendered by Agg), so no global pyplot state;
heat-map pictures are drawn as pixels (``fcd_jax.heatmaps``).

A *run* below is a dict ``{"name", "scores" [n], "labels" [n], "threshold"}``, optionally with
``"maps"`` and ``"masks"`` [n, H, W]; a *summary* is ``metrics.summarise_run``'s dict of a run.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from numpy.typing import ArrayLike
from PIL import Image

from fcd_jax import heatmaps, metrics, paper_results
from fcd_jax.datasets.image_files import shown

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
ROC_PNG = "roc_curves.png"
HISTOGRAMS_PNG = "score_histograms.png"
HEATMAPS_PNG = "heatmaps.png"
PREDICTIONS_CSV = "predictions.csv"
RANDOM_TEACHER_WARNING = "teacher is random: numbers are not comparable to the paper"

_NORMAL_COLOR, _ANOMALOUS_COLOR = "tab:blue", "tab:red"


# ----------------------------------------------------------------------------- results files


def _json_safe(value: Any) -> Any:
    """Nested dicts/lists of str, int, float, bool and None; NaN and inf become None."""
    if isinstance(value, Mapping):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_json_safe(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, str | int | bool):
        return value
    return str(value)


def write_atomically(path: str | os.PathLike, text: str) -> None:
    """A killed run leaves the old file or the new one, never half of one."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def _mean(values: Sequence[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return sum(present) / len(present) if present else None


def write_results(
    workdir: str | os.PathLike,
    dataset: str,
    config: Any,
    runs: Sequence[Mapping[str, Any]],
    teacher_is_random: bool,
) -> dict[str, Any]:
    """Writes ``results.json`` and ``results.md`` in ``workdir`` and returns the JSON's content.

    ``runs`` are the runs' summaries (``metrics.summarise_run``); ``config`` is the run's
    ConfigDict (or a plain dict). The paper's number is put beside ours where it has one.
    """
    if any("image_auroc" not in run for run in runs):
        raise ValueError(
            "write_results takes summaries: pass metrics.summarise_run(...) of each run"
        )
    config_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    teacher = "random" if teacher_is_random else config_dict.get("teacher", {}).get("checkpoint")
    results = _json_safe(
        dict(
            dataset=dataset,
            config=config_dict,
            teacher=teacher,
            runs=list(runs),
            mean_image_auroc=_mean([run["image_auroc"] for run in runs]),
        )
    )
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    write_atomically(workdir / RESULTS_JSON, json.dumps(results, indent=2, allow_nan=False) + "\n")
    write_atomically(workdir / RESULTS_MD, results_markdown(results))
    return results


def read_results(workdir: str | os.PathLike) -> dict[str, Any]:
    """The content of ``workdir/results.json``."""
    return json.loads((Path(workdir) / RESULTS_JSON).read_text(encoding="utf-8"))


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _signed(ours: float | None, paper: float | None) -> str:
    return "–" if ours is None or paper is None else f"{100 * ours - paper:+.1f}"


def results_markdown(results: Mapping[str, Any]) -> str:
    """``results.md``: one table row per run, ours beside the paper's, means at the bottom."""
    dataset, runs = results["dataset"], results["runs"]
    names = [run["name"] for run in runs]
    has_paper = dataset in paper_results.PAPER_IMAGE_AUROC
    has_pixels = any(run.get("pixel_auroc") is not None for run in runs)
    quantile = results.get("config", {}).get("eval", {}).get("threshold_quantile")

    lines = [f"# FCD results: {dataset}", ""]
    if results.get("teacher") == "random":
        lines += [f"**{RANDOM_TEACHER_WARNING}**", ""]
    else:
        lines += [f"Teacher: `{results.get('teacher')}`.", ""]
    threshold_rule = "a threshold" if quantile is None else f"the {quantile} quantile"
    lines += [
        f"All numbers in %. F1 at {threshold_rule} of held-out normal images' scores "
        "(anomalous iff score >= threshold).",
        "",
    ]

    header = ["run", "image AUROC"]
    header += ["paper", "Δ"] if has_paper else []
    header += ["F1"] + (["pixel AUROC", "PRO (FPR≤0.3)"] if has_pixels else []) + ["n test"]
    lines += ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]

    def row(label: str, summary: Mapping[str, Any], paper: float | None, n_test: str) -> str:
        undefined = summary.get("auroc_undefined")
        cells = [label, f"n/a ({undefined})" if undefined else _percent(summary["image_auroc"])]
        if has_paper:
            cells += ["–" if paper is None else f"{paper:.1f}"]
            cells += [_signed(summary["image_auroc"], paper)]
        cells += [_percent(summary["f1"])]
        if has_pixels:
            cells += [_percent(summary.get("pixel_auroc")), _percent(summary.get("pro"))]
        return "| " + " | ".join(cells + [n_test]) + " |"

    for run in runs:
        paper = paper_results.paper_image_auroc(dataset, run["name"])
        lines.append(row(run["name"], run, paper, str(run["n_test"])))
    means = {
        key: _mean([run.get(key) for run in runs])
        for key in ("image_auroc", "f1", "pixel_auroc", "pro")
    }
    paper_mean = paper_results.paper_mean_image_auroc(dataset, names)
    lines.append(row(f"**mean of {len(runs)}**", means, paper_mean, ""))
    printed_mean = paper_results.PAPER_MEAN_IMAGE_AUROC.get(dataset)
    if paper_mean is not None and paper_mean != printed_mean:
        lines += [
            "",
            f"The paper's mean above is over these {len(runs)} runs; its mean over all "
            f"{len(paper_results.PAPER_IMAGE_AUROC[dataset])} is {printed_mean:.1f}.",
        ]
    return "\n".join(lines) + "\n"


def save_run_arrays(path: str | os.PathLike, run: Mapping[str, Any]) -> None:
    """Saves a run's arrays (scores, labels, threshold, maps and masks if any) as ``.npz``.

    Lets a resumed job plot the runs it finished earlier without scoring them again.
    """
    keys = ("scores", "labels", "maps", "masks")
    arrays = {key: np.asarray(run[key]) for key in keys if run.get(key) is not None}
    np.savez_compressed(path, name=np.asarray(run["name"]), threshold=run["threshold"], **arrays)


def load_run_arrays(path: str | os.PathLike) -> dict[str, Any]:
    """A run saved by ``save_run_arrays`` (never unpickles: untrusted files run no code)."""
    with np.load(path, allow_pickle=False) as stored:
        run = {key: stored[key] for key in stored.files}
    run["name"], run["threshold"] = str(run["name"]), float(run["threshold"])
    return run


# ----------------------------------------------------------------------------- plots


def _grid(
    n_panels: int, max_columns: int, panel_size: tuple[float, float], top: float = 0.75
) -> tuple[Figure, list]:
    """A figure with ``n_panels`` axes in rows of at most ``max_columns``; spare axes hidden.

    A fixed layout with room for a title and a legend above and axis labels around: matplotlib's
    layout engines measure every axis' text twice, which made two grids of 15 panels 3.7 s.
    ``top``: inches above the panels (title, legend)."""
    columns = min(n_panels, max_columns)
    rows = math.ceil(n_panels / columns)
    width, height = panel_size[0] * columns + 0.6, panel_size[1] * rows + top + 0.25
    figure = Figure(figsize=(width, height))
    axes = figure.subplots(rows, columns, squeeze=False, gridspec_kw=dict(
        left=0.6 / width, right=1 - 0.15 / width, bottom=0.55 / height, top=1 - top / height,
        wspace=0.3, hspace=0.55,
    )).ravel()
    for spare in axes[n_panels:]:
        spare.set_visible(False)
    return figure, list(axes[:n_panels])


def _label_grid(figure: Figure, title: str, xlabel: str, ylabel: str | None = None) -> None:
    """The title and shared axis labels of a :func:`_grid` figure."""
    width, height = figure.get_size_inches()
    figure.suptitle(title, y=1 - 0.08 / height, va="top", fontsize="medium")
    figure.supxlabel(xlabel, y=0.08 / height, va="bottom")
    if ylabel:
        figure.supylabel(ylabel, x=0.08 / width, ha="left")


def _save(figure: Figure, path: str | os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def _auroc_text(scores: np.ndarray, labels: np.ndarray) -> str:
    """Image AUROC in %, or "n/a" where the test set lacks a class."""
    if metrics.auroc_undefined_reason(labels):
        return "n/a"
    return f"{100 * metrics.image_auroc(scores, labels):.1f}"


def _draw_roc(axes, run: Mapping[str, Any], label_with_name: bool, color=None) -> None:
    auroc = _auroc_text(run["scores"], run["labels"])
    label = f"{run['name']} ({auroc})" if label_with_name else f"AUROC {auroc}"
    axes.plot([0, 1], [0, 1], color="0.6", linestyle=":", linewidth=1)
    axes.set(xlim=(0, 1), ylim=(0, 1.01), aspect="equal")
    if auroc == "n/a":  # no ROC curve: one empty entry keeps the legend's label
        axes.plot([], [], color=color, linewidth=1.5, label=label)
        return
    fpr, tpr = metrics.roc_curve(run["scores"], run["labels"])
    axes.plot(fpr, tpr, color=color, linewidth=1.5, label=label)


def plot_roc_curves(path: str | os.PathLike, runs: Sequence[Mapping[str, Any]]) -> None:
    """ROC curves of image scores, AUROC (%) in the legend; one axes up to 10 runs, else a grid."""
    if len(runs) <= 10:
        figure = Figure(figsize=(6.4, 5.2), layout="constrained")
        axes = figure.subplots()
        colors = colormaps["tab10"].colors
        for run, color in zip(runs, colors, strict=False):
            _draw_roc(axes, run, label_with_name=True, color=color)
        axes.set(xlabel="false positive rate", ylabel="true positive rate")
        axes.set_title("ROC curves (image AUROC, %)")
        axes.legend(loc="lower right", fontsize="small", frameon=True)
        axes.grid(alpha=0.3)
    else:
        figure, grid = _grid(len(runs), max_columns=5, panel_size=(2.6, 2.7))
        for axes, run in zip(grid, runs, strict=True):
            _draw_roc(axes, run, label_with_name=False, color=_NORMAL_COLOR)
            axes.set_title(run["name"], fontsize="small")
            axes.legend(loc="lower right", fontsize="x-small", handlelength=1)
            axes.tick_params(labelsize="x-small")
        _label_grid(figure, "ROC curves (image AUROC, %)", "false positive rate",
                    "true positive rate")
    _save(figure, path)


def plot_score_histograms(path: str | os.PathLike, runs: Sequence[Mapping[str, Any]]) -> None:
    """Per run: histograms of normal and anomalous test scores, and the threshold as a line."""
    figure, grid = _grid(len(runs), max_columns=5, panel_size=(3.2, 2.4), top=1.0)
    for axes, run in zip(grid, runs, strict=True):
        scores = np.asarray(run["scores"], dtype=np.float64)
        labels = np.asarray(run["labels"]).astype(bool)
        bins = np.histogram_bin_edges(np.append(scores, run["threshold"]), bins=30)
        for selected, color in ((~labels, _NORMAL_COLOR), (labels, _ANOMALOUS_COLOR)):
            if selected.any():  # a folder may have no anomalous (or no test) images at all
                density, _ = np.histogram(scores[selected], bins=bins, density=True)
                # one artist per histogram (axes.hist draws a patch per bin: 2x slower)
                axes.stairs(density, bins, fill=True, alpha=0.55, color=color)
        axes.axvline(run["threshold"], color="black", linestyle="--", linewidth=1.2)
        counts = f"{int((~labels).sum())} normal, {int(labels.sum())} anomalous"
        axes.set_title(f"{run['name']} (AUROC {_auroc_text(scores, labels)})\n{counts}",
                       fontsize="small")
        axes.tick_params(labelsize="x-small")
        axes.set_yticks([])
    handles = [Patch(color=color, alpha=0.55) for color in (_NORMAL_COLOR, _ANOMALOUS_COLOR)]
    handles.append(Line2D([], [], color="black", linestyle="--", linewidth=1.2))
    height = figure.get_size_inches()[1]
    figure.legend(handles, ["normal", "anomalous", "threshold"], loc="upper center", ncols=3,
                  bbox_to_anchor=(0.5, 1 - 0.3 / height), frameon=False, fontsize="small")
    _label_grid(figure, "Test scores: normal vs anomalous (density)", "anomaly score")
    _save(figure, path)


def _save_picture(picture: np.ndarray, path: str | os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture).save(path, compress_level=1)  # 3x faster than 6, ~1.3x the bytes


def plot_heatmap_grid(
    path: str | os.PathLike,
    images: ArrayLike,
    maps: ArrayLike,
    masks: ArrayLike | None,
    scores: ArrayLike,
    labels: ArrayLike,
    threshold: float | None = None,
) -> None:
    """Rows of image | anomaly-map overlay | ground-truth mask (no mask column if masks is None).

    images [n, H, W(, C)], maps [n, h, w] (any size; stretched over the image), masks
    [n, H, W]. Titles give the label and the score (and the verdict when a threshold is given);
    the mask's outline is drawn on the overlay; one colour scale and colorbar for all maps. More
    than 8 images are laid out side by side. Drawn as pixels (``fcd_jax.heatmaps``).
    """
    scores = np.asarray(scores)
    labels = np.asarray(labels).astype(bool)
    low, high = heatmaps.map_range(maps)
    rows = []
    for index, image in enumerate(images):
        picture = heatmaps.panel(image)
        mask = None if masks is None else np.asarray(masks[index], np.float32)
        verdict = ""
        if threshold is not None:
            verdict = " -> " + ("anomalous" if scores[index] >= threshold else "normal")
        cells = [
            heatmaps.titled(picture, [f"#{index} label: "
                                      f"{'anomalous' if labels[index] else 'normal'}"]),
            heatmaps.titled(heatmaps.overlay(picture, maps[index], low, high, mask),
                            [f"score {scores[index]:.3g}{verdict}"]),
        ]
        if mask is not None:
            shown_mask = heatmaps.resized(heatmaps.displayable(mask > 0.5), picture.shape[:2],
                                          smooth=False)
            cells.append(heatmaps.titled(shown_mask, ["ground truth"]))
        rows.append(heatmaps.stack(cells, axis=1))
    groups = math.ceil(len(rows) / 8)
    per_group = math.ceil(len(rows) / groups)
    columns = [heatmaps.stack(rows[start: start + per_group], axis=0)
               for start in range(0, len(rows), per_group)]
    body = heatmaps.stack(columns, axis=1, margin=3 * heatmaps.MARGIN)
    body = heatmaps.stack([body, heatmaps.colorbar(low, high, min(body.shape[0], 320))], axis=1)
    title = "Anomaly maps" + (" and ground truth" if masks is not None else "")
    _save_picture(heatmaps.header(body, title), path)


def heatmap_names(paths: Sequence[str | os.PathLike]) -> list[str]:
    """The heat-map file of each input image in predict's output folder: ``<stem>.png``, or
    ``<stem>_<index>.png`` where two inputs share a stem."""
    names, used = [], set()
    for index, image_path in enumerate(paths):
        name = Path(image_path).stem + ".png"
        if name in used:  # same file name in two directories
            name = f"{Path(image_path).stem}_{index}.png"
        used.add(name)
        names.append(name)
    return names


def write_predictions(
    output_dir: str | os.PathLike,
    paths: Sequence[str],
    scores: ArrayLike,
    threshold: float,
    maps: ArrayLike | None,
    images: ArrayLike | None,
) -> Path:
    """Predict's outputs: ``predictions.csv`` (path, score, threshold, verdict, heatmap) and
    one ``<name>.png`` per image (image | anomaly-map overlay). Returns the CSV's path."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    scores = np.asarray(scores, dtype=np.float64)
    low, high = (0.0, 1.0) if maps is None else heatmaps.map_range(maps)
    names = heatmap_names(paths)
    rows = []
    for index, (image_path, score) in enumerate(zip(paths, scores, strict=True)):
        verdict = "anomalous" if score >= threshold else "normal"
        heatmap_name = ""
        if maps is not None and images is not None:
            heatmap_name = names[index]
            picture = heatmaps.panel(images[index], longer=256)
            body = heatmaps.stack([
                heatmaps.titled(picture, [shown(Path(image_path).name)]),
                heatmaps.titled(heatmaps.overlay(picture, maps[index], low, high),
                                ["anomaly map"]),
                heatmaps.colorbar(low, high, picture.shape[0]),
            ], axis=1)
            _save_picture(heatmaps.header(
                body, f"score {score:.4g} (threshold {threshold:.4g}): {verdict}"),
                output_dir / heatmap_name)
        rows.append([shown(image_path), f"{score:.6g}", f"{threshold:.6g}", verdict,
                     shown(heatmap_name)])  # a non-UTF-8 name as \xNN: the CSV stays UTF-8
    csv_path = output_dir / PREDICTIONS_CSV
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "score", "threshold", "verdict", "heatmap"])
        writer.writerows(rows)
    return csv_path
