"""Scoring whole image sets with trained students (METHOD.md "Anomaly score", eqs. 7-10), and
evaluating runs: threshold, metrics, arrays and plots.

Two jit-compiled programs go from uint8 images to image scores and, only where asked for (static
``with_maps``: masks, heat-map grids, predict), full-resolution anomaly maps:

- the score step of one student (:func:`make_score_step`), batches ``[1, B, ...]``;
- the group score step of many (:func:`make_group_score_step`), what :func:`evaluate_splits`
  runs: one teacher forward per test batch shared by every student whose split has that test set
  (CIFAR-10's ten runs share one: the teacher passes over it once, not ten times), and for
  images of one split only (held-out normals, MVTec's per-category test sets) a slot per
  ``(split, batch)``, packed S to a program call so that no student waits for the longest set.

Batches lie over every device of the mesh (``parallel.GlobalBatch``); results are gathered to the
host of every process. :class:`SavedRuns` scores the runs a workdir holds (``--mode=eval`` and
predict) without the trainer.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm.auto import tqdm

from fcd_jax import checkpoints, parallel, reports, workdir
from fcd_jax.datasets.split import ImageSource, Split, source_identity
from fcd_jax.errors import FcdError
from fcd_jax.input_pipeline import eval_batch, eval_batches
from fcd_jax.metrics import summarise_run, threshold_from_normal
from fcd_jax.networks import Networks, build_networks
from fcd_jax.preprocessing import preprocess
from fcd_jax.scoring import score_images, score_student, teacher_outputs
from fcd_jax.teacher import load_teacher


@dataclasses.dataclass
class ScoredSet:
    """Scores of every image of a source, in order; maps only where they were asked for."""

    scores: np.ndarray  # float32 [n]
    maps: np.ndarray | None  # float32 [n, H, W]


def make_score_step(
    config: ml_collections.ConfigDict, networks: Networks
) -> Callable[..., dict[str, jax.Array]]:
    """Jitted ``step(teacher_params, student_params, anchor, uint8 images [1, B, ...],
    with_maps=True) -> {"score" [B], "map" [B, H, W] (only with_maps)}``, built once per
    (config, networks); ``with_maps`` is static: two compiled variants."""
    method = networks.plan.method(config.method)

    def step(teacher_params, student_params, anchor, images, with_maps=True):
        images = preprocess(images[0], config.data)
        scored = score_images(
            networks.teacher, networks.student, teacher_params, student_params, anchor, images,
            method, config.data.image_size, with_maps,
        )
        return {key: scored[key] for key in ("score", "map") if key in scored}

    key = ("score", ml_collections.FrozenConfigDict(config), networks)
    return parallel.jit_once(key, lambda: jax.jit(step, static_argnames="with_maps"))


def make_group_score_step(
    config: ml_collections.ConfigDict, networks: Networks
) -> Callable[..., dict[str, jax.Array]]:
    """Jitted ``step(teacher_params, student_params [N, ...], anchors [N, ...], slots, images,
    with_maps) -> {"score" [S, B], "map" [S, B, H, W] (only with_maps)}``: S students at once,
    the teacher run once per image.

    ``slots``: int32 ``[S]``, the student of each slot (students may repeat), or None for the N
    students in order (S = N). ``images`` uint8 ``[1, B, ...]``: every slot scores the same batch,
    one teacher forward for all; ``[S, B, ...]``: slot s scores ``images[s]``. ``with_maps`` is
    static. Slots run as ``config.stack_mode`` says (``parallel.map_stack``); mapped (CPU's
    "auto"), each runs :func:`make_score_step`'s program, teacher forward included: bit for bit.
    """
    method = networks.plan.method(config.method)

    def one_student(params, anchor, teacher_blocks, images, with_maps):
        scored = score_student(
            networks.student, params, teacher_blocks, anchor, images, method,
            config.data.image_size, with_maps,
        )
        return {key: scored[key] for key in ("score", "map") if key in scored}

    def step(teacher_params, student_params, anchors, slots, images, with_maps):
        if slots is not None:
            student_params, anchors = jax.tree.map(
                lambda leaf: leaf[slots], (student_params, anchors)
            )
        sequential = parallel.runs_in_sequence(config.stack_mode, 1)

        def teacher_side(batch):
            batch = preprocess(batch, config.data)
            return batch, teacher_outputs(networks.teacher, teacher_params, batch)

        images, teacher_blocks = parallel.map_stack(teacher_side, (0,), sequential)(images)
        image_axis = 0 if images.shape[0] > 1 else None  # one batch per slot, or one for all
        if image_axis is None:
            teacher_blocks = jax.tree.map(lambda leaf: leaf[0], teacher_blocks)
            images = images[0]
        return parallel.map_stack(
            functools.partial(one_student, with_maps=with_maps),
            (0, 0, image_axis, image_axis), sequential,
        )(student_params, anchors, teacher_blocks, images)

    key = ("group score", ml_collections.FrozenConfigDict(config), networks)
    return parallel.jit_once(key, lambda: jax.jit(step, static_argnames="with_maps"))


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
        want_maps = keep_maps is None or num_kept < keep_maps
        out = score_step(teacher_params, student_params, anchor, global_images,
                         with_maps=want_maps)
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
    check_holdout(split)
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
    return finish_split(config, split, holdout, test, run_dir)


def check_holdout(split: Split) -> None:
    """One ``FcdError`` line when the split has no held-out normal image to set the threshold."""
    if len(split.holdout_images) == 0:
        raise FcdError(
            f"run {split.name} has no held-out normal images to set the threshold: "
            "set --config.data.holdout_fraction above 0"
        )


def finish_split(
    config: ml_collections.ConfigDict, split: Split, holdout: ScoredSet, test: ScoredSet,
    run_dir: str,
) -> dict:
    """The threshold, metrics, arrays and plots of a scored split (``test.maps`` when it has
    masks); returns the run's ``results.json`` entry."""
    check_holdout(split)
    has_masks = split.test_masks is not None
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
class ImageSet:
    """An image set of a group's splits to score: one source, the splits whose students score
    it (indices into the group), and whether its anomaly maps are kept."""

    source: ImageSource
    students: list[int]
    with_maps: bool
    scores: list[np.ndarray] = dataclasses.field(default_factory=list)  # per batch, [K, valid]
    maps: list[np.ndarray] = dataclasses.field(default_factory=list)

    def result(self, position: int) -> ScoredSet:
        """What student ``students[position]`` scored."""
        scores = [batch[position] for batch in self.scores]
        maps = [batch[position] for batch in self.maps]
        return ScoredSet(
            scores=np.concatenate(scores) if scores else np.zeros((0,), np.float32),
            maps=np.concatenate(maps) if maps else None,
        )


