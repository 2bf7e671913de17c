"""Entry point: ``python -m fcd_jax.main --config configs/demo.py [--workdir DIR] [--mode ...]``.

All logic lives in importable modules; this file parses flags, starts JAX's multi-host runtime
when asked, logs the processes and devices, and turns user errors (bad flags, unknown or invalid
config fields, ``FcdError``) into one line ``fcd_jax: error: ...`` and exit status 2.

Libraries' INFO logs (orbax's per-checkpoint lines, JAX's) and the stack traces of their
warnings and errors are hidden unless ``--verbosity`` (``-v``) is given; fcd_jax's own INFO lines
and every warning's and error's message always show. A write that fails on a full disk or a
read-only folder (an ``OSError``, or orbax's ``ValueError`` carrying the errno) is one line too.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from fcd_jax import compilation_cache, config_checks, experiment, predict
from fcd_jax.errors import FcdError
from fcd_jax.log_filter import quiet_library_logs
from fcd_jax.workdir import locked, with_recorded_teacher

MODES = ("train_and_eval", "eval", "predict")

config_flags.DEFINE_config_file(
    "config", None, "A configs/*.py file, optionally with ':arg' (e.g. ':runlocal').",
    lock_config=True,
)
flags.DEFINE_string("workdir", None, "Where checkpoints and reports go (default runs/<dataset>).")
flags.DEFINE_enum("mode", "train_and_eval", MODES, "What to do with the workdir.")
flags.DEFINE_bool(
    "distributed", os.environ.get("FCD_DISTRIBUTED", "") == "1",
    "Call jax.distributed.initialize() (multi-host). Also set by FCD_DISTRIBUTED=1.",
)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (default: autodetect).")
flags.DEFINE_integer("num_processes", None, "Number of processes (default: autodetect).")
flags.DEFINE_integer("process_id", None, "This process's index (default: autodetect).")
compilation_cache.define_flag()
FLAGS = flags.FLAGS


def dataset_configs(config) -> dict:
    """``{dataset: its config}`` for every dataset named in ``config.data.name``
    (comma-separated), each with its ``config.per_dataset.<name>`` overrides applied."""
    datasets = [name.strip() for name in str(config.data.name).split(",") if name.strip()]
    configs = {}
    for dataset in datasets or [config.data.name]:  # none: check_config names the problem
        dataset_config = config.copy_and_resolve_references()
        with dataset_config.unlocked():
            dataset_config.data.name = dataset
            overrides = dataset_config.get("per_dataset", {}).get(dataset)
            if overrides:
                dataset_config.update(overrides)
        configs[dataset] = dataset_config
    return configs


def run(config, workdir: str, mode: str) -> None:
    """Runs ``mode`` for every dataset of ``config`` (``dataset_configs``). Every dataset's config
    is checked (``config_checks.check_config``), and for training its data's shape
    (``check_data_shape``: file listings only), before the first one trains; training and eval
    hold the workdir's lock (``fcd_jax.workdir.locked``: one run at a time). Each mode then
    checks the config, reconciled with its teacher, against the workdir's recorded one
    (``fcd_jax.workdir``) before it trains or scores."""
    configs = dataset_configs(config)
    for dataset_config in configs.values():
        config_checks.check_config(dataset_config)
    if mode == "train_and_eval":
        for dataset_config in configs.values():
            config_checks.check_data_shape(dataset_config)
    # predict writes only its output folder; eval of a workdir that does not exist fails alone
    one_at_a_time = mode == "train_and_eval" or (mode == "eval" and os.path.isdir(workdir))
    with locked(workdir) if one_at_a_time else contextlib.nullcontext():
        for dataset, dataset_config in configs.items():
            dataset_workdir = workdir if len(configs) == 1 else os.path.join(workdir, dataset)
            logging.info("dataset %s -> %s (%s)", dataset, dataset_workdir, mode)
            if mode == "train_and_eval":
                experiment.train_and_evaluate(dataset_config, dataset_workdir)
                continue
            dataset_config = with_recorded_teacher(dataset_config, dataset_workdir)
            if mode == "eval":
                experiment.evaluate_saved(dataset_config, dataset_workdir)
            else:
                predict.predict(dataset_config, dataset_workdir)


# A disk that is full or cannot be written: what the user must fix, wherever the write was.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


# tensorstore (orbax's writer) reports a failed write as a ValueError carrying the errno.
_TENSORSTORE_ERRNO = re.compile(r"os_error_code='(\d+)'")
_TENSORSTORE_FILE = re.compile(r'local file "([^"]+)"')


def as_disk_error(error: BaseException) -> OSError | None:
    """``error`` (or what caused it) as the ``OSError`` of a write that a full disk, a read-only
    folder or a missing permission failed; None if it is none of these."""
    for cause in (error, error.__cause__, error.__context__):
        if isinstance(cause, OSError) and cause.errno in DISK_ERRNOS:
            return cause
        code = _TENSORSTORE_ERRNO.search(str(cause or ""))
        if code and int(code[1]) in DISK_ERRNOS:
            file = _TENSORSTORE_FILE.search(str(cause))
            return OSError(int(code[1]), os.strerror(int(code[1])), file[1] if file else None)
    return None


def disk_error_message(error: OSError) -> str:
    """``error`` of a write (full disk, read-only or forbidden folder) as the one line to fix."""
    where = f" writing {error.filename}" if error.filename else ""
    fix = ("free some space" if error.errno in (errno.ENOSPC, errno.EDQUOT)
           else "make it writable")  # fmt: skip
    return (f"{os.strerror(error.errno)}{where}: {fix}, or give another --workdir (what was "
            "already written is kept; rerun the same command to resume)")


def fail(message: str) -> None:
    """The one line of a user error, and exit status 2."""
    print(f"fcd_jax: error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
    """``app.run``'s flag parser: a mistyped ``--config.X`` override, a bad flag value or an
    unknown flag is one ``fail`` line, not a traceback or absl's usage text."""
    try:
        remaining = FLAGS(argv)
        if FLAGS.config is not None:
            FLAGS.config.get("data")  # ml_collections reports a missing file only when read
        return remaining
    except (KeyError, AttributeError) as error:  # ml_collections: no such config field
        fail(config_checks.mistyped_field_message(argv) or f"bad --config override: {error}")
    except flags.Error as error:  # absl's text may run over lines: one line
        fail(" ".join(str(error).split()))
    except Exception as error:  # the --config file itself: missing, a syntax error, a bad value
        first_line = (str(error).splitlines() or [""])[0]
        fail(f"cannot read the flags ({type(error).__name__}: {first_line}): check --config and "
             "its --config.X overrides")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    quiet_library_logs()
    jax.config.update("jax_threefry_partitionable", True)
    compilation_cache.enable(FLAGS.compilation_cache)
    if FLAGS.distributed:
        jax.distributed.initialize(
            coordinator_address=FLAGS.coordinator_address,
            num_processes=FLAGS.num_processes,
            process_id=FLAGS.process_id,
        )
    logging.info("JAX process %d of %d; local devices: %s; all devices: %d",
                 jax.process_index(), jax.process_count(), jax.local_devices(), jax.device_count())
    config = FLAGS.config
    workdir = FLAGS.workdir or os.path.join("runs", str(config.data.name).replace(",", "+"))
    try:
        run(config, workdir, FLAGS.mode)
    except FcdError as error:
        fail(str(error))
    except (OSError, ValueError, RuntimeError) as error:
        disk = as_disk_error(error)
        if disk is None:
            raise
        fail(disk_error_message(disk))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=parse_flags)
