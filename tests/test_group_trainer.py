"""``GroupTrainer``: splits scheduled on the slots of one stacked program (refilled slots, a
smaller re-stacked program), the teacher cache, resuming from a checkpoint killed at any step,
and closing what it opened. One device; 8 devices: ``test_parallel``."""

import contextlib
import dataclasses
import logging
import os
import shutil
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from fcd_jax import checkpoints, sizing, workdir
from fcd_jax.errors import FcdError
from fcd_jax.group_trainer import GroupTrainer
from fcd_jax.input_pipeline import load_split
from fcd_jax.models import init_params
from fcd_jax.networks import build_networks, split_keys
from fcd_jax.preprocessing import preprocess


@pytest.fixture(scope="module")
def config(tiny_config):
    """Batch 8, 12 steps (several epochs of the two splits below)."""
    config = tiny_config()
    config.data.batch_size = 8
    config.train.update(steps=12, checkpoint_every=1000, log_every=4)
    return config


def digit_splits(config, sizes):
    digits = load_split(config.data, "0")
    return [
        dataclasses.replace(digits, name=name, train_images=digits.train_images.subset(
            np.arange(offset, offset + size)))
        for name, offset, size in sizes
    ]


@pytest.fixture(scope="module")
def splits(config):
    """Two splits of 30 and 21 training images."""
    return digit_splits(config, (("a", 0, 30), ("b", 40, 21)))


@pytest.fixture(scope="module")
def three(config):
    """Splits of 30, 21 and 12 images; 2 epochs of batch 8 on 2 slots: "a" (6 steps) and "b"
    (4) start, "c" (2) takes the slot "b" frees at step 4."""
    splits = digit_splits(config, (("a", 0, 30), ("b", 40, 21), ("c", 70, 12)))
    return changed(config, steps=0, epochs=2, checkpoint_every=1), splits


def changed(config, **train):
    """A copy of ``config`` with these ``config.train`` fields."""
    config = config.copy_and_resolve_references()
    config.train.update(train)
    return config


def trainer_for(config, splits, directory, group_size=None, split_indices=None):
    networks = build_networks(config)
    teacher_key, _ = split_keys(config.seed)
    teacher = init_params(networks.student, config.data.image_size, teacher_key)
    return GroupTrainer(
        config, str(directory), splits, split_indices or list(range(len(splits))),
        networks.teacher_params(teacher), networks, group_size,
    )


def trained_models(config, splits, directory, **kwargs):
    with trainer_for(config, splits, directory, **kwargs) as trainer:
        trainer.train()
        return trainer, jax.device_get(trainer.final_models())


def test_teacher_cache_trains_exactly_as_the_teacher_forward(three, tmp_path):
    """The step that reads the teacher's features from the cache gives the very numbers of the
    step that computes them, also for a split whose rows are filled when it takes a slot."""
    config, splits = three
    models = {}
    for setting in ("auto", "off"):
        trainer, models[setting] = trained_models(
            changed(config, teacher_cache=setting), splits, tmp_path / setting, group_size=2
        )
        assert trainer.cached_teacher == (setting == "auto")
    assert trainer.plan.begins == (0, 0, 4)
    jax.tree.map(np.testing.assert_array_equal, models["auto"], models["off"])


def test_teacher_cache_auto_needs_room_and_a_second_pass(config, splits, tmp_path, monkeypatch):
    with trainer_for(config, splits, tmp_path / "measure") as trainer:
        needed = sizing.stacked_step_bytes(config, 2, 8) + trainer.teacher_cache_bytes()
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


def test_a_short_split_stops_and_what_is_left_is_restacked(config, splits, tmp_path):
    one_epoch = changed(config, steps=0, epochs=1)  # 3 steps of "a", 2 of "b"
    trainer, _ = trained_models(one_epoch, splits, tmp_path, group_size=3)
    assert trainer.num_stacked == 2 and list(trainer.totals) == [3, 2]
    assert trainer.plan.sizes == (2, 1)  # "a"'s last step alone, in a stack of one
    assert trainer.steps_taken == {"a": 3, "b": 2}
    assert [int(step) for step in np.asarray(trainer.states.step)] == [3]
    for name in ("a", "b"):  # saved before the slot was reused
        saved = checkpoints.load_tree(workdir.model_dir(str(tmp_path), name))
        jax.tree.map(np.testing.assert_array_equal, saved, jax.device_get(trainer.model(name)))


class Killed(Exception):
    pass


