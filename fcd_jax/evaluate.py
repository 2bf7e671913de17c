"""Scoring whole image sets with a trained student (METHOD.md "Anomaly score", eqs. 7-10), and
evaluating a run: threshold, metrics, arrays and plots.

One jit-compiled score step goes from uint8 images to image scores and anomaly maps; each batch
is one split's ``[1, B, ...]`` over every device of the mesh (``parallel.GlobalBatch``); results
are gathered to the host of every process. :class:`SavedRuns` scores the runs a workdir holds
(``--mode=eval`` and predict) without the trainer.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm.auto import tqdm

from fcd_jax import checkpoints, parallel, reports, workdir
from fcd_jax.datasets.split import ImageSource, Split
from fcd_jax.errors import FcdError
from fcd_jax.input_pipeline import eval_batches
from fcd_jax.metrics import summarise_run, threshold_from_normal
from fcd_jax.networks import Networks, build_networks
from fcd_jax.preprocessing import preprocess
from fcd_jax.scoring import score_images
from fcd_jax.teacher import load_teacher


@dataclasses.dataclass
class ScoredSet:
    """Scores of every image of a source, in order; maps only where they were asked for."""

    scores: np.ndarray  # float32 [n]
    maps: np.ndarray | None  # float32 [n, H, W]


def make_score_step(
    config: ml_collections.ConfigDict, networks: Networks
) -> Callable[[dict, dict, jax.Array, jax.Array], dict[str, jax.Array]]:
    """Jitted ``step(teacher_params, student_params, anchor, uint8 images [1, B, ...]) ->
    {"score" [B], "map" [B, H, W]}``, built once per (config, networks)."""
    method = networks.plan.method(config.method)

    def step(teacher_params, student_params, anchor, images):
        images = preprocess(images[0], config.data)
        scored = score_images(
            networks.teacher, networks.student, teacher_params, student_params, anchor, images,
            method, config.data.image_size,
        )
        return {"score": scored["score"], "map": scored["map"]}

    key = ("score", ml_collections.FrozenConfigDict(config), networks)
    return parallel.jit_once(key, lambda: jax.jit(step))


def eval_batch_size(requested: int, mesh: Mesh) -> int:
    """The requested eval batch rounded up to a multiple of the device count."""
    return -(-requested // mesh.size) * mesh.size


def score_source(
    score_step: Callable,
    teacher_params: dict,
    student_params: dict,
    anchor: jax.Array,
    source: ImageSource,
    mesh: Mesh,
    batch_size: int,
    keep_maps: int | None,
    progress: Callable[[int], None] = lambda n: None,
) -> ScoredSet:
    """Scores every image of ``source`` exactly once.

    ``keep_maps``: ``None`` keeps every map, ``k`` keeps the first k (for heat-map plots).
    """
    batch_size = eval_batch_size(batch_size, mesh)
    sharding = parallel.all_devices_sharding(mesh)
    valid_layout = parallel.GlobalBatch(sharding, (1, batch_size))
    scores, maps = [], []
    num_kept = 0
    for images, valid in eval_batches(source, batch_size, *valid_layout.process_slot):
        images_layout = parallel.GlobalBatch(sharding, (1, batch_size, *images.shape[1:]))
        global_images = images_layout.assemble({0: images})
        out = score_step(teacher_params, student_params, anchor, global_images)
        want_maps = keep_maps is None or num_kept < keep_maps
        fetched = {"score": out["score"], "valid": valid_layout.assemble({0: valid}, bool)}
        if want_maps:
            fetched["map"] = out["map"]
        fetched = multihost_utils.process_allgather(fetched, tiled=True)
        keep = np.asarray(fetched["valid"], bool)[0]
        scores.append(np.asarray(fetched["score"], np.float32)[keep])
        if want_maps:
            batch_maps = np.asarray(fetched["map"], np.float32)[keep]
            if keep_maps is not None:
                batch_maps = batch_maps[: keep_maps - num_kept]
            maps.append(batch_maps)
            num_kept += len(batch_maps)
        progress(int(keep.sum()))
    return ScoredSet(
        scores=np.concatenate(scores) if scores else np.zeros((0,), np.float32),
        maps=np.concatenate(maps) if maps else None,
    )


def heatmap_indices(labels: np.ndarray, count: int) -> np.ndarray:
    """Up to ``count`` test images for the heat-map grid: about three quarters anomalous, the rest
    normal, each spread evenly over the test set (so over its defect types)."""

    def spread(indices: np.ndarray, wanted: int) -> np.ndarray:
        if len(indices) <= wanted:
            return indices
        return indices[np.linspace(0, len(indices) - 1, wanted).round().astype(int)]

    anomalous = spread(np.flatnonzero(labels == 1), max(count - count // 4, 1))
    normal = spread(np.flatnonzero(labels == 0), count - len(anomalous))
    return np.concatenate([anomalous, normal])[:count]


def evaluate_split(
    config: ml_collections.ConfigDict,
    split: Split,
    model: dict,
    teacher_params: dict,
    score_step: Callable,
    mesh: Mesh,
    run_dir: str,
) -> dict:
    """Scores a trained split and writes its arrays and plots under ``run_dir``.

    The threshold is a quantile of the held-out normal images' scores (METHOD.md "Beyond the
    paper"); pixel metrics need masks. Returns the run's ``results.json`` entry.
    """
    has_masks = split.test_masks is not None
    with tqdm(
        total=len(split.holdout_images) + len(split.test_images), desc=f"score {split.name}"[:40],
        unit="img", disable=jax.process_index() != 0, dynamic_ncols=True,
    ) as bar:
        def score(source, keep_maps):
            return score_source(
                score_step, teacher_params, model["params"], model["anchor"], source, mesh,
                config.data.eval_batch_size, keep_maps, bar.update,
            )

        holdout = score(split.holdout_images, 0)
        test = score(split.test_images, None if has_masks else 0)
    if len(holdout.scores) == 0:
        raise FcdError(
            f"run {split.name} has no held-out normal images to set the threshold: "
            "set --config.data.holdout_fraction above 0"
        )
    threshold = threshold_from_normal(holdout.scores, config.eval.threshold_quantile)
    masks = split.test_masks.images if has_masks else None
    summary = summarise_run(
        split.name, test.scores, split.test_labels, threshold, maps=test.maps, masks=masks
    )
    summary["skipped_images"] = len(split.skipped)
    if jax.process_index() == 0:
        os.makedirs(run_dir, exist_ok=True)
        run = dict(summary, scores=test.scores, labels=split.test_labels)
        reports.save_run_arrays(os.path.join(run_dir, workdir.SCORES_NPZ), run)
        if has_masks:
            chosen = heatmap_indices(split.test_labels, config.eval.max_heatmaps)
            reports.plot_heatmap_grid(
                os.path.join(run_dir, reports.HEATMAPS_PNG),
                split.test_images.get_batch(chosen), test.maps[chosen], masks[chosen],
                test.scores[chosen], split.test_labels[chosen],
            )
    return summary


@dataclasses.dataclass
class SavedRuns:
    """What scoring a workdir's trained runs needs: the config reconciled with the teacher and
    checked against the workdir's, the teacher on every device, the jitted score step."""

    config: ml_collections.ConfigDict
    directory: str
    teacher_params: dict
    teacher_is_random: bool
    score_step: Callable
    mesh: Mesh

    @classmethod
    def open(cls, config: ml_collections.ConfigDict, directory: str) -> SavedRuns:
        teacher = load_teacher(config, directory)
        workdir.check_training_config(teacher.config, directory, record=False)
        networks = build_networks(teacher.config)
        mesh = parallel.data_mesh()
        teacher_params = jax.device_put(
            networks.teacher_params(teacher.params), parallel.replicated(mesh)
        )
        score_step = make_score_step(teacher.config, networks)
        return cls(teacher.config, directory, teacher_params, teacher.is_random, score_step, mesh)

    def load_model(self, name: str) -> dict:
        """The trained ``{"params", "anchor"}`` of run ``name``."""
        return checkpoints.load_tree(workdir.model_dir(self.directory, name))

    def score(self, name: str, source: ImageSource, keep_maps: int | None = None) -> ScoredSet:
        """Scores every image of ``source`` with run ``name``."""
        model = self.load_model(name)
        return score_source(
            self.score_step, self.teacher_params, model["params"], model["anchor"], source,
            self.mesh, self.config.data.eval_batch_size, keep_maps,
        )
