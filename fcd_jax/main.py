"""Entry point: ``python -m fcd_jax.main --config configs/demo.py [--workdir DIR] [--mode ...]``.

All logic lives in importable modules; this file parses flags, starts JAX's multi-host runtime
when asked, logs the processes and devices, and turns user errors into one line.
"""

from __future__ import annotations

import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from fcd_jax import experiment, predict
from fcd_jax.errors import FcdError

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
FLAGS = flags.FLAGS


def run(config, workdir: str, mode: str) -> None:
    """Runs ``mode`` for every dataset named in ``config.data.name`` (comma-separated), each with
    its ``config.per_dataset.<name>`` overrides if the config has them. Each mode checks the
    config, reconciled with its teacher, against the workdir's recorded one (``fcd_jax.workdir``)
    before it trains or scores."""
    datasets = [name.strip() for name in config.data.name.split(",") if name.strip()]
    for dataset in datasets:
        dataset_config = config.copy_and_resolve_references()
        with dataset_config.unlocked():
            dataset_config.data.name = dataset
            overrides = dataset_config.get("per_dataset", {}).get(dataset)
            if overrides:
                dataset_config.update(overrides)
        dataset_workdir = workdir if len(datasets) == 1 else os.path.join(workdir, dataset)
        logging.info("dataset %s -> %s (%s)", dataset, dataset_workdir, mode)
        if mode == "train_and_eval":
            experiment.train_and_evaluate(dataset_config, dataset_workdir)
        elif mode == "eval":
            experiment.evaluate_saved(dataset_config, dataset_workdir)
        else:
            predict.predict(dataset_config, dataset_workdir)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    jax.config.update("jax_threefry_partitionable", True)
    if FLAGS.distributed:
        jax.distributed.initialize(
            coordinator_address=FLAGS.coordinator_address,
            num_processes=FLAGS.num_processes,
            process_id=FLAGS.process_id,
        )
    logging.info("JAX process %d of %d; local devices: %s; all devices: %d",
                 jax.process_index(), jax.process_count(), jax.local_devices(), jax.device_count())
    config = FLAGS.config
    workdir = FLAGS.workdir or os.path.join("runs", config.data.name.replace(",", "+"))
    try:
        run(config, workdir, FLAGS.mode)
    except FcdError as error:
        print(f"fcd_jax: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
