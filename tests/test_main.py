"""The main job as a user runs it (issue 5): ``python -m fcd_jax.main`` on a generated
MVTec-style folder of two categories, trained together as one group, with a tiny random-teacher
ViT (``:runlocal``).

What is about the command line (SIGKILL and resume, predict's outputs, one-line errors and exit
codes) runs in subprocesses; the rest calls ``fcd_jax.main.run`` in this process with the same
config. Every process shares one persistent JAX compilation cache, so each program compiles once.
"""

import csv
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fixtures import make_mvtec_folder
from PIL import Image

from configs import folder
from fcd_jax import experiment
from fcd_jax import main as fcd_main
from fcd_jax.errors import ConfigError, FcdError, TrainingError
from fcd_jax.teacher import reconcile
from fcd_jax.workdir import LOCK_FILE, check_training_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CATEGORIES = ("gadget", "widget")  # folder runs, in their order
GROUP = "+".join(CATEGORIES)  # trained together: one checkpoint directory
STEPS = 40
# The run every test uses: as --config.KEY=VALUE flags and as overrides of the loaded config.
OVERRIDES = {
    "teacher.init": "random",
    "parallel_splits": "2",
    "train.steps": STEPS,
    "train.checkpoint_every": 5,
    "eval.max_heatmaps": 4,
}
RESULT_KEYS = {"name", "image_auroc", "n_test", "threshold", "f1", "pixel_auroc", "pro"}
@pytest.fixture(scope="module")
def env(shared_compilation_cache):
    """The subprocesses' environment; this process uses the same compilation cache meanwhile."""
    return dict(os.environ, OMP_WAIT_POLICY="PASSIVE", JAX_PLATFORMS="cpu",
                **shared_compilation_cache)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_mvtec_folder(tmp_path_factory.mktemp("data"), categories=CATEGORIES)


def set_dotted(config, overrides):
    for dotted, value in overrides.items():
        *parents, field = dotted.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[field] = value
    return config


def folder_config(data_root, **overrides):
    """What ``command(data_root, ...)`` runs, as ``fcd_main.run`` receives it; ``overrides``
    use ``__`` for dots (``optim__lr=1.0``)."""
    config = folder.get_config("runlocal")
    set_dotted(config, {**OVERRIDES, "data.root": str(data_root)})
    return set_dotted(config, {key.replace("__", "."): v for key, v in overrides.items()})


def command(data_root, workdir, *extra):
    flags = [f"--config.{key}={value}" for key, value in OVERRIDES.items()]
    return [
        sys.executable, "-m", "fcd_jax.main", "--config=configs/folder.py:runlocal", *flags,
        f"--config.data.root={data_root}", f"--workdir={workdir}", *extra,
    ]


def run_main(env, data_root, workdir, *extra) -> subprocess.CompletedProcess:
    return subprocess.run(
        command(data_root, workdir, *extra), cwd=REPO, env=env, capture_output=True, text=True,
        timeout=600,
    )


def assert_ok(process):
    assert process.returncode == 0, process.stderr[-3000:]


def results(workdir):
    return json.loads((Path(workdir) / "results.json").read_text())


def scores(workdir, name):
    with np.load(Path(workdir) / "runs" / name / "scores.npz", allow_pickle=False) as arrays:
        return {key: arrays[key] for key in arrays.files}


def assert_same_scores(workdir, reference, name):
    ours, theirs = scores(workdir, name), scores(reference, name)
    assert ours.keys() == theirs.keys()
    for key in theirs:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=f"{name}: {key}")


def mtimes(directory):
    return {path: path.stat().st_mtime_ns for path in Path(directory).rglob("*")}


def numpy_auroc(scores, labels):
    """P(score of an anomalous image > score of a normal one), ties counted half."""
    anomalous, normal = scores[labels == 1][:, None], scores[labels == 0][None, :]
    return float(np.mean((anomalous > normal) + 0.5 * (anomalous == normal)))


def assert_png(path):
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 16, path


