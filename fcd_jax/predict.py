"""Predict: score new images with a trained run, say yes/no at its threshold, draw heat maps.

Needs only the scoring side (``fcd_jax.evaluate.SavedRuns``), not the trainer.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import ml_collections
from absl import logging

from fcd_jax import reports
from fcd_jax.datasets.folders import IMAGE_SUFFIXES, list_image_files, load_images
from fcd_jax.datasets.split import ArraySource
from fcd_jax.errors import DataError, FcdError, WorkdirError
from fcd_jax.evaluate import SavedRuns
from fcd_jax.input_pipeline import named_splits
from fcd_jax.workdir import finished_runs, read_finished
from fcd_jax.writable import unwritable_reason


def expand_inputs(inputs: str) -> list[Path]:
    """A file, a directory (its images) or a glob pattern -> image files, sorted."""
    if not inputs:
        raise FcdError("nothing to predict: set --config.predict.inputs=PATH, DIRECTORY or GLOB")
    path = Path(inputs)
    if path.is_dir():
        files = list_image_files(path)
    elif path.is_file():
        files = [path]
    else:
        files = sorted(
            Path(match) for match in glob.glob(inputs, recursive=True)
            if Path(match).suffix.lower() in IMAGE_SUFFIXES
        )
    if not files:
        raise DataError(f"no images found at {inputs!r}: give an image, a folder or a glob")
    return files


def check_output_dir(output_dir: str, files: list[Path]) -> None:
    """One ``FcdError`` line, before any image is scored, if predict's outputs in ``output_dir``
    would write over an input image or the folder cannot be written."""
    folder = Path(output_dir).resolve()
    inputs = {path.resolve() for path in files}
    outputs = [folder / name for name in (*reports.heatmap_names(files), reports.PREDICTIONS_CSV)]
    clash = next((path for path in outputs if path in inputs), None)
    if clash is not None:
        raise FcdError(
            f"predict would write {clash} over an input image: set --config.predict.output_dir "
            "to a folder outside the inputs' one"
        )
    problem = unwritable_reason(folder)
    if problem:
        raise WorkdirError(f"predict output folder {output_dir}: {problem}; set "
                           "--config.predict.output_dir to a folder you can write")  # fmt: skip


def trained_run(config: ml_collections.ConfigDict, workdir: str) -> str:
    """The one run to predict with: ``config.splits`` names it, or the workdir holds only one.
    The runs are the workdir's (``finished_runs``): the training data need not be there."""
    trained = finished_runs(workdir)
    wanted = named_splits(config)
    if wanted is not None:
        missing = [name for name in wanted if name not in trained]
        if missing:
            raise FcdError(
                f"run {missing[0]} is not trained in {workdir} (trained: "
                f"{', '.join(trained) or 'none'}): pick one with --config.splits=NAME, or train "
                "it first (--mode=train_and_eval)"
            )
        trained = wanted
    if len(trained) == 1:
        return trained[0]
    if not trained:
        raise FcdError(f"no trained run in {workdir}: train first (--mode=train_and_eval)")
    raise FcdError(
        f"{workdir} holds {len(trained)} trained runs ({', '.join(trained)}): "
        "pick one with --config.splits=NAME"
    )


def predict(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Writes predictions.csv and one heat-map PNG per input image; returns the CSV's path."""
    saved = SavedRuns.open(config, workdir)  # the config checked first, before any image is read
    name = trained_run(config, workdir)
    threshold = read_finished(workdir, name)["threshold"]
    files = expand_inputs(config.predict.inputs)
    output_dir = config.predict.output_dir or os.path.join(workdir, "predict")
    check_output_dir(output_dir, files)
    images, kept, skipped = load_images(
        files, saved.config.data.image_size, saved.config.data.skip_bad_images
    )
    if skipped:
        logging.warning("skipped %d unreadable image(s): %s", len(skipped), ", ".join(skipped))
    scored = saved.score(name, ArraySource(images))
    csv_path = reports.write_predictions(
        output_dir, [str(files[i]) for i in kept], scored.scores, threshold, scored.maps, images
    )
    verdicts = scored.scores >= threshold
    logging.info("run %s: %d of %d images anomalous at threshold %.4f; wrote %s", name,
                 int(verdicts.sum()), len(verdicts), threshold, csv_path)
    print(json.dumps({"run": name, "csv": str(csv_path), "anomalous": int(verdicts.sum()),
                      "images": len(verdicts), "skipped": len(skipped),
                      "random_teacher": saved.teacher_is_random}))
    return str(csv_path)
