"""A trained run as a detector: ``Detector.load(workdir, run=None)`` -> ``predict(images)`` ->
scores, maps and verdicts (METHOD.md "Anomaly score", eqs. 7-10), and ``export`` to ONNX or a
serialized JAX program (``fcd_jax.export``).

Everything comes from the workdir: the config the runs were evaluated with (``results.json``,
checked against the recorded training config, ``training_config.json``), the teacher (its
checkpoint or its random seed, as scoring a workdir loads it), each run's student, anchor and
threshold (``runs/<name>/``). No training data is read.

Images of any size are read as training and ``--mode=predict`` read them
(``fcd_jax.datasets.image_files``: EXIF orientation applied, gray replicated, alpha dropped, PIL
bilinear resize to ``S x S``); maps come back at each input's upright size. Callers of an exported
artifact use the same three functions: :func:`read_for_model` (files), :func:`resize_for_model`
(arrays) and :func:`map_at_size`; the exported graph takes uint8 ``[B, S, S, 3]``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from fcd_jax import reports
from fcd_jax.datasets.image_files import load_image, load_images, resize_to_square, upright_size
from fcd_jax.datasets.split import ArraySource
from fcd_jax.errors import DataError, FcdError
from fcd_jax.evaluate import SavedRuns, score_source
from fcd_jax.workdir import RESULT_JSON, read_finished


def resize_for_model(image: np.ndarray, image_size: int) -> np.ndarray:
    """uint8 ``[h, w]``, ``[h, w, 1]``, ``[h, w, 3]`` or ``[h, w, 4]`` -> RGB uint8
    ``[image_size, image_size, 3]``: gray replicated, alpha dropped, PIL bilinear resize (as
    training and ``--mode=predict`` read files)."""
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    elif image.shape[-1] == 4:
        image = image[..., :3]
    return resize_to_square(np.ascontiguousarray(image), image_size, Image.BILINEAR)


def read_for_model(path: str | os.PathLike, image_size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """An image file -> (uint8 ``[image_size, image_size, 3]`` as training read it, the file's
    upright ``(height, width)``: the size :func:`map_at_size` gives its map back at)."""
    image = load_image(path, image_size)  # one DataError line for an unreadable file
    width, height = upright_size(Path(path))
    return image, (height, width)


def map_at_size(anomaly_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A float32 ``[S, S]`` map -> float32 ``[height, width]`` (PIL bilinear, as predict's)."""
    height, width = size
    resized = Image.fromarray(np.asarray(anomaly_map, np.float32)).resize((width, height),
                                                                          Image.BILINEAR)
    return np.asarray(resized, np.float32)


def _check_arrays(images: np.ndarray) -> None:
    if images.dtype != np.uint8:
        raise DataError(f"images must be uint8, got {images.dtype}: convert with .astype(np.uint8)")
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3, 4)):
        raise DataError(
            f"images of shape {images.shape}: give uint8 [N, H, W, 3] (or gray [N, H, W] / "
            "[N, H, W, 1], RGBA [N, H, W, 4])"
        )


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except (OSError, ValueError) as error:
        raise FcdError(f"cannot read {path} ({type(error).__name__}): it is written by "
                       "training; rerun --mode=eval on the workdir to write it again") from None


def recorded_config(directory: str) -> ml_collections.ConfigDict:
    """The config the workdir's runs were scored with (``results.json``'s, the teacher's spec
    filled in); lists as tuples."""
    path = os.path.join(directory, reports.RESULTS_JSON)
    if not os.path.isfile(path):
        raise FcdError(f"{directory} has no {reports.RESULTS_JSON}: give the workdir of a "
                       "finished --mode=train_and_eval (or pass config=the training config)")
    recorded = _read_json(path).get("config")
    if not isinstance(recorded, dict):
        raise FcdError(f"{path} records no config: rerun --mode=eval on the workdir")

    def tuples(value):
        if isinstance(value, dict):
            return {key: tuples(item) for key, item in value.items()}
        return tuple(tuples(item) for item in value) if isinstance(value, list) else value

    return ml_collections.ConfigDict(tuples(recorded))


def trained_runs(directory: str) -> list[str]:
    """The names of the workdir's finished runs (``runs/<name>/result.json``), sorted."""
    runs = os.path.join(directory, "runs")
    names = []
    for entry in sorted(os.listdir(runs)) if os.path.isdir(runs) else []:
        path = os.path.join(runs, entry, RESULT_JSON)
        if os.path.isfile(path) and os.path.isdir(os.path.join(runs, entry, "model")):
            names.append(str(_read_json(path)["name"]))
    return sorted(names)