def group_image_sets(splits: list[Split]) -> tuple[list[ImageSet], dict[tuple[int, str], tuple]]:
    """Every held-out and test set of ``splits``, one :class:`ImageSet` per distinct source
    (``datasets.split.source_identity``): a test set that several splits share is scored once
    by all their students. Returns the sets and, for each ``(split, "holdout" | "test")``, its
    ``(set index, position among the set's students)``. Maps are kept for test sets with masks
    (the pixel metrics and heat-map grids read them), nowhere else."""
    sets: list[ImageSet] = []
    by_identity: dict = {}
    where: dict[tuple[int, str], tuple] = {}
    for index, split in enumerate(splits):
        for kind, source in (("holdout", split.holdout_images), ("test", split.test_images)):
            with_maps = kind == "test" and split.test_masks is not None
            key = (source_identity(source), with_maps)
            if key not in by_identity:
                by_identity[key] = len(sets)
                sets.append(ImageSet(source, [], with_maps))
            image_set = sets[by_identity[key]]
            where[index, kind] = (by_identity[key], len(image_set.students))
            image_set.students.append(index)
    return sets, where


def score_group(
    group_step: Callable,
    teacher_params: dict,
    models: list[dict],
    image_sets: list[ImageSet],
    mesh: Mesh,
    batch_size: int,
    progress: Callable[[int], None] = lambda n: None,
) -> None:
    """Scores every image of every set with each of its students, into ``ImageSet.scores`` (and
    ``maps``).

    A set with several students is scored batch by batch, one teacher forward per batch for all
    of them. The batches of the sets with one student each (``(set, start)`` pairs) are packed
    ``len(models)`` to a call, slot s scoring its own batch with its own student: a short set
    leaves no slot idle while a long one finishes, only the last call of each kind is padded.
    Calls with maps and without are packed apart.
    """
    batch_size = eval_batch_size(batch_size, mesh)
    num_slots = len(models)
    stack = parallel.jit_once(("stack", mesh), lambda: jax.jit(
        lambda trees: jax.tree.map(lambda *leaves: jax.numpy.stack(leaves), *trees),
        out_shardings=parallel.replicated(mesh),
    ))
    params = stack([model["params"] for model in models])
    anchors = stack([model["anchor"] for model in models])
    sharding = parallel.all_devices_sharding(mesh)
    sources = [image_set.source for image_set in image_sets if len(image_set.source)]
    if not sources:
        return
    image_shape = np.shape(sources[0][0])

    def run(slots, batches, with_maps):
        """Calls the step on ``batches`` (one per slot, or one for all) and gathers the
        results as host arrays ``[slots, valid rows]``."""
        valid_layout = parallel.GlobalBatch(sharding, (len(batches), batch_size))
        images_layout = parallel.GlobalBatch(sharding, (len(batches), batch_size, *image_shape))
        images = images_layout.assemble({i: batch[0] for i, batch in enumerate(batches)})
        valid = valid_layout.assemble({i: batch[1] for i, batch in enumerate(batches)}, bool)
        out = group_step(teacher_params, params, anchors, slots, images, with_maps=with_maps)
        fetched = multihost_utils.process_allgather(dict(out, valid=valid), tiled=True)
        return {key: np.asarray(value) for key, value in fetched.items()}

    process_slot = parallel.GlobalBatch(sharding, (1, batch_size)).process_slot
    own: dict[bool, list[tuple[ImageSet, int]]] = {False: [], True: []}
    for image_set in image_sets:
        starts = range(0, len(image_set.source), batch_size)
        if len(image_set.students) == 1:
            own[image_set.with_maps] += [(image_set, start) for start in starts]
            continue
        slots = np.asarray(image_set.students, np.int32)
        slots = None if np.array_equal(slots, np.arange(num_slots)) else slots
        for start in starts:
            batch = eval_batch(image_set.source, batch_size, start, *process_slot)
            fetched = run(slots, [batch], image_set.with_maps)
            keep = fetched["valid"][0]
            image_set.scores.append(fetched["score"][:, keep].astype(np.float32))
            if image_set.with_maps:
                image_set.maps.append(fetched["map"][:, keep].astype(np.float32))
            progress(int(keep.sum()) * len(image_set.students))
    rows = batch_size // process_slot[1]
    padding = (np.zeros((rows, *image_shape), np.uint8), np.zeros((rows,), bool))
    for with_maps, items in own.items():
        for first in range(0, len(items), num_slots):
            chunk = items[first: first + num_slots]
            pad = num_slots - len(chunk)  # the last call's spare slots: student 0, no image
            slots = np.asarray([image_set.students[0] for image_set, _ in chunk] + [0] * pad,
                               np.int32)
            batches = [eval_batch(image_set.source, batch_size, start, *process_slot)
                       for image_set, start in chunk] + [padding] * pad
            fetched = run(slots, batches, with_maps)
            for slot, (image_set, _) in enumerate(chunk):
                keep = fetched["valid"][slot]
                image_set.scores.append(fetched["score"][slot: slot + 1, keep].astype(np.float32))
                if with_maps:
                    image_set.maps.append(fetched["map"][slot: slot + 1, keep].astype(np.float32))
                progress(int(keep.sum()))


