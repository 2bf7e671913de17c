"""The workdir: where each run's files go, the finished runs' results, the reports over all runs,
and the training config the workdir was made with.

Layout: ``runs/<name>/`` (``result.json``, ``scores.npz``, ``heatmaps.png``, the trained
``model/``), ``checkpoints/<group>/`` (orbax, per group of splits trained together),
``tensorboard/<name>/``, and at the top ``training_config.json``, ``results.json``,
``results.md`` and the plots.

A rerun of the same command resumes from its checkpoints and skips finished runs. With a changed
config that would silently continue (or keep) the old training: instead the config fields that
change what is trained are written to ``training_config.json`` on the first run and compared on
every later one (:func:`check_training_config`). The config checked is the one reconciled with the
teacher (``fcd_jax.teacher``), so what is recorded is what ran. Paths are compared resolved
(``data.root`` as ``os.path.realpath``); scoring a trained workdir (``record=False``) ignores where
the data is (``LOCATION_FIELDS``), so moved data can still be scored; a workdir with no trained
work yet (a first run that failed) is recorded afresh instead of refused.

One run at a time: :func:`locked` holds an advisory lock (``fcntl.flock``) on
``<workdir>/.fcd_jax.lock`` while a run trains or scores; a second run on the same workdir is
refused with one line naming the first one's process. The kernel drops the lock when its process
dies, so a lock left by a killed run is simply taken over.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
from absl import logging

from fcd_jax import reports
from fcd_jax.errors import ConfigError, WorkdirError

TRAINING_CONFIG = "training_config.json"
LOCK_FILE = ".fcd_jax.lock"
RESULT_JSON = "result.json"
SCORES_NPZ = "scores.npz"

# Fields that change nothing that is trained: run selection, file locations, speed and memory
# settings (same numbers), logging, and what happens after training (scoring, predict).
NOT_TRAINING = (
    "splits", "data.data_dir", "data.download", "data.eval_batch_size", "model.scan_layers",
    "model.remat", "model.remat_policy", "model.attention_implementation", "teacher.cache_dir",
    "method.top_k",
    "method.image_score", "method.map_sigma", "train.log_every", "train.checkpoint_every",
    "train.teacher_cache", "eval", "predict", "mesh_shape", "parallel_splits", "stack_mode",
    "per_dataset",
    "data.skip_bad_images",
)
# Where the data is: compared when training resumes, not when trained runs are scored again.
LOCATION_FIELDS = ("data.root",)


def file_name(run_name: str) -> str:
    """A run name as a file name: ``T-shirt/top`` -> ``T-shirt_top``."""
    return run_name.replace("/", "_")


def run_dir(workdir: str, name: str) -> str:
    return os.path.join(workdir, "runs", file_name(name))


def model_dir(workdir: str, name: str) -> str:
    """The trained ``{"params", "anchor"}`` of run ``name`` (``checkpoints.save_tree``)."""
    return os.path.join(run_dir(workdir, name), "model")


def tensorboard_dir(workdir: str, name: str) -> str:
    return os.path.join(workdir, "tensorboard", file_name(name))


def checkpoint_dir(workdir: str, names: list[str]) -> str:
    """The orbax checkpoints of the group of splits ``names`` trained together."""
    group = "+".join(names)
    if len(group) > 80:
        group = f"{names[0]}+{len(names) - 1}_more"
    return os.path.join(workdir, "checkpoints", file_name(group))


def read_finished(workdir: str, name: str) -> dict | None:
    """The ``results.json`` entry of a run that finished earlier, or None; a ``WorkdirError``
    line if its ``result.json`` cannot be read (the trained model beside it is kept)."""
    path = os.path.join(run_dir(workdir, name), RESULT_JSON)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as file:
            summary = json.load(file)
        if not isinstance(summary, dict) or "threshold" not in summary:
            raise ValueError("not a run's result")
        return summary
    except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError too
        raise WorkdirError(
            f"cannot read run {name}'s result {path} ({str(error).splitlines()[0][:120]}); its "
            f"trained model in {model_dir(workdir, name)} is kept: move that result file away "
            "and rerun the same command to score the model again"
        ) from None


def finished_runs(workdir: str) -> list[str]:
    """The names of the runs that finished in ``workdir`` (their ``result.json`` files), as
    recorded there: predict and eval need no data listing to find them."""
    folder = os.path.join(workdir, "runs")
    names = []
    for entry in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        path = os.path.join(folder, entry, RESULT_JSON)
        if os.path.isfile(path):
            with contextlib.suppress(OSError, ValueError):  # read_finished names the problem
                with open(path, encoding="utf-8") as file:
                    entry = json.load(file).get("name", entry)
            names.append(entry)
    return names


def write_finished(workdir: str, summary: dict) -> None:
    path = os.path.join(run_dir(workdir, summary["name"]), RESULT_JSON)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    reports.write_atomically(path, json.dumps(summary, indent=2))


def write_reports(
    config: ml_collections.ConfigDict, workdir: str, runs: list[dict], teacher_is_random: bool
) -> dict:
    """results.json, results.md, ROC curves and score histograms over every run."""
    results = reports.write_results(workdir, config.data.name, config, runs, teacher_is_random)
    arrays = [
        reports.load_run_arrays(os.path.join(run_dir(workdir, run["name"]), SCORES_NPZ))
        for run in runs
    ]
    reports.plot_roc_curves(os.path.join(workdir, reports.ROC_PNG), arrays)
    reports.plot_score_histograms(os.path.join(workdir, reports.HISTOGRAMS_PNG), arrays)
    return results


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def training_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config fields that change what is trained, dotted names to JSON values."""
    fields = flatten(json.loads(config.to_json()))
    for name in LOCATION_FIELDS:
        if fields.get(name):
            fields[name] = os.path.realpath(os.path.expanduser(fields[name]))
    return {
        name: value for name, value in sorted(fields.items())
        if not any(name == skip or name.startswith(skip + ".") for skip in NOT_TRAINING)
    }


