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
from fcd_jax import log_filter, workdir
from fcd_jax import main as fcd_main
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
    ("--config.method.layers=abc",
     "fcd_jax: error: config.method.layers=('abc',) is not a list of block indices: give 0-based"),
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
    keep = log_filter.LibraryInfoFilter().filter
    assert not keep(library) and keep(ours) and keep(warning)
    try:
        raise ValueError("RESOURCE_EXHAUSTED")
    except ValueError:
        failed = logging.LogRecord("absl", logging.ERROR, "/x/orbax/future.py", 1, "thread raised",
                                   (), sys.exc_info())  # fmt: skip
    assert keep(failed) and failed.exc_info is None  # the line, not the stack trace


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

    # Predict needs neither the training data (moved away, data.root not given) nor the teacher
    # named again: the workdir records them.
    images = tmp_path / "new_images"
    (root / "widget" / "train" / "good").rename(images)
    shutil.rmtree(root)
    before = hashes(images, work / "runs", work / "checkpoints")
    process = subprocess.run(
        [sys.executable, "-m", "fcd_jax.main", "--config=configs/folder.py:runlocal",
         f"--workdir={work}", "--mode=predict", f"--config.predict.inputs={images}",
         f"--config.predict.output_dir={tmp_path / 'out'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    assert "teacher as" in process.stderr and "random" in process.stderr
    assert len((tmp_path / "out" / "predictions.csv").read_text().splitlines()) == 7
    assert hashes(images, work / "runs", work / "checkpoints") == before


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


# --- Bad inputs after the config: the data's shape, the workdir, files of the workdir --------


def folder_cli(root, work, *flags, cwd=REPO, **kwargs):
    """``fcd_jax.main`` on ``configs/folder.py:runlocal`` (random teacher, 2 steps)."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", JAX_PLATFORMS="cpu")
    data = [f"--config.data.root={root}"] if root is not None else []
    return subprocess.run(
        [sys.executable, "-m", "fcd_jax.main", "--config=configs/folder.py:runlocal",
         "--config.train.steps=2", "--config.parallel_splits=1", *data, f"--workdir={work}",
         *flags], cwd=cwd, env=env, capture_output=True, text=True, timeout=600, **kwargs,
    )


def hashes(*tops):
    """``{file: sha256}`` under ``tops``: what a failed command must leave as it was."""
    import hashlib

    files = [path for top in tops for path in sorted(Path(top).rglob("*")) if path.is_file()]
    return {str(path): hashlib.sha256(path.read_bytes()).hexdigest() for path in files}


def assert_one_line_error(process, *needles):
    assert process.returncode == 2, process.stderr[-3000:]
    assert "Traceback" not in process.stderr, process.stderr[-3000:]
    errors = [line for line in process.stderr.splitlines() if line.startswith("fcd_jax: error:")]
    assert len(errors) == 1 and errors[0] == process.stderr.strip().splitlines()[-1]
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert "train " not in process.stderr  # no training progress bar: refused before training


def test_a_holdout_of_no_image_is_refused_before_training(tmp_path):
    from fixtures import make_mvtec_folder

    root = make_mvtec_folder(tmp_path / "data", categories=("widget",), n_train=5)
    before = hashes(root)
    process = folder_cli(root, tmp_path / "work", "--config.teacher.init=random",
                         "--config.data.holdout_fraction=0.1")
    assert_one_line_error(process, "holdout_fraction=0.1 holds out no image of the 5 training",
                          "use --config.data.holdout_fraction=0.11 or more")
    assert hashes(root) == before and not (tmp_path / "work").exists()


def test_a_second_run_on_a_workdir_in_use_is_refused_naming_the_first(tmp_path):
    from fixtures import make_mvtec_folder

    root = make_mvtec_folder(tmp_path / "data", categories=("widget",))
    work = tmp_path / "work"
    (work / "runs").mkdir(parents=True)
    (work / "runs" / "mine.txt").write_text("results")
    before = hashes(work)
    with workdir.locked(str(work)):
        process = folder_cli(root, work, "--config.teacher.init=random")
    assert_one_line_error(process, f"workdir {work} is in use by another run (process "
                                   f"{os.getpid()} on ", "wait for it to finish")
    assert {k: v for k, v in hashes(work).items() if not k.endswith(workdir.LOCK_FILE)} == before


def test_the_lock_of_a_dead_run_is_taken_over(tmp_path):
    work = tmp_path / "work"
    killed = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from fcd_jax import workdir\n"
        f"with workdir.locked({str(work)!r}):\n print('locked', flush=True); time.sleep(60)")],
        cwd=REPO, stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert killed.stdout.readline().strip() == "locked"
    with pytest.raises(FcdError, match=f"in use by another run \\(process {killed.pid} "):
        with workdir.locked(str(work)):
            pass
    killed.kill()
    killed.wait()
    assert str(killed.pid) in (work / workdir.LOCK_FILE).read_text()  # left behind: stale
    with workdir.locked(str(work)):
        assert str(os.getpid()) in (work / workdir.LOCK_FILE).read_text()


def test_a_lock_that_made_the_workdir_for_nothing_removes_it(tmp_path):
    with workdir.locked(str(tmp_path / "new")):
        pass
    assert not (tmp_path / "new").exists()
    (tmp_path / "file").write_text("mine")
    with pytest.raises(FcdError, match="is a file, not a folder"):
        with workdir.locked(str(tmp_path / "file")):
            pass
    assert (tmp_path / "file").read_text() == "mine"


def test_a_result_json_that_is_not_json_is_one_line_and_kept(tmp_path):
    work = tmp_path / "work"
    (work / "runs" / "widget" / "model").mkdir(parents=True)
    (work / "runs" / "widget" / "result.json").write_text("{")
    with pytest.raises(FcdError, match=r"cannot read run widget's result .*result.json "
                                       r"\(Expecting .*model is kept: move that result"):
        workdir.read_finished(str(work), "widget")
    assert workdir.finished_runs(str(work)) == ["widget"]
    from fixtures import make_mvtec_folder

    root = make_mvtec_folder(tmp_path / "data", categories=("widget",))
    before = hashes(work, root)
    process = folder_cli(root, work, "--config.teacher.init=random")
    assert_one_line_error(process, "cannot read run widget's result")
    assert {k: v for k, v in hashes(work, root).items() if k in before} == before


def test_a_disk_error_at_any_write_is_one_line(tmp_path):
    """A full disk (ENOSPC) where experiment writes: injected, as no disk fills on demand."""
    script = (
        "import errno, runpy, sys\n"
        "from fcd_jax import experiment\n"
        "def full(*args):\n"
        "    raise OSError(errno.ENOSPC, 'No space left on device', sys.argv[-1] + '/x')\n"
        "experiment.train_and_evaluate = full\n"
        "sys.argv = ['fcd_jax/main.py', *sys.argv[1:]]\n"
        "runpy.run_module('fcd_jax.main', run_name='__main__')\n"
    )
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", JAX_PLATFORMS="cpu")
    from fixtures import make_mvtec_folder

    root = make_mvtec_folder(tmp_path / "data", categories=("widget",))
    process = subprocess.run(
        [sys.executable, "-c", script, "--config=configs/folder.py:runlocal",
         f"--config.data.root={root}", "--config.teacher.init=random",
         f"--workdir={tmp_path / 'work'}", f"--config.predict.output_dir={tmp_path}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert_one_line_error(process, "No space left on device writing", "free some space")


def test_convert_onto_a_file_or_an_unwritable_place_is_one_line(tmp_path, monkeypatch, capsys):
    from fcd_jax.convert import cli

    (tmp_path / "notes.txt").write_text("mine")
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", JAX_PLATFORMS="cpu")
    process = subprocess.run(
        [sys.executable, "-m", "fcd_jax.convert", str(tmp_path / "missing.npz"),
         str(tmp_path / "notes.txt")], cwd=REPO, env=env, capture_output=True, text=True,
    )
    assert process.returncode == 1 and "Traceback" not in process.stderr
    assert process.stderr.strip() == (f"error: cannot write {tmp_path}/notes.txt: {tmp_path}/"
                                      "notes.txt is a file, not a folder; choose a DST you can "
                                      "write")  # checked before the source is even read
    assert (tmp_path / "notes.txt").read_text() == "mine"
    real_access = os.access
    read_only = tmp_path / "ro"
    read_only.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: real_access(path, mode)
                        and Path(path) != read_only)  # as a read-only mount answers root
    assert cli.main([str(tmp_path / "missing.npz"), str(read_only / "teacher")]) == 1
    assert capsys.readouterr().err.strip().endswith(f"{read_only} is not writable; choose a "
                                                     "DST you can write")  # fmt: skip
    assert list(read_only.iterdir()) == []


def test_an_arch_json_with_a_bad_value_is_one_line(tmp_path, converted_teacher):
    config = folder.get_config("runlocal")
    teacher = converted_teacher(config)
    arch = json.loads((teacher / "arch.json").read_text())
    (teacher / "arch.json").write_text(json.dumps(dict(arch, width="wide")))
    before = hashes(teacher)
    from fixtures import make_mvtec_folder

    root = make_mvtec_folder(tmp_path / "data", categories=("widget",))
    process = folder_cli(root, tmp_path / "work", f"--config.teacher.checkpoint={teacher}")
    assert_one_line_error(process, f"{teacher}/arch.json does not describe a ViT (",
                          "convert the checkpoint again")
    assert hashes(teacher) == before


def test_predict_names_non_utf8_files_readably(tmp_path):
    from fcd_jax import reports

    name = os.fsdecode(b"\xe9t\xe9.png")  # a Latin-1 name: surrogates in Python
    rng = np.random.default_rng(0)
    csv_path = reports.write_predictions(
        tmp_path, [str(tmp_path / name)], [2.0], 1.0, rng.random((1, 8, 8)),
        rng.integers(0, 255, (1, 8, 8, 3), dtype=np.uint8),
    )
    with open(csv_path, encoding="utf-8") as file:
        (row,) = list(csv.DictReader(file))
    assert row["path"] == f"{tmp_path}/\\xe9t\\xe9.png" and row["verdict"] == "anomalous"
    assert (tmp_path / os.fsdecode(b"\xe9t\xe9.png")).is_file()


class _RunsCode:
    """Unpickling this would run ``touch <marker>``: what a hostile ``.pth`` does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("protocol", [2, 4])
def test_a_pth_holding_code_is_refused_as_such_never_run(tmp_path, protocol):
    import pickle

    evil, garbage = tmp_path / "teacher.pth", tmp_path / "garbage.pth"
    evil.write_bytes(pickle.dumps({"model": _RunsCode(tmp_path / "pwned")}, protocol=protocol))
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", JAX_PLATFORMS="cpu")
    for source, needle in ((evil, "holds code or Python objects besides tensors"),
                           (garbage, "corrupt or truncated file")):  # fmt: skip
        process = subprocess.run(
            [sys.executable, "-m", "fcd_jax.convert", str(source), str(tmp_path / "out")],
            cwd=REPO, env=env, capture_output=True, text=True,
        )
        errors = [line for line in process.stderr.splitlines() if line.startswith("error: ")]
        assert process.returncode == 1 and "Traceback" not in process.stderr, process.stderr
        assert len(errors) == 1 and needle in errors[0], process.stderr
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()


def test_orbax_reports_a_full_disk_as_a_value_error_that_is_the_disk_line():
    """tensorstore (orbax's writer) raises ValueError with the errno in its text."""
    error = ValueError(
        'RESOURCE_EXHAUSTED: Error writing local file "/w/checkpoints/a/2.orbax-checkpoint-tmp/'
        '_sharding": Failed to write 2634 bytes to file 9: No space left on device '
        "[os_error_code='28']"
    )
    disk = fcd_main.as_disk_error(error)
    assert fcd_main.disk_error_message(disk).startswith(
        "No space left on device writing /w/checkpoints/a/2.orbax-checkpoint-tmp/_sharding: "
        "free some space"
    )
    assert fcd_main.as_disk_error(ValueError("bad shape [os_error_code='2']")) is None
    assert fcd_main.as_disk_error(ValueError("not a disk")) is None
    chained = RuntimeError("save failed")
    chained.__cause__ = OSError(30, "Read-only file system", "/w/x")
    assert "make it writable" in fcd_main.disk_error_message(fcd_main.as_disk_error(chained))
