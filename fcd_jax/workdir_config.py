"""The training config a workdir was made with, so that a rerun never mixes two experiments.

A rerun of the same command resumes from its checkpoints and skips finished runs. With a changed
config that would silently continue (or keep) the old training: instead the config fields that
change what is trained are written to ``<workdir>/training_config.json`` on the first run and
compared on every later one.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections

from fcd_jax import reports
from fcd_jax.errors import ConfigError

FILE_NAME = "training_config.json"

# Fields that change nothing that is trained: run selection, file locations, speed and memory
# settings (same numbers), logging, and what happens after training (scoring, predict).
NOT_TRAINING = (
    "splits", "data.data_dir", "data.download", "data.eval_batch_size", "model.scan_layers",
    "model.remat", "model.attention_implementation", "teacher.cache_dir", "method.top_k",
    "method.image_score", "method.map_sigma", "train.log_every", "train.checkpoint_every",
    "train.teacher_cache", "eval", "predict", "mesh_shape", "parallel_splits", "per_dataset",
)


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
    return {
        name: value for name, value in sorted(fields.items())
        if not any(name == skip or name.startswith(skip + ".") for skip in NOT_TRAINING)
    }


def check_workdir_config(
    config: ml_collections.ConfigDict, workdir: str, record: bool = True
) -> None:
    """One ``ConfigError`` line if ``workdir`` was trained with another training config (nothing
    in it is touched); else, with ``record``, writes the config there if it is not yet."""
    path = os.path.join(workdir, FILE_NAME)
    fields = training_fields(config)
    if os.path.exists(path):
        with open(path) as file:
            recorded = json.load(file)
        changed = [
            f"{name} {recorded.get(name, '(unset)')!r} -> {fields.get(name, '(unset)')!r}"
            for name in sorted(set(recorded) | set(fields))
            if recorded.get(name) != fields.get(name)
        ]
        if changed:
            shown = "; ".join(changed[:4]) + (f"; {len(changed) - 4} more" if changed[4:] else "")
            raise ConfigError(
                f"{workdir} holds runs trained with another config ({shown}): use a new "
                f"--workdir, or delete {workdir} to train afresh"
            )
        return
    if record and jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        reports.write_atomically(path, json.dumps(fields, indent=1))