def has_trained_work(workdir: str) -> bool:
    """Whether ``workdir`` holds a checkpoint or a trained run (else a failed first run at most)."""
    return any(
        os.path.isdir(folder) and os.listdir(folder)
        for folder in (os.path.join(workdir, "checkpoints"), os.path.join(workdir, "runs"))
    )


def recorded_training_config(workdir: str) -> dict[str, Any] | None:
    """The ``training_fields`` recorded in ``workdir`` (None if none are)."""
    path = os.path.join(workdir, TRAINING_CONFIG)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as file:
            recorded = json.load(file)
        if not isinstance(recorded, dict):
            raise ValueError("not a JSON object")
        return recorded
    except (OSError, ValueError) as error:
        raise WorkdirError(
            f"cannot read {path} ({str(error).splitlines()[0][:120]}): it records what the "
            "workdir was trained with; restore it, or use a new --workdir"
        ) from None


def with_recorded_teacher(
    config: ml_collections.ConfigDict, workdir: str
) -> ml_collections.ConfigDict:
    """For scoring a trained ``workdir`` (eval, predict): a config that names no teacher
    checkpoint scores with the teacher the workdir was trained with (its checkpoint, or a random
    one), so a predict command need not repeat it. Else ``config`` as it is."""
    recorded = recorded_training_config(workdir) or {}
    init, checkpoint = recorded.get("teacher.init"), recorded.get("teacher.checkpoint") or ""
    unnamed = config.teacher.init == "pretrained" and not config.teacher.checkpoint
    if not unnamed or not (init == "random" or (init == "pretrained" and checkpoint)):
        return config
    config = config.copy_and_resolve_references()
    config.teacher.init, config.teacher.checkpoint = init, checkpoint
    logging.info("teacher as %s was trained: %s", workdir, checkpoint or "random")
    return config


