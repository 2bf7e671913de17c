"""fcd_jax.evaluate.evaluate_splits (a group's splits scored in one program, the teacher once per
shared test batch) gives what evaluate_split gives split by split."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcd_jax import evaluate, parallel, reports, workdir
from fcd_jax.datasets.split import ArraySource, Split, source_identity
from fcd_jax.errors import FcdError
from fcd_jax.networks import build_networks

SIZE = 16


def images(rng, n):
    return rng.integers(0, 256, (n, SIZE, SIZE, 3), np.uint8)


def make_split(name, rng, test, labels, masks=None, holdout=5):
    return Split(
        name=name, train_images=ArraySource(images(rng, 8)),
        holdout_images=ArraySource(images(rng, holdout)), test_images=ArraySource(test),
        test_labels=np.asarray(labels, np.int32), test_classes=np.asarray(labels, np.int32),
        test_class_names=["normal", "anomalous"],
        test_masks=None if masks is None else ArraySource(masks),
    )


def group_splits():
    """Three splits sharing one test set (separate copies of the same images, as CIFAR's runs
    load it), one with its own masked test set, one with its own shorter test set."""
    rng = np.random.default_rng(0)
    shared = images(rng, 11)
    shared_labels = np.arange(11) % 2
    masked = images(rng, 7)
    masks = (rng.random((7, SIZE, SIZE)) < 0.2).astype(np.uint8) * (np.arange(7) % 2 == 1)[
        :, None, None
    ].astype(np.uint8)
    return [
        make_split("a", rng, shared.copy(), shared_labels),
        make_split("b", rng, shared.copy(), shared_labels, holdout=9),
        make_split("c", rng, shared.copy(), shared_labels),
        make_split("d", rng, masked, np.arange(7) % 2, masks=masks),
        make_split("e", rng, images(rng, 3), [0, 1, 1], holdout=2),
    ]


def random_models(config, networks, count):
    shapes = jax.eval_shape(
        lambda: networks.student.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))["params"]
    )
    rng = np.random.default_rng(1)
    draw = lambda: jax.tree.map(
        lambda leaf: jnp.asarray(rng.normal(size=leaf.shape) * 0.3, jnp.float32), shapes
    )
    teacher = draw()
    models = [{"params": draw(), "anchor": jnp.asarray(rng.normal(size=(1, 32)), jnp.float32)}
              for _ in range(count)]
    return teacher, models


def test_shared_test_sets_are_found_by_their_images():
    splits = group_splits()
    assert source_identity(splits[0].test_images) == source_identity(splits[1].test_images)
    assert source_identity(splits[0].test_images) != source_identity(splits[4].test_images)
    image_sets, where = evaluate.group_image_sets(splits)
    shared = image_sets[where[0, "test"][0]]
    assert shared.students == [0, 1, 2] and not shared.with_maps
    assert image_sets[where[3, "test"][0]].with_maps  # masks: maps kept
    assert not any(image_sets[where[i, "holdout"][0]].with_maps for i in range(5))
    assert len(image_sets) == 5 + 1 + 2  # five holdouts, the shared test set, two own ones


@pytest.mark.parametrize("stack_mode", ["map", "vmap"])
def test_group_evaluation_equals_split_by_split(tiny_config, tmp_path, stack_mode):
    """Mapped (CPU's "auto"), each student scores with the program of a split alone: the same
    numbers bit for bit; vectorised, to float rounding."""
    config = tiny_config()
    config.stack_mode = stack_mode
    exact = stack_mode == "map"
    config.data.eval_batch_size = 4  # several batches, a partial last one
    config.eval.max_heatmaps = 4
    networks = build_networks(config)
    splits = group_splits()
    teacher, models = random_models(config, networks, len(splits))
    mesh = parallel.data_mesh(jax.devices()[:1])
    group_dirs = [str(tmp_path / "group" / split.name) for split in splits]
    grouped = evaluate.evaluate_splits(config, splits, models, teacher, networks, mesh,
                                       group_dirs)
    score_step = evaluate.make_score_step(config, networks)
    for split, model, summary, group_dir in zip(splits, models, grouped, group_dirs, strict=True):
        alone_dir = str(tmp_path / "alone" / split.name)
        alone = evaluate.evaluate_split(config, split, model, teacher, score_step, mesh,
                                        alone_dir)
        assert summary.keys() == alone.keys()
        for key, value in alone.items():
            if isinstance(value, float) and not exact:
                assert summary[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (split.name, key)
            else:
                assert summary[key] == value, (split.name, key)
        got = reports.load_run_arrays(f"{group_dir}/{workdir.SCORES_NPZ}")
        want = reports.load_run_arrays(f"{alone_dir}/{workdir.SCORES_NPZ}")
        assert got.keys() == want.keys()
        np.testing.assert_allclose(got["scores"], want["scores"], rtol=0 if exact else 1e-5)
        assert len(got["scores"]) == len(split.test_images)
        heatmaps = (tmp_path / "group" / split.name / reports.HEATMAPS_PNG).is_file()
        assert heatmaps == (split.test_masks is not None)
        assert (summary["pixel_auroc"] is None) == (split.test_masks is None)  # maps compared


def test_a_split_without_holdout_stops_before_scoring(tiny_config, tmp_path):
    config = tiny_config()
    networks = build_networks(config)
    splits = group_splits()[:2]
    splits[1].holdout_images = ArraySource(np.zeros((0, SIZE, SIZE, 3), np.uint8))
    teacher, models = random_models(config, networks, 2)
    with pytest.raises(FcdError, match="run b has no held-out normal images"):
        evaluate.evaluate_splits(config, splits, models, teacher, networks,
                                 parallel.data_mesh(jax.devices()[:1]),
                                 [str(tmp_path / "a"), str(tmp_path / "b")])


def test_evaluation_parts_are_fixed_by_the_selection(tmp_path):
    """A run killed between evaluations scores each unfinished run's group again as the
    uninterrupted run did (finished students in their slots, if their models are still there);
    groups with nothing left to finish are not scored."""
    from types import SimpleNamespace

    from fcd_jax.experiment import evaluation_parts

    splits = [SimpleNamespace(name=name) for name in "abcde"]
    for name in "ab":  # finished, models saved; "c"'s model was deleted
        (tmp_path / "runs" / name / "model").mkdir(parents=True)
    parts = evaluation_parts(str(tmp_path), splits, ["d", "e"], 2)
    assert [[split.name for split in part] for part in parts] == [["d"], ["e"]]  # "c" left out
    parts = evaluation_parts(str(tmp_path), splits, ["b", "c", "d", "e"], 2)
    assert [[split.name for split in part] for part in parts] == [["a", "b"], ["c", "d"], ["e"]]