def choose_run(directory: str, run: str | None) -> str:
    """``run``, or the workdir's only trained run; one ``FcdError`` line otherwise."""
    names = trained_runs(directory)
    if not names:
        raise FcdError(f"no trained run in {directory}: train first (--mode=train_and_eval)")
    if run is None and len(names) == 1:
        return names[0]
    if run is None:
        raise FcdError(f"{directory} holds {len(names)} trained runs ({', '.join(names)}): "
                       "pick one with run=NAME (--run=NAME)")
    if run not in names:
        raise FcdError(f"{directory} has no trained run {run!r}: use one of {', '.join(names)}")
    return run


@dataclasses.dataclass
class Predictions:
    """``scores`` float32 [N], ``maps`` a float32 [H_i, W_i] per input, ``verdicts`` bool [N]."""

    scores: np.ndarray
    maps: list[np.ndarray]
    verdicts: np.ndarray


@dataclasses.dataclass
class Detector:
    """One trained run of a workdir, ready to score images."""

    saved: SavedRuns
    run: str
    threshold: float
    model: dict

    @classmethod
    def load(cls, workdir: str, run: str | None = None,
             config: ml_collections.ConfigDict | None = None) -> Detector:
        """The run ``run`` (or the workdir's only trained one), everything read from ``workdir``.

        ``config`` (optional) replaces the recorded scoring config, as ``--mode=predict``'s
        ``--config`` does; its training fields must be the workdir's. Its ``splits`` names the run
        when ``run`` is not given."""
        if not os.path.isdir(workdir):
            raise FcdError(f"no workdir at {workdir}: give the --workdir a run was trained in")
        if config is None:
            config = recorded_config(workdir)
        elif run is None and config.splits not in ("", "all"):
            run = config.splits
        name = choose_run(workdir, run)
        config = ml_collections.ConfigDict(config)
        config.splits = name
        saved = SavedRuns.open(config, workdir)
        threshold = float(read_finished(workdir, name)["threshold"])
        return cls(saved, name, threshold, saved.load_model(name))

    @property
    def image_size(self) -> int:
        return int(self.saved.config.data.image_size)

    def predict(self, images: Sequence[str | os.PathLike] | np.ndarray) -> Predictions:
        """Image paths or uint8 ``[N, H, W, 3]`` (gray, RGBA too) -> :class:`Predictions`, each
        map at its input's (upright) size."""
        if isinstance(images, np.ndarray):
            _check_arrays(images)
        if len(images) == 0:
            raise DataError("nothing to predict: give at least one image")
        if isinstance(images, np.ndarray):
            batch = np.stack([resize_for_model(image, self.image_size) for image in images])
            sizes = [image.shape[:2] for image in images]
        else:
            paths = [Path(path) for path in images]
            batch, _, _ = load_images(paths, self.image_size)  # one line for an unreadable file
            sizes = [upright_size(path)[::-1] for path in paths]
        scores, maps = self.score(batch)
        return Predictions(scores, [map_at_size(m, size) for m, size in zip(maps, sizes,
                                                                             strict=True)],
                           scores >= self.threshold)

    def score(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 ``[N, S, S, 3]`` -> (scores float32 [N], maps float32 [N, S, S]), in batches of
        the next power of two up to ``data.eval_batch_size`` (few compiled sizes, little
        padding)."""
        batch = min(1 << (len(images) - 1).bit_length(), self.saved.config.data.eval_batch_size)
        scored = score_source(
            self.saved.score_step, self.saved.teacher_params, self.model["params"],
            self.model["anchor"], ArraySource(images), self.saved.mesh, batch, None,
        )
        return scored.scores, scored.maps

    def program(self) -> Callable[[jax.Array], tuple[jax.Array, jax.Array, jax.Array]]:
        """Pure ``uint8 [B, S, S, 3] -> (score [B], map [B, S, S], anomalous [B])``: the whole
        scoring path, weights and threshold as constants (what ``fcd_jax.export`` serializes)."""
        teacher = jax.device_get(self.saved.teacher_params)
        student, anchor = jax.device_get(self.model["params"]), jax.device_get(self.model["anchor"])
        step, threshold = self.saved.score_step, jnp.float32(self.threshold)

        def run(images):
            out = step(teacher, student, anchor, images[None])
            return out["score"], out["map"], out["score"] >= threshold

        return run

    def export(self, path: str, format: str = "onnx") -> str:
        """Writes the artifact (``fcd_jax.export.export_detector``); returns ``path``."""
        from fcd_jax.export import export_detector

        return export_detector(self, path, format)