def evaluate_splits(
    config: ml_collections.ConfigDict,
    splits: list[Split],
    models: list[dict],
    teacher_params: dict,
    networks: Networks,
    mesh: Mesh,
    run_dirs: list[str | None],
) -> list[dict]:
    """:func:`evaluate_split` of every split of a group in one program (:func:`score_group`):
    the same numbers, arrays and plots, each test set the splits share passed through the
    teacher once. ``models``: each split's trained ``{"params", "anchor"}``, replicated on
    ``mesh``. A split whose run directory is None is scored (its student keeps its slot in the
    program) but not finished. Returns the finished runs' ``results.json`` entries, in the
    order of ``splits``."""
    if not splits:
        return []
    for split in splits:
        check_holdout(split)  # before any image is scored
    image_sets, where = group_image_sets(splits)
    total = sum(len(s.source) * len(s.students) for s in image_sets)
    names = ", ".join(split.name for split in splits)
    with tqdm(total=total, desc=f"score {names}"[:40], unit="img",
              disable=jax.process_index() != 0, dynamic_ncols=True) as bar:
        score_group(
            make_group_score_step(config, networks), teacher_params, models, image_sets, mesh,
            config.data.eval_batch_size, bar.update,
        )

    def scored(index: int, kind: str) -> ScoredSet:
        set_index, position = where[index, kind]
        return image_sets[set_index].result(position)

    return [
        finish_split(config, split, scored(index, "holdout"), scored(index, "test"), run_dir)
        for index, (split, run_dir) in enumerate(zip(splits, run_dirs, strict=True))
        if run_dir is not None
    ]


@dataclasses.dataclass
class SavedRuns:
    """What scoring a workdir's trained runs needs: the config reconciled with the teacher and
    checked against the workdir's, the teacher on every device, the networks and the jitted score
    step."""

    config: ml_collections.ConfigDict
    directory: str
    teacher_params: dict
    teacher_is_random: bool
    score_step: Callable
    mesh: Mesh
    networks: Networks

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
        return cls(teacher.config, directory, teacher_params, teacher.is_random, score_step, mesh,
                   networks)

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
