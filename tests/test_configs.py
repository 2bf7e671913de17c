"""Each paper config runs end to end with ``:runlocal`` and a random teacher, one step per split:
CIFAR-10, CIFAR-100 superclasses and Fashion-MNIST on ``tfds.testing.mock_data``, MVTec AD on a
generated MVTec-style folder (issue 5, "Must show").

Splits train two at a time, as in ``test_main``, with the same persistent compilation cache
(``conftest.shared_compilation_cache``): the 32-px configs then share the stacked init and score
programs (a train step differs only where the learning rate does).
"""

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from fixtures import make_mvtec_folder
from PIL import Image

from fcd_jax import experiment, paper_results
from fcd_jax.datasets import tfds_one_class
from fcd_jax.input_pipeline import select_splits

pytestmark = pytest.mark.slow

MOCK_EXAMPLES = 200  # per tfds split: every CIFAR-100 superclass gets a few training images
MVTEC_SUBSET = ("bottle", "cable")
PARALLEL_SPLITS = 2  # as test_main: one stacked program for every 32-px run here and there


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(shared_compilation_cache):
    return shared_compilation_cache


def paper_config(name: str, parallel_splits: int):
    """``configs/<name>.py:runlocal``, random teacher, one step, ``parallel_splits`` at once."""
    config = importlib.import_module(f"configs.{name}").get_config("runlocal")
    config.teacher.init = "random"
    config.train.steps = 1
    config.parallel_splits = str(parallel_splits)
    config.data.holdout_fraction = 0.5
    return config


def check_one_step_per_split(workdir: Path, expected_names, dataset: str, parallel_splits: int):
    written = json.loads((workdir / "results.json").read_text())
    assert written["dataset"] == dataset and written["teacher"] == "random"
    assert [run["name"] for run in written["runs"]] == list(expected_names)
    assert written["mean_image_auroc"] == pytest.approx(
        np.mean([run["image_auroc"] for run in written["runs"]]), abs=1e-12
    )
    (schedule_dir,) = (workdir / "checkpoints").iterdir()  # one scheduled program
    # One step per split on parallel_splits slots, each freed slot refilled: ceil(n / slots)
    # global steps in all.
    steps = [int(p.name) for p in schedule_dir.iterdir() if p.name.isdigit()]
    assert max(steps) == -(-len(expected_names) // parallel_splits)
    markdown = (workdir / "results.md").read_text()
    assert "not comparable to the paper" in markdown
    for run in written["runs"]:
        paper = paper_results.paper_image_auroc(dataset, run["name"])
        assert f"| {run['name']} | {100 * run['image_auroc']:.1f} | {paper:.1f} |" in markdown
        assert (workdir / "runs" / run["name"].replace("/", "_") / "model").is_dir()
    for plot in ("roc_curves.png", "score_histograms.png"):
        with Image.open(workdir / plot) as image:
            assert image.format == "PNG"
    return written


@pytest.mark.parametrize(
    ("config_name", "dataset", "names"),
    [
        ("cifar10", "cifar10", paper_results.CIFAR10_CLASSES),
        ("cifar100_super", "cifar100", paper_results.CIFAR100_SUPERCLASSES),
        ("fashion_mnist", "fashion_mnist", paper_results.FASHION_MNIST_CLASSES),
    ],
)
def test_tfds_paper_config_runs_one_step_per_split(config_name, dataset, names, tmp_path):
    config = paper_config(config_name, PARALLEL_SPLITS)
    tfds_one_class.read_split.cache_clear()  # no records cached by another test's mock
    try:
        with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
            outcome = experiment.train_and_evaluate(config, str(tmp_path))
    finally:
        tfds_one_class.read_split.cache_clear()
    assert outcome["teacher_is_random"]
    written = check_one_step_per_split(tmp_path, names, dataset, PARALLEL_SPLITS)
    for run in written["runs"]:
        assert run["n_test"] == MOCK_EXAMPLES  # the whole test split
        assert 0 < run["n_anomalous"] < MOCK_EXAMPLES
        assert run["pixel_auroc"] is None and run["pro"] is None  # no masks


def test_mvtec_config_runs_one_step_per_category(tmp_path):
    root = make_mvtec_folder(tmp_path / "mvtec_ad", categories=MVTEC_SUBSET, n_train=4)
    config = paper_config("mvtec", PARALLEL_SPLITS)
    config.data.root = str(root)
    assert select_splits(config) == list(paper_results.MVTEC_CATEGORIES)
    config.splits = ",".join(MVTEC_SUBSET)
    config.eval.max_heatmaps = 2
    workdir = tmp_path / "run"
    experiment.train_and_evaluate(config, str(workdir))
    written = check_one_step_per_split(workdir, MVTEC_SUBSET, "mvtec", PARALLEL_SPLITS)
    for run in written["runs"]:
        assert run["n_test"] == 7
        assert 0.0 <= run["pixel_auroc"] <= 1.0 and 0.0 <= run["pro"] <= 1.0
        with Image.open(workdir / "runs" / run["name"] / "heatmaps.png") as image:
            assert image.format == "PNG"
    assert f"over these {len(MVTEC_SUBSET)} runs" in (workdir / "results.md").read_text()
