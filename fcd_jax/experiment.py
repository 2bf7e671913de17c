"""The experiment: every selected split of a dataset, trained on the slots of one scheduled
stacked program (``fcd_jax.schedule``, ``fcd_jax.group_trainer``), checkpointed, scored, reported
(``--mode=train_and_eval``), and the saved runs scored again (``--mode=eval``).

Before anything is built or recorded, the teacher is loaded and the config reconciled with its
spec (``fcd_jax.teacher``); that config is checked against the workdir's and recorded there
(``fcd_jax.workdir``). Finished runs are skipped; an interrupted run resumes from its last
orbax checkpoint and ends with the same numbers as an uninterrupted run.
"""

from __future__ import annotations

import os

import jax
import ml_collections
from absl import logging

from fcd_jax import workdir
from fcd_jax.datasets.split import Split
from fcd_jax.errors import FcdError
from fcd_jax.evaluate import SavedRuns, evaluate_splits
from fcd_jax.group_trainer import GroupTrainer
from fcd_jax.input_pipeline import load_split, select_splits
from fcd_jax.metrics import auroc_text
from fcd_jax.networks import build_networks
from fcd_jax.sizing import group_size_for
from fcd_jax.teacher import load_teacher


def train_and_evaluate(config: ml_collections.ConfigDict, directory: str) -> dict:
    """Trains and scores every selected split, then writes results.json, results.md and plots.

    Returns ``{"runs": [each run's results.json entry], "teacher_is_random": ...}``.
    """
    names = select_splits(config)
    teacher = load_teacher(config, directory)
    config = teacher.config
    networks = build_networks(config)  # checks the block plan before anything is written
    workdir.check_training_config(config, directory, record=True)
    teacher_params = networks.teacher_params(teacher.params)

    summaries = {name: workdir.read_finished(directory, name) for name in names}
    for name, summary in summaries.items():
        if summary is not None:
            logging.info("run %s already finished (image AUROC %s): skipped", name,
                         auroc_text(summary["image_auroc"]))
    # The schedule is fixed by the selection, not by what is left: a run interrupted between
    # its splits' evaluations recomputes the same plan and restores its final checkpoint, so
    # every split trains in the same slots and stacks whatever was already finished.
    todo = [name for name in names if summaries[name] is None]
    if todo:
        splits = [load_split(config.data, name) for name in names]
        with GroupTrainer(
            config, directory, splits, list(range(len(names))), teacher_params, networks,
            group_size_for(config, len(names)), save_models=todo,
        ) as trainer:
            trainer.train()
            parts = evaluation_parts(directory, splits, todo, trainer.num_stacked)
            models = {split.name: trainer.model(split.name) for part in parts for split in part}
        for part in parts:
            run_dirs = [workdir.run_dir(directory, split.name) if split.name in todo else None
                        for split in part]
            for summary in evaluate_splits(
                config, part, [models[split.name] for split in part], trainer.teacher_params,
                networks, trainer.mesh, run_dirs,
            ):
                summaries[summary["name"]] = finish_run(config, directory, summary)
    runs = [summaries[name] for name in names]
    if jax.process_index() == 0:
        workdir.write_reports(config, directory, runs, teacher.is_random)
    return {"runs": runs, "teacher_is_random": teacher.is_random}


def evaluation_parts(
    directory: str, splits: list[Split], todo: list[str], size: int
) -> list[list[Split]]:
    """The groups of splits scored together (``size`` students at once, as many as trained at
    once) that hold a run still to finish. Like the schedule, they are fixed by the selection,
    not by what is left: a run killed between two evaluations scores the group again with the
    same students in the same slots, the same program and so the same numbers to the bit (a
    narrower program may round differently in the last bit), and writes only the unfinished
    runs. A finished split whose trained model is gone is left out."""
    parts = []
    for start in range(0, len(splits), size):
        part = splits[start: start + size]
        if any(split.name in todo for split in part):
            parts.append([split for split in part if split.name in todo
                          or os.path.isdir(workdir.model_dir(directory, split.name))])
    return parts


def finish_run(config: ml_collections.ConfigDict, directory: str, summary: dict) -> dict:
    """Writes a scored run's ``result.json`` (process 0) and logs its numbers."""
    if jax.process_index() == 0:
        workdir.write_finished(directory, summary)
    logging.info(
        "run %s: image AUROC %s, F1 %.3f at threshold %.4f%s", summary["name"],
        auroc_text(summary["image_auroc"]), summary["f1"], summary["threshold"],
        "" if summary["pixel_auroc"] is None
        else f", pixel AUROC {summary['pixel_auroc']:.4f}, PRO {summary['pro']:.4f}",
    )
    return summary


def evaluate_saved(config: ml_collections.ConfigDict, directory: str) -> dict:
    """``--mode=eval``: scores every trained run of ``directory`` again and rewrites the
    reports."""
    names = [name for name in select_splits(config)
             if workdir.read_finished(directory, name) is not None]
    if not names:
        raise FcdError(f"no trained run in {directory}: train first (--mode=train_and_eval)")
    saved = SavedRuns.open(config, directory)
    group_size = group_size_for(saved.config, len(names))
    runs = []
    for start in range(0, len(names), group_size):
        group = names[start: start + group_size]
        runs += [
            finish_run(saved.config, directory, summary)
            for summary in evaluate_splits(
                saved.config, [load_split(saved.config.data, name) for name in group],
                [saved.load_model(name) for name in group], saved.teacher_params,
                saved.networks, saved.mesh, [workdir.run_dir(directory, name) for name in group],
            )
        ]
    if jax.process_index() == 0:
        workdir.write_reports(saved.config, directory, runs, saved.teacher_is_random)
    return {"runs": runs, "teacher_is_random": saved.teacher_is_random}