@pytest.fixture(scope="module")
def trained(env, data_root, tmp_path_factory):
    """The uninterrupted run: ``fcd_main.run`` in this process (the CLI's code path)."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    fcd_main.run(folder_config(data_root), str(workdir), "train_and_eval")
    return workdir


def test_folder_train_and_eval_writes_results_reports_and_plots(trained):
    workdir = trained
    written = results(workdir)
    assert {"dataset", "config", "runs", "mean_image_auroc"} <= set(written)
    assert written["dataset"] == "folder" and written["teacher"] == "random"
    assert [run["name"] for run in written["runs"]] == list(CATEGORIES)
    assert written["mean_image_auroc"] == pytest.approx(
        np.mean([run["image_auroc"] for run in written["runs"]]), abs=1e-12
    )
    markdown = (workdir / "results.md").read_text()
    assert "random" in markdown and "not comparable to the paper" in markdown
    for plot in ("roc_curves.png", "score_histograms.png"):
        assert_png(workdir / plot)
    assert [path.name for path in (workdir / "checkpoints").iterdir()] == [GROUP]

    for run in written["runs"]:
        name = run["name"]
        assert RESULT_KEYS <= set(run)
        assert run["n_test"] == 3 + 2 * 2  # test/good + two defects of two images each
        for key in ("image_auroc", "f1", "pixel_auroc", "pro"):
            assert 0.0 <= run[key] <= 1.0, key
        # The numbers follow from the saved scores: AUROC and F1 at the threshold, by NumPy.
        arrays = scores(workdir, name)
        labels = arrays["labels"]
        assert arrays["scores"].shape == (run["n_test"],) and labels.sum() == 4
        auroc = numpy_auroc(arrays["scores"], labels)
        assert run["image_auroc"] == pytest.approx(auroc, abs=1e-12)
        flagged = arrays["scores"] >= run["threshold"]
        true_positives = np.sum(flagged & (labels == 1))
        f1 = 2 * true_positives / max(flagged.sum() + labels.sum(), 1)
        assert run["f1"] == pytest.approx(f1, abs=1e-12)
        assert f"| {name} | {100 * run['image_auroc']:.1f} |" in markdown
        assert_png(workdir / "runs" / name / "heatmaps.png")
        assert (workdir / "runs" / name / "result.json").exists()
        assert (workdir / "runs" / name / "model").is_dir()
        assert list((workdir / "tensorboard" / name).glob("events.out.tfevents.*"))


def test_sigkill_mid_training_then_rerun_gives_identical_results(
    env, data_root, trained, tmp_path
):
    workdir = tmp_path / "killed"
    first_checkpoint = workdir / "checkpoints" / GROUP / "5"
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
    assert not list(workdir.glob("runs/*/result.json"))

    process = run_main(env, data_root, workdir)
    assert_ok(process)
    resumed = [line for line in process.stderr.splitlines() if "resuming" in line]
    assert len(resumed) == 1, process.stderr[-3000:]
    resumed_at = int(resumed[0].split(" at step ")[1].split()[0])
    assert 5 <= resumed_at < STEPS
    # A few images for 40 steps: the step reads the teacher cache, rebuilt on resume.
    assert "teacher cache on" in process.stderr

    assert results(workdir)["runs"] == results(trained)["runs"]
    for name in CATEGORIES:
        assert_same_scores(workdir, trained, name)

    # What the user sees: the random-teacher warning, progress with images/s, one result line.
    assert "the teacher is RANDOM" in process.stderr
    assert "img_s=" in process.stderr
    for run in results(workdir)["runs"]:
        assert f"run {run['name']}: image AUROC {run['image_auroc']:.4f}" in process.stderr


def test_group_interrupted_between_its_runs_finishes_identically(
    data_root, trained, tmp_path, caplog
):
    """Killed after the first run of a group was written: the group restores its final
    checkpoint (a split trained alone would differ in the last bits)."""
    workdir = tmp_path / "half_evaluated"
    shutil.copytree(trained, workdir)
    first, second = CATEGORIES
    for leftover in ("result.json", "scores.npz", "heatmaps.png"):
        (workdir / "runs" / second / leftover).unlink()
    (workdir / "results.json").unlink()
    first_files = mtimes(workdir / "runs" / first)
    with caplog.at_level(logging.INFO):
        fcd_main.run(folder_config(data_root), str(workdir), "train_and_eval")
    assert f"at step {STEPS} of {STEPS}" in caplog.text  # restored, not trained again
    assert [path.name for path in (workdir / "checkpoints").iterdir()] == [GROUP]
    assert mtimes(workdir / "runs" / first) == first_files
    assert results(workdir)["runs"] == results(trained)["runs"]
    assert_same_scores(workdir, trained, second)


def forbidden(*args, **kwargs):
    raise AssertionError("a finished run was trained or scored again")


def test_rerun_skips_finished_runs(data_root, trained, monkeypatch, caplog):
    files = mtimes(trained / "runs")
    before = results(trained)
    monkeypatch.setattr(experiment, "GroupTrainer", forbidden)
    monkeypatch.setattr(experiment, "evaluate_splits", forbidden)
    with caplog.at_level(logging.INFO):
        fcd_main.run(folder_config(data_root), str(trained), "train_and_eval")
    for name in CATEGORIES:
        assert f"run {name} already finished" in caplog.text
    assert mtimes(trained / "runs") == files
    assert results(trained)["runs"] == before["runs"]


def test_predict_then_eval_agree_with_training(env, data_root, trained, tmp_path):
    name = CATEGORIES[1]
    run = results(trained)["runs"][1]
    inputs = str(data_root / name / "test" / "*" / "*.png")
    output_dir = tmp_path / "predictions"
    with pytest.raises(FcdError, match=r"holds 2 trained runs .* --config.splits=NAME"):
        fcd_main.run(folder_config(data_root, predict__inputs=inputs), str(trained), "predict")
    process = run_main(
        env, data_root, trained, "--mode=predict", f"--config.predict.inputs={inputs}",
        f"--config.predict.output_dir={output_dir}", f"--config.splits={name}",
        f"--compilation_cache={tmp_path / 'xla'}",
    )
    assert_ok(process)
    assert any((tmp_path / "xla").iterdir())  # the programs it compiled, for the next process
    summary = json.loads(process.stdout.splitlines()[-1])
    assert summary["images"] == run["n_test"] and summary["random_teacher"] is True
    assert "the teacher is RANDOM" in process.stderr
    with open(output_dir / "predictions.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert sorted(row["path"] for row in rows) == sorted(
        str(path) for path in (data_root / name / "test").glob("*/*.png")
    )
    predicted = np.array([float(row["score"]) for row in rows])
    for row, score in zip(rows, predicted, strict=True):
        assert float(row["threshold"]) == pytest.approx(run["threshold"], rel=1e-5)
        assert row["verdict"] == ("anomalous" if score >= run["threshold"] else "normal")
        assert_png(output_dir / row["heatmap"])
    assert len({row["heatmap"] for row in rows}) == len(rows)
    # The same images were scored in training's evaluation: the same scores (CSV: 6 digits).
    evaluated = scores(trained, name)["scores"]
    np.testing.assert_allclose(np.sort(predicted), np.sort(evaluated), rtol=1e-5)

    before = results(trained)
    fcd_main.run(folder_config(data_root), str(trained), "eval")
    assert results(trained)["runs"] == before["runs"]


def test_nan_loss_stops_with_one_line_and_keeps_checkpoints(env, data_root, tmp_path):
    config = folder_config(
        data_root, optim__lr=1e30, optim__clip_norm=0.0, train__checkpoint_every=1
    )
    with pytest.raises(TrainingError) as error:
        fcd_main.run(config, str(tmp_path), "train_and_eval")
    message = str(error.value)
    assert "\n" not in message
    became = r"run \w+: the loss became -?(nan|inf) at step \d+; lower --config.optim.lr"
    assert re.search(became, message), message
    assert "delete it or use another --workdir" in message
    kept_step = int(message.split("checkpoints up to step ")[1].split()[0])
    checkpoint_dir = tmp_path / "checkpoints" / GROUP
    steps = sorted(int(path.name) for path in checkpoint_dir.iterdir() if path.name.isdigit())
    assert steps and steps[-1] == kept_step
    assert not [path for path in checkpoint_dir.iterdir() if "tmp" in path.name]
    # Finalised: orbax renames the temporary folder (above) once the metadata is written.
    assert (checkpoint_dir / str(kept_step) / "_CHECKPOINT_METADATA").exists()
    assert not list(tmp_path.glob("runs/*/result.json"))


def test_rerun_with_another_training_config_is_one_clear_error(data_root, trained):
    files = lambda: {p: p.stat().st_mtime_ns for p in trained.rglob("*")
                     if p.is_file() and p.name != LOCK_FILE}  # the lock: who runs, not results
    before = files()
    lr = folder_config(data_root).optim.lr
    for mode in ("train_and_eval", "eval", "predict"):
        changed = folder_config(data_root, optim__lr=lr / 2, method__layers=(1, 3, 5, 7),
                                predict__inputs=str(data_root))
        with pytest.raises(ConfigError) as error:
            fcd_main.run(changed, str(trained), mode)
        message = str(error.value)
        assert "\n" not in message
        for fragment in (f"optim.lr {lr!r} -> {lr / 2!r}", "method.layers", "use a new --workdir"):
            assert fragment in message, message
    assert files() == before  # nothing written, nothing resumed
    # Settings that change nothing that is trained may change between runs.
    check_training_config(reconcile(folder_config(
        data_root, train__log_every=7, train__teacher_cache="off", parallel_splits="1",
        model__scan_layers=False, method__top_k=3, eval__threshold_quantile=0.9,
    ), None), str(trained))


def test_cli_error_is_one_line_with_exit_code_2(env, tmp_path):
    process = subprocess.run(
        [sys.executable, "-m", "fcd_jax.main", "--config=configs/cifar10.py:runlocal",
         f"--workdir={tmp_path}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert process.returncode == 2, process.stderr[-3000:]
    errors = [line for line in process.stderr.splitlines() if line.startswith("fcd_jax: error:")]
    assert len(errors) == 1 and "Traceback" not in process.stderr, process.stderr[-3000:]
    for fragment in ("no teacher checkpoint", "ViT-B_16.npz", "--config.teacher.checkpoint=",
                     "python -m fcd_jax.convert"):
        assert fragment in errors[0]


def corrupt_copy(data_root, tmp_path):
    root = make_mvtec_folder(tmp_path / "corrupt", categories=CATEGORIES[:1])
    bad_image = root / CATEGORIES[0] / "train" / "good" / "001.png"
    bad_image.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return {"data__root": str(root)}, ("cannot read image", str(bad_image), "skip_bad_images")


@pytest.mark.parametrize(
    "case",
    [
        lambda root, tmp: ({"data__name": "imagenet"}, ("names no known dataset", "folder")),
        lambda root, tmp: ({"splits": "gizmo"}, ("unknown split(s) gizmo", ", ".join(CATEGORIES))),
        lambda root, tmp: ({"data__root": "/no/such/dir"}, ("missing folder /no/such/dir",)),
        corrupt_copy,
    ],
    ids=["unknown_dataset", "unknown_split", "missing_folder", "corrupt_image"],
)
def test_input_errors_name_the_problem_in_one_line(env, data_root, tmp_path, case):
    overrides, fragments = case(data_root, tmp_path)
    with pytest.raises(FcdError) as error:
        fcd_main.run(folder_config(data_root, **overrides), str(tmp_path), "train_and_eval")
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_comma_separated_datasets_run_in_turn_in_their_own_workdirs(monkeypatch, tmp_path):
    calls = []

    def record(config, workdir):
        calls.append((config.data.name, workdir))

    monkeypatch.setattr(experiment, "train_and_evaluate", record)
    config = folder.get_config("runlocal")
    config.data.name = "cifar10, fashion_mnist"
    fcd_main.run(config, str(tmp_path), "train_and_eval")
    assert calls == [
        ("cifar10", str(tmp_path / "cifar10")), ("fashion_mnist", str(tmp_path / "fashion_mnist"))
    ]
    assert config.data.name == "cifar10, fashion_mnist"  # the caller's config is left alone


def test_compilation_cache_flag_points_jax_at_the_folder(tmp_path):
    import jax

    from fcd_jax import compilation_cache

    before = jax.config.jax_compilation_cache_dir
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        compilation_cache.enable("")
        assert jax.config.jax_compilation_cache_dir is None
        compilation_cache.enable(str(tmp_path / "xla"))
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
        assert (tmp_path / "xla").is_dir()
        (tmp_path / "file").write_text("")
        compilation_cache.enable(str(tmp_path / "file" / "xla"))  # cannot be made: warns only
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
