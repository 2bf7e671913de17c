"""The main job as a user runs it (issue 5): ``python -m fcd_jax.main`` in subprocesses on a
generated MVTec-style folder with a tiny random-teacher ViT (``:runlocal``).

Every subprocess shares one JAX compilation cache, so only the first run of a program compiles.
"""

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fixtures import make_mvtec_folder
from PIL import Image

from configs import folder
from fcd_jax import main as fcd_main
from fcd_jax.errors import FcdError

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CATEGORY = "widget"
STEPS = 40
RUN_FLAGS = (
    "--config=configs/folder.py:runlocal",
    f"--config.data.category={CATEGORY}",
    "--config.teacher.init=random",
    "--config.parallel_splits=1",
    f"--config.train.steps={STEPS}",
    "--config.train.checkpoint_every=5",
    "--config.eval.max_heatmaps=4",
)
RESULT_KEYS = {"name", "image_auroc", "n_test", "threshold", "f1", "pixel_auroc", "pro"}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("jax_cache")
    return dict(
        os.environ,
        OMP_WAIT_POLICY="PASSIVE",
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
    )


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_mvtec_folder(tmp_path_factory.mktemp("data"), categories=(CATEGORY,))


def command(data_root, workdir, *extra):
    return [
        sys.executable, "-m", "fcd_jax.main", *RUN_FLAGS, f"--config.data.root={data_root}",
        f"--workdir={workdir}", *extra,
    ]


def run_main(env, data_root, workdir, *extra) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    process = subprocess.run(
        command(data_root, workdir, *extra), cwd=REPO, env=env, capture_output=True, text=True,
        timeout=600,
    )
    return process, time.perf_counter() - start


def assert_ok(process):
    assert process.returncode == 0, process.stderr[-3000:]


def assert_one_line_error(process, *fragments):
    """Exit code 2 and one ``fcd_jax: error:`` line naming the problem, no stack trace."""
    assert process.returncode == 2, process.stderr[-3000:]
    errors = [line for line in process.stderr.splitlines() if line.startswith("fcd_jax: error:")]
    assert len(errors) == 1, process.stderr[-3000:]
    assert "Traceback" not in process.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def results(workdir):
    return json.loads((Path(workdir) / "results.json").read_text())


def scores(workdir):
    with np.load(Path(workdir) / "runs" / CATEGORY / "scores.npz", allow_pickle=False) as arrays:
        return {key: arrays[key] for key in arrays.files}


def numpy_auroc(scores, labels):
    """P(score of an anomalous image > score of a normal one), ties counted half."""
    anomalous, normal = scores[labels == 1][:, None], scores[labels == 0][None, :]
    return float(np.mean((anomalous > normal) + 0.5 * (anomalous == normal)))


def assert_png(path):
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 16, path


