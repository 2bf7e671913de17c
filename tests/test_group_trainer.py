"""``GroupTrainer``: several splits in one stacked program, padding, the teacher cache, resuming
from a checkpoint, and closing what it opened. One device; 8 devices: ``test_parallel``."""

import dataclasses
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from fcd_jax import sizing
from fcd_jax.errors import FcdError
from fcd_jax.group_trainer import GroupTrainer
from fcd_jax.input_pipeline import load_split
from fcd_jax.models import init_params
from fcd_jax.networks import build_networks, split_keys


@pytest.fixture(scope="module")
def config(tiny_config):
    """Batch 8, 12 steps (several epochs of the two splits below)."""
    config = tiny_config()
    config.data.batch_size = 8
    config.train.update(steps=12, checkpoint_every=1000, log_every=4)
    return config


@pytest.fixture(scope="module")
def splits(config):
    """Two splits of 30 and 21 training images."""
    digits = load_split(config.data, "0")
    return [
        dataclasses.replace(digits, name=name, train_images=digits.train_images.subset(
            np.arange(offset, offset + size)))
        for name, offset, size in (("a", 0, 30), ("b", 40, 21))
    ]


def changed(config, **train):
    """A copy of ``config`` with these ``config.train`` fields."""
    config = config.copy_and_resolve_references()
    config.train.update(train)
    return config


def trainer_for(config, splits, directory, group_size=None):
    networks = build_networks(config)
    teacher_key, _ = split_keys(config.seed)
    teacher = init_params(networks.student, config.data.image_size, teacher_key)
    return GroupTrainer(
        config, str(directory), splits, list(range(len(splits))),
        networks.teacher_params(teacher), networks, group_size,
    )


def trained_models(config, splits, directory, **kwargs):
    with trainer_for(config, splits, directory, **kwargs) as trainer:
        trainer.train()
        return trainer, jax.device_get(trainer.final_models())


def test_teacher_cache_trains_exactly_as_the_teacher_forward(config, splits, tmp_path):
    """The step that reads the teacher's features from the cache gives the very numbers of the
    step that computes them."""
    models = {}
    for setting in ("auto", "off"):
        trainer, models[setting] = trained_models(
            changed(config, teacher_cache=setting), splits, tmp_path / setting
        )
        assert trainer.cached_teacher == (setting == "auto")
    jax.tree.map(np.testing.assert_array_equal, models["auto"], models["off"])


def test_teacher_cache_auto_needs_room_and_a_second_pass(config, splits, tmp_path, monkeypatch):
    with trainer_for(config, splits, tmp_path / "measure") as trainer:
        needed = sizing.step_memory_bytes(config, 2, 8) + trainer.teacher_cache_bytes()
    # Per split 30 images in whole batches of 8: 32, each [4 blocks read, 17 tokens, width 32].
    assert trainer.teacher_cache_bytes() == 2 * 32 * 4 * 17 * 32 * 4
    for device_bytes, cached in ((needed / 0.9 - 100, False), (needed / 0.9 + 100, True)):
        monkeypatch.setattr(sizing, "device_memory_bytes", lambda size=device_bytes: size)
        with trainer_for(config, splits, tmp_path / "device") as trainer:
            assert trainer.cached_teacher == cached
    monkeypatch.undo()
    # ... nor one that a single pass over the images would read only once.
    with trainer_for(changed(config, steps=3), splits, tmp_path / "one_epoch") as trainer:
        assert not trainer.cached_teacher
    with pytest.raises(FcdError, match="'auto', 'on' or 'off'"):
        trainer_for(changed(config, teacher_cache="yes"), splits, tmp_path / "bad")


def test_padding_splits_never_step_and_a_short_split_stops(config, splits, tmp_path):
    one_epoch = changed(config, steps=0, epochs=1)  # 3 steps of "a", 2 of "b"
    trainer, _ = trained_models(one_epoch, splits, tmp_path, group_size=3)
    assert trainer.num_stacked == 3 and list(trainer.totals) == [3, 2, 0]
    assert [int(step) for step in np.asarray(trainer.states.step)] == [3, 2, 0]


def test_resumed_group_ends_with_the_same_numbers(config, splits, tmp_path):
    config = changed(config, checkpoint_every=5)
    _, uninterrupted = trained_models(config, splits, tmp_path / "once")
    shutil.copytree(tmp_path / "once", tmp_path / "resumed")
    group_dir = tmp_path / "resumed" / "checkpoints" / "a+b"
    assert sorted(path.name for path in group_dir.iterdir()) == ["10", "12"]
    shutil.rmtree(group_dir / "12")  # as if killed after the checkpoint of step 10
    trainer, resumed = trained_models(config, splits, tmp_path / "resumed")
    assert [int(step) for step in np.asarray(trainer.states.step)] == [12, 12]
    jax.tree.map(np.testing.assert_array_equal, resumed, uninterrupted)


def test_leaving_the_trainer_closes_its_writers_and_checkpoint_manager(
    config, splits, tmp_path, monkeypatch
):
    closed = []
    close = ocp.CheckpointManager.close
    monkeypatch.setattr(ocp.CheckpointManager, "close",
                        lambda self: (closed.append(self), close(self))[1])
    with trainer_for(changed(config, steps=1), splits, tmp_path) as trainer:
        trainer.train()
        assert not closed
    assert closed == [trainer.checkpoints]
    assert sorted(trainer.writers) == ["a", "b"]
    assert all(writer.file_writer is None for writer in trainer.writers.values())
    events = sorted(path.parent.name for path in tmp_path.glob("tensorboard/*/events.*"))
    assert events == ["a", "b"]
