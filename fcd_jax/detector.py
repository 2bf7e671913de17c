"""A trained run as a detector: ``Detector.load(workdir, config)`` -> ``predict(images)`` ->
scores, maps and verdicts (METHOD.md "Anomaly score", eqs. 7-10), and ``export`` to ONNX or a
serialized JAX program (``fcd_jax.export``).

Images of any size are resized on the host by :func:`fcd_jax.datasets.image_files.load_image`'s
PIL bilinear resize (:func:`resize_for_model`), the one resize that ``--mode=predict`` and callers
of an exported artifact use; the exported graph takes uint8 ``[B, S, S, 3]``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from fcd_jax.datasets.image_files import _resized, load_images
from fcd_jax.datasets.split import ArraySource
from fcd_jax.errors import DataError, FcdError
from fcd_jax.evaluate import SavedRuns
from fcd_jax.predict import trained_run
from fcd_jax.workdir import read_finished


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
    return _resized(np.ascontiguousarray(image), image_size, Image.BILINEAR)


def _check_arrays(images: np.ndarray) -> None:
    if images.dtype != np.uint8:
        raise DataError(f"images must be uint8, got {images.dtype}: convert with .astype(np.uint8)")
    if images.ndim == 3:
        return
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise DataError(
            f"images of shape {images.shape}: give uint8 [N, H, W, 3] (or gray [N, H, W] / "
            "[N, H, W, 1], RGBA [N, H, W, 4])"
        )


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
    def load(cls, workdir: str, config: ml_collections.ConfigDict,
             run: str | None = None) -> Detector:
        """The run ``run`` (or the workdir's only trained one) with the training ``config``
        (the one ``--mode=predict`` takes; checked against the workdir's)."""
        if not os.path.isdir(workdir):
            raise FcdError(f"no workdir at {workdir}: give the --workdir a run was trained in")
        config = ml_collections.ConfigDict(config)
        if run is not None:
            config.splits = run
        saved = SavedRuns.open(config, workdir)
        name = trained_run(config, workdir)
        threshold = float(read_finished(workdir, name)["threshold"])
        return cls(saved, name, threshold, saved.load_model(name))

    @property
    def image_size(self) -> int:
        return int(self.saved.config.data.image_size)

    def predict(self, images: Sequence[str | os.PathLike] | np.ndarray) -> Predictions:
        """Image paths or uint8 ``[N, H, W, 3]`` (gray, RGBA too) -> :class:`Predictions`."""
        if isinstance(images, np.ndarray):
            _check_arrays(images)
            originals = list(images)
        else:
            originals = None
        if len(images) == 0:
            raise DataError("nothing to predict: give at least one image")
        if originals is None:
            resized, _, _ = load_images([os.fspath(p) for p in images], self.image_size)
            sizes = [Image.open(p).size[::-1] for p in images]
        else:
            resized = np.stack([resize_for_model(image, self.image_size) for image in originals])
            sizes = [image.shape[:2] for image in originals]
        scored = self.saved.score(self.run, ArraySource(resized))
        maps = [
            np.asarray(Image.fromarray(m).resize((w, h), Image.BILINEAR), np.float32)
            for m, (h, w) in zip(scored.maps, sizes, strict=True)
        ]
        return Predictions(scored.scores, maps, scored.scores >= self.threshold)

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