@pytest.fixture(scope="module")
def trained(env, data_root, tmp_path_factory):
    """One uninterrupted train_and_eval run through the CLI: (workdir, process, seconds)."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    process, seconds = run_main(env, data_root, workdir)
    assert_ok(process)
    return workdir, process, seconds


def test_folder_train_and_eval_writes_results_reports_and_plots(trained):
    workdir, process, _ = trained
    written = results(workdir)
    assert {"dataset", "config", "runs", "mean_image_auroc"} <= set(written)
    assert written["dataset"] == "folder" and written["teacher"] == "random"
    assert written["config"]["data"]["category"] == CATEGORY
    (run,) = written["runs"]
    assert RESULT_KEYS <= set(run) and run["name"] == CATEGORY
    assert run["n_test"] == 3 + 2 * 2  # test/good + two defects of two images each
    for key in ("image_auroc", "f1", "pixel_auroc", "pro"):
        assert 0.0 <= run[key] <= 1.0, key
    assert written["mean_image_auroc"] == run["image_auroc"]

    # The numbers follow from the saved scores: AUROC and F1 at the threshold, by plain NumPy.
    arrays = scores(workdir)
    assert arrays["scores"].shape == (run["n_test"],)
    labels = arrays["labels"]
    assert labels.sum() == 4
    assert run["image_auroc"] == pytest.approx(numpy_auroc(arrays["scores"], labels), abs=1e-12)
    flagged = arrays["scores"] >= run["threshold"]
    true_positives = np.sum(flagged & (labels == 1))
    f1 = 2 * true_positives / max(flagged.sum() + labels.sum(), 1)
    assert run["f1"] == pytest.approx(f1, abs=1e-12)
    assert (Path(workdir) / "runs" / CATEGORY / "result.json").exists()

    markdown = (Path(workdir) / "results.md").read_text()
    assert "random" in markdown and "not comparable to the paper" in markdown
    assert f"| {CATEGORY} | {100 * run['image_auroc']:.1f} |" in markdown
    for plot in ("roc_curves.png", "score_histograms.png", f"runs/{CATEGORY}/heatmaps.png"):
        assert_png(Path(workdir) / plot)
    assert list((Path(workdir) / "tensorboard" / CATEGORY).glob("events.out.tfevents.*"))
    assert (Path(workdir) / "runs" / CATEGORY / "model").is_dir()

    # What the user sees: the random-teacher warning, progress with images/s, one result line.
    assert "the teacher is RANDOM" in process.stderr
    assert "img_s=" in process.stderr
    assert f"run {CATEGORY}: image AUROC {run['image_auroc']:.4f}" in process.stderr


def test_sigkill_mid_training_then_rerun_gives_identical_results(
    env, data_root, trained, tmp_path
):
    workdir = tmp_path / "killed"
    first_checkpoint = workdir / "checkpoints" / CATEGORY / "5"
    victim = subprocess.Popen(
        command(data_root, workdir), cwd=REPO, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while not first_checkpoint.is_dir() and victim.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.02)
        assert victim.poll() is None, "the run ended before it could be killed"
        victim.kill()  # SIGKILL: no cleanup, no waiting for asynchronous saves
    finally:
        victim.wait()
    assert not (workdir / "runs" / CATEGORY / "result.json").exists()

    process, _ = run_main(env, data_root, workdir)
    assert_ok(process)
    resumed = [line for line in process.stderr.splitlines() if "resuming" in line]
    assert len(resumed) == 1, process.stderr[-3000:]
    resumed_at = int(resumed[0].split(" at step ")[1].split()[0])
    assert 5 <= resumed_at < STEPS

    reference_dir = trained[0]
    assert results(workdir)["runs"] == results(reference_dir)["runs"]
    interrupted, reference = scores(workdir), scores(reference_dir)
    assert interrupted.keys() == reference.keys()
    for key in reference:
        np.testing.assert_array_equal(interrupted[key], reference[key], err_msg=key)


def test_rerun_skips_finished_runs(env, data_root, trained):
    workdir, _, first_seconds = trained
    model_files = {p: p.stat().st_mtime_ns for p in (Path(workdir) / "runs").rglob("*")}
    before = results(workdir)
    process, seconds = run_main(env, data_root, workdir)
    assert_ok(process)
    assert f"run {CATEGORY} already finished" in process.stderr
    assert f"train {CATEGORY}" not in process.stderr and f"score {CATEGORY}" not in process.stderr
    assert {p: p.stat().st_mtime_ns for p in (Path(workdir) / "runs").rglob("*")} == model_files
    assert results(workdir)["runs"] == before["runs"]
    assert seconds < first_seconds
    print(f"first run {first_seconds:.1f} s, rerun {seconds:.1f} s")


def test_predict_then_eval_agree_with_training(env, data_root, trained, tmp_path):
    workdir = trained[0]
    run = results(workdir)["runs"][0]
    inputs = str(data_root / CATEGORY / "test" / "*" / "*.png")
    output_dir = tmp_path / "predictions"
    process, _ = run_main(
        env, data_root, workdir, "--mode=predict", f"--config.predict.inputs={inputs}",
        f"--config.predict.output_dir={output_dir}",
    )
    assert_ok(process)
    with open(output_dir / "predictions.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert sorted(row["path"] for row in rows) == sorted(
        str(p) for p in (data_root / CATEGORY / "test").glob("*/*.png")
    )
    predicted = np.array([float(row["score"]) for row in rows])
    for row, score in zip(rows, predicted, strict=True):
        assert float(row["threshold"]) == pytest.approx(run["threshold"], rel=1e-5)
        assert row["verdict"] == ("anomalous" if score >= run["threshold"] else "normal")
        assert_png(output_dir / row["heatmap"])
    assert len({row["heatmap"] for row in rows}) == len(rows)
    # The same images were scored in training's evaluation: the same scores (CSV: 6 digits).
    np.testing.assert_allclose(np.sort(predicted), np.sort(scores(workdir)["scores"]), rtol=1e-5)

    before = results(workdir)
    process, _ = run_main(env, data_root, workdir, "--mode=eval")
    assert_ok(process)
    assert results(workdir)["runs"] == before["runs"]


def test_nan_loss_stops_with_one_line_and_keeps_checkpoints(env, data_root, tmp_path):
    process, _ = run_main(
        env, data_root, tmp_path, "--config.optim.lr=1e30", "--config.optim.clip_norm=0",
        "--config.train.checkpoint_every=1",
    )
    error = assert_one_line_error(process, f"run {CATEGORY}: the loss became nan", "optim.lr")
    kept_step = int(error.split("checkpoints up to step ")[1].split()[0])
    checkpoint_dir = tmp_path / "checkpoints" / CATEGORY
    steps = sorted(int(p.name) for p in checkpoint_dir.iterdir() if p.name.isdigit())
    assert steps and steps[-1] == kept_step
    assert not [p for p in checkpoint_dir.iterdir() if "tmp" in p.name]
    assert (checkpoint_dir / str(kept_step) / "commit_success.txt").exists()
    assert not (tmp_path / "runs" / CATEGORY / "result.json").exists()


def test_cli_errors_are_one_line_with_exit_code_2(env, data_root, tmp_path):
    no_teacher = subprocess.run(
        [sys.executable, "-m", "fcd_jax.main", "--config=configs/cifar10.py:runlocal",
         f"--workdir={tmp_path / 'cifar10'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert_one_line_error(
        no_teacher, "no teacher checkpoint", "ViT-B_16.npz", "--config.teacher.checkpoint=",
        "python -m fcd_jax.convert",
    )

    corrupt_root = make_mvtec_folder(tmp_path / "corrupt", categories=(CATEGORY,))
    bad_image = corrupt_root / CATEGORY / "train" / "good" / "001.png"
    bad_image.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    corrupt, _ = run_main(env, corrupt_root, tmp_path / "corrupt_run")
    assert_one_line_error(corrupt, "cannot read image", str(bad_image), "skip_bad_images")


def folder_config(data_root, **overrides):
    """``configs/folder.py:runlocal`` with the CLI's overrides, as ``main.run`` receives it."""
    config = folder.get_config("runlocal")
    config.data.update(root=str(data_root), category=CATEGORY)
    config.teacher.init = "random"
    for dotted, value in overrides.items():
        *parents, field = dotted.split("__")
        node = config
        for parent in parents:
            node = node[parent]
        node[field] = value
    return config


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        ({"data__name": "imagenet"}, ("unknown dataset 'imagenet'", "cifar10", "folder")),
        ({"splits": "gizmo"}, ("unknown split(s) gizmo", CATEGORY)),
        ({"data__root": "/no/such/folder"}, ("missing folder /no/such/folder",)),
    ],
)
def test_input_errors_name_the_problem_in_one_line(data_root, tmp_path, overrides, fragments):
    with pytest.raises(FcdError) as error:
        fcd_main.run(folder_config(data_root, **overrides), str(tmp_path), "train_and_eval")
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
