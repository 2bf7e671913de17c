"""Orbax checkpoints: resumable training states, the final student + anchor of each run, and
``load_vit`` for pretrained ViTs (converted by ``fcd_jax.convert``)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from fcd_jax import convert
from fcd_jax.errors import CheckpointError


def training_manager(directory: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
    """One manager per scheduled run of splits (``GroupTrainer``); saves are asynchronous. Close
    it (``GroupTrainer`` does) when the run is done."""
    return ocp.CheckpointManager(
        os.path.abspath(directory), options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep)
    )


def abstract_like(tree: Any) -> Any:
    """Shapes, dtypes and shardings of ``tree``: the target orbax restores into."""
    return jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding), tree
    )


def restore_latest(
    manager: ocp.CheckpointManager, target: Any | Callable[[int], Any]
) -> tuple[Any, int | None]:
    """(restored tree, step) from the newest checkpoint that restores, or (target, None) when
    there is none. ``target``: a tree (or ``ShapeDtypeStruct`` s with shardings) of what was
    saved, or ``target(step)`` where that depends on the step (a scheduled run's stack size).
    A newer one that does not restore (corrupt, e.g. a disk that filled up) is passed over with a
    warning naming it; ``CheckpointError`` if none restores."""
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        return None if callable(target) else target, None
    failures = []
    for step in steps:
        abstract = abstract_like(target(step) if callable(target) else target)
        try:
            restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except (ValueError, KeyError, TypeError, OSError) as error:
            failures.append((step, str(error).splitlines()[0][:200] if str(error) else repr(error)))
            continue
        if failures:
            logging.warning(
                "checkpoint(s) %s of %s do not restore (%s): resuming from step %d",
                ", ".join(str(failed) for failed, _ in failures), manager.directory,
                failures[0][1], step,
            )
        return restored, step
    step, reason = failures[0]
    raise CheckpointError(
        f"checkpoint {manager.directory}/{step} does not fit this config or is damaged "
        f"({reason}), and no older one restores: use another --workdir or delete that directory"
    )


def save_tree(directory: str, tree: Any) -> None:
    """Writes a pytree (e.g. ``{"params": ..., "anchor": ...}``) and waits until it is on disk."""
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.abspath(directory), tree, force=True)
        checkpointer.wait_until_finished()


def load_tree(directory: str) -> Any:
    """Reads a pytree written by ``save_tree`` (onto the host/default device)."""
    path = os.path.abspath(directory)
    if not os.path.isdir(path):
        raise CheckpointError(f"no checkpoint at {path}: train first (--mode=train_and_eval)")
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(path)
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(
            f"checkpoint {path} does not fit this config ({str(error).splitlines()[0][:200]})"
        ) from None


def load_vit(
    path: str, *, image_size: int | None = None
) -> tuple[ml_collections.ConfigDict, dict]:
    """Any checkpoint ``fcd_jax.convert`` reads, or a converted directory, as
    ``(model_config, params)``: ``build_vit(model_config)`` is the matching model, and the config
    also records the image normalisation the weights expect (``image_mean``, ``image_std``)."""
    if convert.is_converted(path):
        params, arch = convert.load_converted(path)
    else:
        params, arch = convert.convert_checkpoint(path, image_size=image_size)
    model_config = ml_collections.ConfigDict(
        {field: arch[field] for field in convert.ARCH_FIELDS if field in arch}
    )
    model_config.variant = ""
    for field in ("image_mean", "image_std"):
        model_config[field] = arch.get(field)
    return model_config, params
