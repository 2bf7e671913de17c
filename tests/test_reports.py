"""results.json / results.md, the plots, predict's outputs and the paper's tables."""

import csv
import json
import warnings

import ml_collections
import numpy as np
import pytest
from matplotlib import image as mpl_image

from fcd_jax import metrics, paper_results, reports


def make_config():
    config = ml_collections.ConfigDict()
    config.method = ml_collections.ConfigDict({"layers": (3, 6, 9, 11), "lam": 1.0})
    config.teacher = ml_collections.ConfigDict({"checkpoint": "/ckpt/ViT-B_16.npz"})
    config.eval = ml_collections.ConfigDict({"threshold_quantile": 0.99})
    return config


def make_run(name, seed, n=24, size=0, separation=1.5):
    """A run dict as the lead passes it; with maps and masks [n, size, size] when size > 0."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3 == 0
    scores = rng.normal(size=n) + separation * labels
    run = dict(name=name, scores=scores, labels=labels.astype(int), threshold=float(scores.mean()))
    if size:
        masks = np.zeros((n, size, size), dtype=np.uint8)
        masks[labels, size // 4 : size // 2, size // 3 : size - 2] = 1
        run["maps"] = rng.random((n, size, size)) + masks
        run["masks"] = masks
    return run


def summarise(run):
    return metrics.summarise_run(
        run["name"],
        run["scores"],
        run["labels"],
        run["threshold"],
        run.get("maps"),
        run.get("masks"),
    )


def assert_png(path, min_size=(100, 100)):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = mpl_image.imread(path)
    assert pixels.shape[0] >= min_size[0] and pixels.shape[1] >= min_size[1]
    assert pixels[..., :3].std() > 0.01  # not a blank canvas


def test_results_json_round_trip(tmp_path):
    summaries = [summarise(make_run(name, seed)) for seed, name in enumerate(["airplane", "cat"])]
    written = reports.write_results(tmp_path, "cifar10", make_config(), summaries, False)
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored == written == reports.read_results(tmp_path)
    assert set(stored) == {"dataset", "config", "teacher", "runs", "mean_image_auroc"}
    assert stored["dataset"] == "cifar10" and stored["teacher"] == "/ckpt/ViT-B_16.npz"
    assert stored["config"]["method"]["layers"] == [3, 6, 9, 11]
    required = {"name", "image_auroc", "n_test", "threshold", "f1", "pixel_auroc", "pro"}
    for run, summary in zip(stored["runs"], summaries, strict=True):
        assert required <= set(run) and run == summary
        assert run["pixel_auroc"] is None and run["pro"] is None
    mean = (summaries[0]["image_auroc"] + summaries[1]["image_auroc"]) / 2
    assert stored["mean_image_auroc"] == pytest.approx(mean)
    assert not list(tmp_path.glob("*.tmp"))


def test_results_markdown_has_paper_numbers_and_random_teacher_warning(tmp_path):
    summaries = [summarise(make_run(name, seed)) for seed, name in enumerate(["airplane", "cat"])]
    results = reports.write_results(tmp_path, "cifar10", make_config(), summaries, True)
    assert results["teacher"] == "random"
    text = (tmp_path / "results.md").read_text()
    lines = text.splitlines()
    assert "**teacher is random: numbers are not comparable to the paper**" in lines[:4]
    airplane = next(line for line in lines if line.startswith("| airplane |"))
    ours = 100 * summaries[0]["image_auroc"]
    assert f"| {ours:.1f} | 97.3 | {ours - 97.3:+.1f} |" in airplane
    assert "| 92.8 |" in next(line for line in lines if line.startswith("| cat |"))
    mean_row = next(line for line in lines if line.startswith("| **mean of 2** |"))
    assert f"| {(97.3 + 92.8) / 2:.1f} |" in mean_row
    assert lines[-1] == "The paper's mean above is over these 2 runs; its mean over all 10 is 96.3."
    assert "pixel AUROC" not in text  # no run has masks


def test_results_markdown_full_table_uses_printed_mean_and_pixel_columns(tmp_path):
    runs = [
        make_run(name, seed, n=12, size=8)
        for seed, name in enumerate(paper_results.MVTEC_CATEGORIES)
    ]
    summaries = [summarise(run) for run in runs]
    reports.write_results(tmp_path, "mvtec", make_config(), summaries, False)
    text = (tmp_path / "results.md").read_text()
    assert "not comparable" not in text and "`/ckpt/ViT-B_16.npz`" in text
    assert "| pixel AUROC | PRO (FPR≤0.3) |" in text
    assert "| 90.4 |" in text.splitlines()[-1]  # the paper's printed mean, all 15 runs present
    bottle = next(line for line in text.splitlines() if line.startswith("| bottle |"))
    assert f"| {100 * summaries[0]['pro']:.1f} | 12 |" in bottle


def test_results_markdown_without_paper_numbers(tmp_path):
    summaries = [summarise(make_run("my_parts", 0))]
    reports.write_results(tmp_path, "folder", make_config(), summaries, False)
    with pytest.raises(ValueError, match="summarise_run"):
        reports.write_results(tmp_path, "folder", make_config(), [make_run("my_parts", 0)], False)
    header = next(
        line for line in (tmp_path / "results.md").read_text().splitlines() if "run" in line
    )
    assert header == "| run | image AUROC | F1 | n test |"


def test_paper_tables_are_complete_and_match_their_means():
    sizes = {"cifar10": 10, "cifar100": 20, "fashion_mnist": 10, "mvtec": 15}
    for dataset, table in paper_results.PAPER_IMAGE_AUROC.items():
        assert len(table) == sizes[dataset]
        mean = sum(table.values()) / len(table)
        assert abs(mean - paper_results.PAPER_MEAN_IMAGE_AUROC[dataset]) < 0.05
    assert paper_results.paper_image_auroc("cifar100", "large_man-made_outdoor_things") == 89.1
    assert paper_results.paper_image_auroc("mvtec", "grid") == 71.7
    assert paper_results.paper_image_auroc("folder", "grid") is None
    assert paper_results.paper_mean_image_auroc("cifar10", ["cat", "dog"]) == (92.8 + 94.7) / 2


def test_fashion_mnist_names_are_tfds_names(tmp_path):
    import tensorflow_datasets as tfds

    names = tfds.builder("fashion_mnist", data_dir=tmp_path).info.features["label"].names
    assert tuple(names) == paper_results.FASHION_MNIST_CLASSES


def test_roc_curves_one_axes_and_grid(tmp_path):
    reports.plot_roc_curves(tmp_path / "few.png", [make_run("cat", 0), make_run("dog", 1)])
    reports.plot_roc_curves(tmp_path / "many.png", [make_run(f"c{i}", i) for i in range(11)])
    assert_png(tmp_path / "few.png")
    assert_png(tmp_path / "many.png")


def test_score_histograms(tmp_path):
    reports.plot_score_histograms(tmp_path / "histograms.png", [make_run("cat", 0)])
    assert_png(tmp_path / "histograms.png")


def test_heatmap_grid_with_and_without_masks(tmp_path):
    run = make_run("bottle", 0, n=3, size=32)
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    patch_maps = run["maps"][:, ::4, ::4]  # a coarser map is stretched over the image
    reports.plot_heatmap_grid(
        tmp_path / "masks.png",
        images,
        patch_maps,
        run["masks"],
        run["scores"],
        run["labels"],
        threshold=run["threshold"],
    )
    gray = images[..., 0] / 127.5 - 1  # normalised to [-1, 1]
    reports.plot_heatmap_grid(
        tmp_path / "no_masks.png", gray, run["maps"], None, run["scores"], run["labels"]
    )
    assert_png(tmp_path / "masks.png")
    assert_png(tmp_path / "no_masks.png")


def test_write_predictions(tmp_path):
    rng = np.random.default_rng(0)
    paths = ["in/a.png", "in/b.png", "other/a.png"]
    scores = np.array([0.5, 2.0, 1.0])
    images = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    maps = rng.random((3, 4, 4))
    csv_path = reports.write_predictions(tmp_path / "predict", paths, scores, 1.0, maps, images)
    with open(csv_path) as handle:
        rows = list(csv.DictReader(handle))
    assert [row["path"] for row in rows] == paths
    assert [row["verdict"] for row in rows] == ["normal", "anomalous", "anomalous"]  # 1.0 >= 1.0
    assert [float(row["score"]) for row in rows] == scores.tolist()
    assert {row["threshold"] for row in rows} == {"1"}
    assert [row["heatmap"] for row in rows] == ["a.png", "b.png", "a_2.png"]
    for row in rows:
        assert_png(tmp_path / "predict" / row["heatmap"])


def test_run_arrays_round_trip(tmp_path):
    run = make_run("bottle", 0, n=6, size=8)
    reports.save_run_arrays(tmp_path / "bottle.npz", run)
    loaded = reports.load_run_arrays(tmp_path / "bottle.npz")
    assert loaded["name"] == "bottle" and loaded["threshold"] == run["threshold"]
    for key in ("scores", "labels", "maps", "masks"):
        np.testing.assert_array_equal(loaded[key], run[key])


def test_score_histograms_of_runs_without_anomalous_or_test_images_warn_nothing(tmp_path):
    """A folder with only good images (or no test/ folder) is a legitimate run: its histogram
    panel draws what exists, with no numpy division warning in the user's log."""
    only_good = dict(name="good", scores=np.linspace(0, 1, 6), labels=np.zeros(6, int),
                     threshold=0.8)
    no_test = dict(name="none", scores=np.zeros(0), labels=np.zeros(0, int), threshold=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reports.plot_score_histograms(tmp_path / "histograms.png", [only_good, no_test])
    assert mpl_image.imread(tmp_path / "histograms.png").shape[0] > 100
