"""Issue 15, second half: what a user gets wrong on the command line is one line and exit status
2 before any work (``fcd_jax.main``), and the workdir's recorded training config neither locks a
workdir nothing was trained in nor blocks scoring moved data (``fcd_jax.workdir``)."""

import csv
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from configs import folder
from fcd_jax import main as fcd_main
from fcd_jax import workdir
from fcd_jax.errors import ConfigError, FcdError

REPO = Path(__file__).resolve().parents[1]


def cli(tmp_path, *flags):
    """Runs ``fcd_jax.main`` on the demo config with its workdir in ``tmp_path``."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "fcd_jax.main", "--config", "configs/demo.py:runlocal",
         f"--workdir={tmp_path / 'work'}", *flags],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )


@pytest.mark.parametrize("flag, expected", [
    ("--config.optim.lrr=1", "fcd_jax: error: unknown config field optim.lrr: did you mean "
                             "optim.lr?"),
    ("--mode=bogus", "fcd_jax: error: flag --mode=bogus: value should be one of"),
    ("--bogus=1", "fcd_jax: error: Unknown command line flag 'bogus'"),
    ("--config.data.image_size=abc", "fcd_jax: error: flag --config.data.image_size=abc"),
    # The second dataset's bad value fails before the first trains.
    ("--config.per_dataset.textures.train.epochs=-1",
     "fcd_jax: error: config.train.epochs=-1 must be an integer >= 0"),
])
def test_cli_errors_are_one_line_exit_2_and_write_nothing(tmp_path, flag, expected):
    process = cli(tmp_path, flag)
    assert process.returncode == 2, process.stderr
    errors = [line for line in process.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(expected), process.stderr
    assert "Traceback" not in process.stderr
    assert not (tmp_path / "work").exists()


def test_library_info_is_filtered_unless_verbose():
    library = logging.LogRecord("absl", logging.INFO, "/x/orbax/checkpoint/a.py", 1, "m", (), None)
    ours = logging.LogRecord("absl", logging.INFO, fcd_main.__file__, 1, "m", (), None)
    warning = logging.LogRecord("absl", logging.WARNING, "/x/orbax/a.py", 1, "m", (), None)
    keep = fcd_main.LibraryInfoFilter().filter
    assert not keep(library) and keep(ours) and keep(warning)


def recorded_workdir(tmp_path, config):
    directory = str(tmp_path / "work")
    workdir.check_training_config(config, directory)
    assert (tmp_path / "work" / workdir.TRAINING_CONFIG).exists()
    return directory


def test_a_failed_first_run_does_not_lock_the_workdir(tmp_path):
    directory = recorded_workdir(tmp_path, folder.get_config("runlocal"))
    changed = folder.get_config("runlocal")
    changed.optim.lr = 0.5
    workdir.check_training_config(changed, directory)  # nothing trained: recorded afresh
    with open(os.path.join(directory, workdir.TRAINING_CONFIG)) as file:
        assert json.load(file)["optim.lr"] == 0.5


def test_trained_work_refuses_another_config_without_advising_deletion(tmp_path):
    directory = recorded_workdir(tmp_path, folder.get_config("runlocal"))
    os.makedirs(os.path.join(directory, "runs", "a"))
    changed = folder.get_config("runlocal")
    changed.optim.lr = 0.5
    for record in (True, False):
        with pytest.raises(ConfigError) as error:
            workdir.check_training_config(changed, directory, record=record)
        assert "optim.lr" in str(error.value) and "delete" not in str(error.value)


def test_data_root_is_compared_resolved_and_not_when_scoring(tmp_path):
    config = folder.get_config("runlocal")
    config.data.root = str(tmp_path / "data")
    directory = recorded_workdir(tmp_path, config)
    os.makedirs(os.path.join(directory, "runs", "a"))
    config.data.root = str(tmp_path / "data") + "/"
    config.data.skip_bad_images = True
    workdir.check_training_config(config, directory)  # same folder, same training
    config.data.root = str(tmp_path / "moved")
    workdir.check_training_config(config, directory, record=False)  # scoring moved data
    with pytest.raises(ConfigError, match="data.root"):
        workdir.check_training_config(config, directory)  # resuming training on other data


def test_a_folder_with_only_train_good_trains_reports_and_predicts(tmp_path):
    """Issue 15, class 3: a user with no defect images gets a threshold, AUROC "n/a" and
    predictions."""
    from fixtures import make_mvtec_folder

    root = make_mvtec_folder(tmp_path / "data", categories=("widget",))
    for extra in ("test", "ground_truth"):
        shutil.rmtree(root / "widget" / extra, ignore_errors=True)
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", JAX_PLATFORMS="cpu")
    work = tmp_path / "work"

    def run(*flags):
        process = subprocess.run(
            [sys.executable, "-m", "fcd_jax.main", "--config=configs/folder.py:runlocal",
             "--config.teacher.init=random", "--config.train.steps=2",
             f"--config.data.root={root}", f"--workdir={work}", *flags],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
        )
        assert process.returncode == 0, process.stderr[-3000:]
        return process

    run()
    results = json.loads((work / "results.json").read_text())
    (summary,) = results["runs"]
    assert summary["image_auroc"] is None and summary["n_test"] == 0
    assert summary["auroc_undefined"] == "no test images"
    assert np.isfinite(summary["threshold"])
    assert "n/a (no test images)" in (work / "results.md").read_text()
    run("--mode=predict", f"--config.predict.inputs={root / 'widget' / 'train' / 'good'}")
    with open(work / "predict" / "predictions.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 6 and {row["verdict"] for row in rows} <= {"normal", "anomalous"}


def test_predict_refuses_an_output_folder_that_overwrites_an_input(tmp_path):
    from fcd_jax import predict

    images = tmp_path / "images"
    images.mkdir()
    files = [images / "a.png", images / "b.jpg"]
    for path in files:
        path.write_bytes(b"mine")
    with pytest.raises(FcdError, match=r"would write .*a\.png over an input image"):
        predict.check_output_dir(str(images), files)
    with pytest.raises(FcdError, match="over an input image"):  # a trailing slash: the same folder
        predict.check_output_dir(str(images) + "/", files[:1])
    predict.check_output_dir(str(images), files[1:])  # b.png beside b.jpg overwrites nothing
    predict.check_output_dir(str(tmp_path / "out" / "new"), files)  # made later
    (tmp_path / "file").write_text("mine")
    with pytest.raises(FcdError, match="is a file, not a folder"):
        predict.check_output_dir(str(tmp_path / "file" / "out"), files)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(FcdError, match="is not writable"):
            predict.check_output_dir(str(locked / "out"), files)
    assert [path.read_bytes() for path in files] == [b"mine", b"mine"]


def test_a_corrupt_latest_checkpoint_falls_back_to_the_newest_that_restores(tmp_path, caplog):
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from fcd_jax import checkpoints

    tree = {"w": jnp.arange(4.0)}
    manager = checkpoints.training_manager(str(tmp_path / "ckpt"), max_to_keep=3)
    for step in (1, 2):
        manager.save(step, args=ocp.args.StandardSave({"w": tree["w"] * step}))
    manager.wait_until_finished()
    for path in (tmp_path / "ckpt" / "2").rglob("*"):
        if path.is_file() and "METADATA" not in path.name:
            path.write_bytes(b"\x00garbage")
    with caplog.at_level(logging.WARNING):
        restored, step = checkpoints.restore_latest(manager, tree)
    assert step == 1
    np.testing.assert_array_equal(restored["w"], np.arange(4.0))
    assert "checkpoint(s) 2 of" in caplog.text and "resuming from step 1" in caplog.text
    manager.close()


@pytest.mark.parametrize("content, expected", [
    (None, "fcd_jax: error: cannot read the flags (OSError"),
    ("def get_config(:\n", "fcd_jax: error: cannot read the flags (SyntaxError"),
])
def test_a_missing_or_broken_config_file_is_one_line(tmp_path, content, expected):
    config_file = tmp_path / "mine.py"
    if content is not None:
        config_file.write_text(content)
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", JAX_PLATFORMS="cpu")
    process = subprocess.run(
        [sys.executable, "-m", "fcd_jax.main", f"--config={config_file}",
         f"--workdir={tmp_path / 'work'}"], cwd=REPO, env=env, capture_output=True, text=True,
    )
    assert process.returncode == 2 and process.stderr.startswith(expected), process.stderr
    assert len(process.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "work").exists()
