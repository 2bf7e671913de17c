"""The train state and the jit-compiled FCD train step (METHOD.md "Losses", eqs. 1-6)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from configs import default
from fcd_jax import train
from fcd_jax.input_pipeline import load_split, preprocess, train_batches
from fcd_jax.scoring import make_score_fn


def tiny_config(**method):
    config = default.base_config()
    config.data.name = "digits"
    config.data.image_size = 16
    config.data.batch_size = 16
    config.model.update(patch_size=4, width=32, depth=4, num_heads=2, mlp_dim=64)
    config.method.update(layers=(0, 1, 2, 3), anchor_layers=(3,), top_k=4, **method)
    config.optim.update(name="adam", lr=1e-3, warmup_steps=10)
    return config


def setup(config, total_steps=100, seed=0):
    teacher_model, student_model = train.build_models(config)
    teacher_key, student_key = train.split_keys(seed)
    teacher_params = train.init_params(student_model, config.data.image_size, teacher_key)
    teacher_params = train.prepare_teacher_params(teacher_params, config.method)
    state = train.create_train_state(
        config, teacher_params["pos_embedding"], student_model,
        jax.random.fold_in(student_key, 0), total_steps,
    )
    step = train.make_train_step(config, teacher_model, student_model)
    return teacher_model, student_model, teacher_params, state, step


@pytest.fixture(scope="module")
def digits_zero():
    return load_split(tiny_config().data, "0")


@pytest.fixture(scope="module")
def default_setup():
    """One compiled step (default method) shared by the tests below: compiling dominates."""
    return setup(tiny_config(), total_steps=300)


@pytest.fixture(scope="module")
def options_setup():
    """The other options: EMA anchor and a learned position embedding, one compile for both."""
    return setup(tiny_config(anchor_update="ema", anchor_momentum=0.9, pos_embedding="learned"))


def batches(split, steps, seed=0):
    stream = train_batches(split.train_images, 16, seed=seed)
    return [next(stream) for _ in range(steps)]


def teacher_cls(config, teacher_model, teacher_params, images):
    normalised = preprocess(images, config.data.image_size, config.data.mean, config.data.std)
    blocks = jax.jit(teacher_model.apply)({"params": teacher_params}, normalised)["blocks"]
    return np.asarray(blocks[np.asarray(config.method.anchor_layers), :, 0, :])


def fresh_state(setup_tuple):
    """A copy of the initial state (the step donates the state it is given)."""
    return jax.tree.map(jnp.copy, setup_tuple[3])


def test_anchor_is_the_exact_mean_of_teacher_cls_after_one_pass(digits_zero, default_setup):
    config = tiny_config()
    teacher_model, _, teacher_params, _, step = default_setup
    state = fresh_state(default_setup)
    images = digits_zero.train_images.images[:48]  # 3 batches of 16: one pass
    for start in range(0, 48, 16):
        state, _ = step(state, teacher_params, images[start: start + 16])
    expected = teacher_cls(config, teacher_model, teacher_params, images).mean(axis=1)
    np.testing.assert_allclose(np.asarray(state.anchor), expected, atol=1e-6, rtol=1e-6)
    assert float(state.num_seen) == 48


def test_ema_anchor_and_learned_position_embedding(digits_zero, options_setup):
    config = tiny_config(anchor_update="ema", anchor_momentum=0.9)
    teacher_model, _, teacher_params, state, step = options_setup
    pos_embedding_before = np.array(state.params["pos_embedding"])
    expected = None
    for batch in batches(digits_zero, 4):
        state, _ = step(state, teacher_params, batch)
        batch_mean = teacher_cls(config, teacher_model, teacher_params, batch).mean(axis=1)
        expected = batch_mean if expected is None else 0.9 * expected + 0.1 * batch_mean
    np.testing.assert_allclose(np.asarray(state.anchor), expected, atol=1e-5, rtol=1e-5)
    assert not np.array_equal(pos_embedding_before, state.params["pos_embedding"])


def test_learning_rate_warms_up_then_decays():
    config = tiny_config()
    config.optim.update(lr=0.1, warmup_steps=10, schedule="cosine")
    lr = [float(train.learning_rate(jnp.asarray(s), jnp.asarray(110), config.optim))
          for s in (0, 4, 9, 60, 109)]
    np.testing.assert_allclose(lr[:3], [0.01, 0.05, 0.1], rtol=1e-6)
    assert lr[3] == pytest.approx(0.05, rel=0.05) and lr[4] < 1e-3


def train_tiny(split, setup_tuple, steps):
    """``steps`` steps from a fresh state: (losses, held-out AUROC, final state)."""
    teacher_model, student_model, teacher_params, _, step = setup_tuple
    config = tiny_config()
    state = fresh_state(setup_tuple)
    losses = []
    for images in batches(split, steps):
        state, metrics = step(state, teacher_params, images)
        losses.append(float(metrics["loss"]))
    score = make_score_fn(teacher_model, student_model, config.method, config.data.image_size)
    normalised = preprocess(split.test_images.images, config.data.image_size, 0.5, 0.5)
    scores = score(teacher_params, state.params, state.anchor, normalised)["score"]
    return np.asarray(losses), roc_auc_score(split.test_labels, np.asarray(scores)), state


def test_training_lowers_the_loss_separates_anomalies_and_is_deterministic(
    digits_zero, default_setup
):
    _, _, teacher_params, initial, _ = default_setup
    teacher_before = jax.tree.map(np.array, teacher_params)
    losses, auroc, state = train_tiny(digits_zero, default_setup, 300)
    assert losses[-50:].mean() < 0.5 * losses[:20].mean()
    windows = losses.reshape(6, 50).mean(axis=1)
    assert np.all(np.diff(windows) < 0), windows  # falls monotonically on average
    assert auroc > 0.75, auroc

    # Gradients reach only the student's trainable parameters.
    teacher_after = jax.tree.map(np.array, teacher_params)
    jax.tree.map(np.testing.assert_array_equal, teacher_before, teacher_after)
    np.testing.assert_array_equal(teacher_before["pos_embedding"], state.params["pos_embedding"])
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), initial.params, state.params)
    # Every parameter the loss reaches is trained; the final LayerNorm feeds no loss (the losses
    # read block outputs) and the position embedding is frozen.
    assert not changed.pop("pos_embedding")
    assert not any(jax.tree.leaves(changed.pop("encoder_norm")))
    assert all(jax.tree.leaves(changed))
    assert int(state.step) == 300

    losses_again, auroc_again, _ = train_tiny(digits_zero, default_setup, 300)
    np.testing.assert_array_equal(losses, losses_again)
    assert auroc == auroc_again


def test_nonexistent_layer_is_one_clear_error():
    config = tiny_config()
    config.method.layers = (3, 6)
    with pytest.raises(train.FcdError, match="blocks"):
        train.build_models(config)


def test_bfloat16_compute_keeps_float32_params_anchor_and_loss(digits_zero, default_setup):
    config = tiny_config()
    config.model.dtype = "bfloat16"
    teacher_model, student_model = train.build_models(config)
    _, _, teacher_params, initial, step_f32 = default_setup
    step_bf16 = train.make_train_step(config, teacher_model, student_model)
    images = batches(digits_zero, 1)[0]
    state_f32, metrics_f32 = step_f32(fresh_state(default_setup), teacher_params, images)
    state_bf16, metrics_bf16 = step_bf16(fresh_state(default_setup), teacher_params, images)
    assert metrics_bf16["loss"].dtype == jnp.float32 and state_bf16.anchor.dtype == jnp.float32
    assert {leaf.dtype for leaf in jax.tree.leaves(state_bf16.params)} == {jnp.dtype("float32")}
    assert float(metrics_bf16["loss"]) == pytest.approx(float(metrics_f32["loss"]), rel=0.05)
    np.testing.assert_allclose(state_bf16.anchor, state_f32.anchor, rtol=0.05, atol=0.05)


def group_trainer(config, splits, workdir):
    teacher_model, student_model, teacher_params, *_ = setup(config)
    return train.GroupTrainer(
        config, str(workdir), splits, list(range(len(splits))), teacher_params,
        teacher_model, student_model,
    )


def test_teacher_cache_trains_exactly_as_the_teacher_forward(digits_zero, tmp_path, monkeypatch):
    """Two splits of 30 and 21 images, 12 steps of 8 (several epochs): the step that reads the
    teacher's features from the cache gives the very numbers of the step that computes them."""
    config = tiny_config()
    config.data.batch_size = 8
    config.train.update(steps=12, checkpoint_every=1000)
    splits = [
        dataclasses.replace(digits_zero, name=name, train_images=digits_zero.train_images.subset(
            np.arange(offset, offset + size)))
        for name, offset, size in (("a", 0, 30), ("b", 40, 21))
    ]
    models = {}
    for setting in ("auto", "off"):
        config.train.teacher_cache = setting
        trainer = group_trainer(config, splits, tmp_path / setting)
        assert trainer.cached_teacher == (setting == "auto")
        trainer.train()
        models[setting] = jax.device_get(trainer.final_models())
    assert trainer.cache_length() == 32  # 30 images in whole batches of 8
    jax.tree.map(np.testing.assert_array_equal, models["auto"], models["off"])

    # "auto" keeps the cache only where the step and the cache fit 90% of a device's memory ...
    config.train.teacher_cache = "auto"
    needed = train.step_memory_bytes(config, 2, 8) + trainer.teacher_cache_bytes()
    for device_bytes, cached in ((needed / 0.9 - 100, False), (needed / 0.9 + 100, True)):
        monkeypatch.setattr(train, "device_memory_bytes", lambda size=device_bytes: size)
        assert group_trainer(config, splits, tmp_path / "device").cached_teacher == cached
    monkeypatch.undo()
    # ... nor one that a single pass over the images would read only once.
    config.train.steps = 3
    assert not group_trainer(config, splits, tmp_path / "one_epoch").cached_teacher
    config.train.teacher_cache = "yes"
    with pytest.raises(train.FcdError, match="'auto', 'on' or 'off'"):
        group_trainer(config, splits, tmp_path / "bad")