def check_training_config(
    config: ml_collections.ConfigDict, workdir: str, record: bool = True
) -> None:
    """One ``ConfigError`` line if ``workdir`` was trained with another training config (nothing
    in it is touched); else, with ``record`` (training), writes the config there if it is not yet
    or nothing was trained with the recorded one. Without ``record`` (scoring trained runs) the
    ``LOCATION_FIELDS`` are not compared."""
    path = os.path.join(workdir, TRAINING_CONFIG)
    fields = training_fields(config)
    recorded = recorded_training_config(workdir)
    if recorded is not None:
        if not record:
            fields = {name: v for name, v in fields.items() if name not in LOCATION_FIELDS}
            recorded = {name: v for name, v in recorded.items() if name not in LOCATION_FIELDS}
        changed = [
            f"{name} {recorded.get(name, '(unset)')!r} -> {fields.get(name, '(unset)')!r}"
            for name in sorted(set(recorded) | set(fields))
            if recorded.get(name) != fields.get(name)
        ]
        if not changed:
            return
        if not (record and not has_trained_work(workdir)):
            shown = "; ".join(changed[:4]) + (f"; {len(changed) - 4} more" if changed[4:] else "")
            raise ConfigError(
                f"{workdir} holds runs trained with another config ({shown}): rerun with the "
                f"recorded values ({path}) to resume or score them, or use a new --workdir to "
                "train with these"
            )
        logging.warning("%s: nothing was trained with the recorded config; recording this one",
                        workdir)
    if record and jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        reports.write_atomically(path, json.dumps(fields, indent=1))


# --- One run at a time ----------------------------------------------------------------------


def _holder(path: str) -> str:
    """What the run holding the lock at ``path`` wrote about itself (empty if nothing yet)."""
    for _ in range(20):  # the holder writes it just after taking the lock
        with contextlib.suppress(OSError, ValueError):
            with open(path, encoding="utf-8") as file:
                info = json.load(file)
            return (f"process {info['pid']} on {info['host']}, started "
                    f"{info['started']}: {info['command']}")  # fmt: skip
        time.sleep(0.05)
    return "another process"


def _unwritable(workdir: str, error: OSError) -> WorkdirError:
    why = os.strerror(error.errno) if error.errno else str(error)
    return WorkdirError(f"cannot write in workdir {workdir} ({why}): use a --workdir you can "
                        "write, with free space")  # fmt: skip


@contextlib.contextmanager
def locked(workdir: str) -> Iterator[None]:
    """Holds ``workdir``'s lock (making the folder) while the block runs; a ``WorkdirError``
    line if another live run holds it, or the workdir cannot be written. A folder it made that
    holds nothing else at the end is removed again. Multi-host: only process 0 locks (the others
    share its workdir)."""
    if jax.process_index() != 0:
        yield
        return
    path = os.path.join(workdir, LOCK_FILE)
    made = not os.path.lexists(workdir)
    try:
        os.makedirs(workdir, exist_ok=True)
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except FileExistsError:
        raise WorkdirError(f"--workdir {workdir} is a file, not a folder: give a new or existing "
                           "folder") from None  # fmt: skip
    except OSError as error:
        raise _unwritable(workdir, error) from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)  # the holder's file as it was
        raise WorkdirError(
            f"workdir {workdir} is in use by another run ({_holder(path)}): wait for it to "
            "finish, or use another --workdir"
        ) from None
    try:
        info = dict(pid=os.getpid(), host=socket.gethostname(),
                    started=time.strftime("%Y-%m-%d %H:%M:%S"),
                    command=" ".join(sys.argv)[:300])  # fmt: skip
        os.ftruncate(descriptor, 0)
        try:
            os.pwrite(descriptor, json.dumps(info).encode(), 0)
        except OSError as error:  # a full disk: the lock holds, the next write names it
            if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
        yield
    finally:
        with contextlib.suppress(OSError):
            os.ftruncate(descriptor, 0)
            if made and os.listdir(workdir) == [LOCK_FILE]:  # a run that failed at once
                os.remove(path)
                os.rmdir(workdir)
        os.close(descriptor)  # releases the lock