def killed_at(trainer, step):
    """Makes ``trainer`` die before it computes global step ``step`` (after the checkpoint of
    ``step``, every step checkpointed)."""
    step_fn, calls = trainer.step_fn, []

    def dying(*args):
        if len(calls) == step:
            raise Killed
        calls.append(step)
        return step_fn(*args)

    trainer.step_fn = dying


def test_a_run_killed_at_any_step_resumes_to_the_same_numbers(three, tmp_path):
    """Killed in the first segment, right after the boundary where "b" ends and "c" takes its
    slot (and, as if killed before "b"'s model was saved, without it), a step later, and at the
    end: the rerun ends with the very numbers of the uninterrupted run."""
    config, splits = three
    start = time.perf_counter()
    trainer, uninterrupted = trained_models(config, splits, tmp_path / "once", group_size=2)
    assert [(s.start, s.stop, s.slots) for s in trainer.plan.segments] == [
        (0, 4, (0, 1)), (4, 6, (0, 2))]
    for kill in (2, 4, 5, 6):
        directory = tmp_path / f"killed_{kill}"
        with trainer_for(config, splits, directory, 2) as trainer:
            killed_at(trainer, kill)
            # killed at the end: in the evaluation after training
            with pytest.raises(Killed) if kill < 6 else contextlib.nullcontext():
                trainer.train()
        assert trainer.checkpoints.latest_step() == kill
        saved_b = workdir.model_dir(str(directory), "b")
        assert os.path.isdir(saved_b) == (kill >= 4)
        if kill == 4:
            shutil.rmtree(saved_b)  # as if killed after the checkpoint, before the save
        resumed, models = trained_models(config, splits, directory, group_size=2)
        assert resumed.steps_taken == {"a": 6, "c": 2, **({} if kill > 4 else {"b": 4})}
        jax.tree.map(np.testing.assert_array_equal, models, uninterrupted)
    logging.info("kill/resume test: %.1f s", time.perf_counter() - start)


@pytest.mark.parametrize("stack_mode", ["map", "vmap"])
def test_a_split_trains_the_same_in_any_slot_and_stack(three, tmp_path, stack_mode):
    """"c" trained in a refilled slot of a stack of 2, and "a" in stacks of 2, and of 3, 2 and 1
    (re-stacked as "c" and "b" end), equal each trained alone (its own seed index).

    ``stack_mode="map"`` (CPU's "auto"): bit for bit, every slot runs the program of a split
    alone. "vmap": XLA compiles the vmapped matmuls of each stack size with another summation
    order (slots of one stack agree exactly), about 1e-6 relative per step. The attention's key
    bias has no true gradient (softmax is shift-invariant), so Adam scales its rounding noise to
    lr-sized steps: it differs by up to its own size, yet changes no output."""
    config, splits = three
    config = config.copy_and_resolve_references()
    config.stack_mode = stack_mode
    _, pairs = trained_models(config, splits, tmp_path / "two", group_size=2)
    trainer, triple = trained_models(config, splits, tmp_path / "three", group_size=3)
    assert trainer.plan.sizes == (3, 2, 1)
    # The stacks of 2 and 1 ran their step compiled ahead, while the stack of 3 trained (a
    # resumed run calls the jitted step instead: the kill/resume test finds the same numbers).
    assert sorted(trainer.compiled) == [1, 2]
    assert all(future.done() and future.exception() is None
               for future in trainer.compiled.values())
    networks = build_networks(config)
    images = preprocess(splits[0].test_images.images[:16], config.data)

    def outputs(model):
        return networks.student.apply({"params": model["params"]}, images)["blocks"]

    for index in (0, 2):
        _, (alone,) = trained_models(
            config, [splits[index]], tmp_path / f"alone_{index}", split_indices=[index]
        )
        for grouped in (pairs[index], triple[index]):
            if stack_mode == "map":
                jax.tree.map(np.testing.assert_array_equal, grouped, alone)
                continue
            for (path, leaf), expected in zip(jax.tree_util.tree_leaves_with_path(grouped),
                                              jax.tree.leaves(alone), strict=True):
                if "['key']['bias']" not in jax.tree_util.keystr(path):
                    scale = np.abs(expected).max()
                    np.testing.assert_allclose(leaf, expected, rtol=0, atol=1e-4 * scale)
            scale = np.abs(outputs(alone)).max()
            np.testing.assert_allclose(outputs(grouped), outputs(alone), rtol=0, atol=1e-4 * scale)


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
