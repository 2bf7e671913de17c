"""The train state and the production train step, one split (a stack of one): METHOD.md "Losses",
eqs. 1-6, and scoring what it trained with the production score step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from fcd_jax import evaluate, parallel, train_state
from fcd_jax.errors import ConfigError
from fcd_jax.input_pipeline import load_split, train_batches
from fcd_jax.networks import build_networks
from fcd_jax.preprocessing import preprocess


@pytest.fixture(scope="module")
def digits_zero(tiny_config):
    return load_split(tiny_config().data, "0")


@pytest.fixture(scope="module")
def default_setup(tiny_config, single_split):
    """One compiled step (default method) shared by the tests below: compiling dominates."""
    return single_split(tiny_config(), total_steps=300)


@pytest.fixture(scope="module")
def options_setup(tiny_config, single_split):
    """The other options: EMA anchor and a learned position embedding, one compile for both."""
    config = tiny_config(anchor_update="ema", anchor_momentum=0.9, pos_embedding="learned")
    return single_split(config)


def batches(split, steps, seed=0):
    stream = train_batches(split.train_images, 16, seed=seed)
    return [next(stream)[None] for _ in range(steps)]  # [1, B, h, w]: one split's batch


def teacher_cls(setup, images):
    normalised = preprocess(images, setup.config.data)
    apply = jax.jit(setup.networks.teacher.apply)
    blocks = apply({"params": setup.teacher_params}, normalised)["blocks"]
    return np.asarray(blocks[np.asarray(setup.networks.plan.anchor_layers), :, 0, :])


def fresh_states(setup):
    """A copy of the initial states (the step donates the states it is given)."""
    return jax.tree.map(jnp.copy, setup.states)


def test_anchor_is_the_exact_mean_of_teacher_cls_after_one_pass(digits_zero, default_setup):
    setup = default_setup
    states = fresh_states(setup)
    images = digits_zero.train_images.images[:48]  # 3 batches of 16: one pass
    for start in range(0, 48, 16):
        states, _ = setup.step(states, setup.teacher_params, images[None, start: start + 16])
    expected = teacher_cls(setup, images).mean(axis=1)
    np.testing.assert_allclose(np.asarray(states.anchor[0]), expected, atol=1e-6, rtol=1e-6)
    assert int(states.step[0]) == 3  # 48 images averaged: step * batch


def test_ema_anchor_and_learned_position_embedding(digits_zero, options_setup):
    setup = options_setup
    states = fresh_states(setup)
    pos_embedding_before = np.array(states.params["pos_embedding"])
    expected = None
    for batch in batches(digits_zero, 4):
        states, _ = setup.step(states, setup.teacher_params, batch)
        batch_mean = teacher_cls(setup, batch[0]).mean(axis=1)
        expected = batch_mean if expected is None else 0.9 * expected + 0.1 * batch_mean
    np.testing.assert_allclose(np.asarray(states.anchor[0]), expected, atol=1e-5, rtol=1e-5)
    assert not np.array_equal(pos_embedding_before, states.params["pos_embedding"])


def test_learning_rate_warms_up_then_decays(tiny_config):
    config = tiny_config()
    config.optim.update(lr=0.1, warmup_steps=10, schedule="cosine")
    lr = [float(train_state.learning_rate(jnp.asarray(s), jnp.asarray(110), config.optim))
          for s in (0, 4, 9, 60, 109)]
    np.testing.assert_allclose(lr[:3], [0.01, 0.05, 0.1], rtol=1e-6)
    assert lr[3] == pytest.approx(0.05, rel=0.05) and lr[4] < 1e-3


def test_a_finished_split_keeps_its_state(digits_zero, tiny_config, single_split):
    """``active`` is derived from ``step < total_steps``: after its last step the state stays."""
    setup = single_split(tiny_config(), total_steps=2)
    states = setup.states
    for batch in batches(digits_zero, 3):
        before = jax.device_get(states)
        states, _ = setup.step(states, setup.teacher_params, batch)
    assert int(states.step[0]) == 2
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(states), before)


def train_tiny(split, setup, steps):
    """``steps`` steps from a fresh state: (losses, test AUROC by the score step, states)."""
    states = fresh_states(setup)
    losses = []
    for images in batches(split, steps):
        states, metrics = setup.step(states, setup.teacher_params, images)
        losses.append(float(metrics["loss"][0]))
    mesh = parallel.data_mesh(jax.devices()[:1])
    scored = evaluate.score_source(
        evaluate.make_score_step(setup.config, setup.networks), setup.teacher_params,
        jax.tree.map(lambda leaf: leaf[0], states.params), states.anchor[0], split.test_images,
        mesh, 64, keep_maps=0,
    )
    return np.asarray(losses), roc_auc_score(split.test_labels, scored.scores), states


def test_training_lowers_the_loss_separates_anomalies_and_is_deterministic(
    digits_zero, default_setup
):
    setup = default_setup
    teacher_before = jax.tree.map(np.array, setup.teacher_params)
    losses, auroc, states = train_tiny(digits_zero, setup, 300)
    assert losses[-50:].mean() < 0.5 * losses[:20].mean()
    windows = losses.reshape(6, 50).mean(axis=1)
    assert np.all(np.diff(windows) < 0), windows  # falls monotonically on average
    assert auroc > 0.75, auroc

    # Gradients reach only the student's trainable parameters.
    teacher_after = jax.tree.map(np.array, setup.teacher_params)
    jax.tree.map(np.testing.assert_array_equal, teacher_before, teacher_after)
    np.testing.assert_array_equal(
        teacher_before["pos_embedding"], states.params["pos_embedding"][0]
    )
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), setup.states.params,
                           states.params)
    # Every parameter the loss reaches is trained; the final LayerNorm feeds no loss (the losses
    # read block outputs) and the position embedding is frozen.
    assert not changed.pop("pos_embedding")
    assert not any(jax.tree.leaves(changed.pop("encoder_norm")))
    assert all(jax.tree.leaves(changed))
    assert int(states.step[0]) == 300

    losses_again, auroc_again, _ = train_tiny(digits_zero, setup, 300)
    np.testing.assert_array_equal(losses, losses_again)
    assert auroc == auroc_again


def test_nonexistent_layer_is_one_clear_error(tiny_config):
    config = tiny_config()
    config.method.layers = (3, 6)
    with pytest.raises(ConfigError, match=r"method.layers \(3, 6\) .* \[6\] outside the model's 4"):
        build_networks(config)


def test_bfloat16_compute_keeps_float32_params_anchor_and_loss(
    digits_zero, default_setup, tiny_config, single_split
):
    config = tiny_config()
    config.model.dtype = "bfloat16"
    bf16 = single_split(config, total_steps=300)
    images = batches(digits_zero, 1)[0]
    states_f32, metrics_f32 = default_setup.step(
        fresh_states(default_setup), default_setup.teacher_params, images
    )
    states_bf16, metrics_bf16 = bf16.step(fresh_states(default_setup), bf16.teacher_params, images)
    assert metrics_bf16["loss"].dtype == jnp.float32 and states_bf16.anchor.dtype == jnp.float32
    assert {leaf.dtype for leaf in jax.tree.leaves(states_bf16.params)} == {jnp.dtype("float32")}
    assert float(metrics_bf16["loss"][0]) == pytest.approx(float(metrics_f32["loss"][0]), rel=0.05)
    np.testing.assert_allclose(states_bf16.anchor, states_f32.anchor, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("stack_mode", ["map", "vmap"])
def test_a_stack_trains_each_split_as_alone(digits_zero, default_setup, stack_mode):
    """A stack of one runs its split's step as it is (no vmap, no layout copies of the stacked
    parameters). A stack of two with ``stack_mode="map"`` runs that same program for each split
    in turn: bit-identical to alone; with "vmap" vectorised: alike to float rounding."""
    from fcd_jax.train_step import make_stacked_step

    setup = default_setup
    config = setup.config.copy_and_resolve_references()
    config.stack_mode = stack_mode
    step = jax.jit(make_stacked_step(config, setup.networks))
    images = digits_zero.train_images.images[:16][None]
    alone, alone_metrics = step(fresh_states(setup), setup.teacher_params, images)
    pair = jax.tree.map(lambda leaf: jnp.concatenate([leaf, leaf]), fresh_states(setup))
    stacked, stacked_metrics = step(pair, setup.teacher_params, jnp.concatenate([images] * 2))
    tolerance = dict(rtol=0, atol=0) if stack_mode == "map" else dict(rtol=1e-5, atol=1e-6)
    for one, two in zip(jax.tree.leaves((alone, alone_metrics)),
                        jax.tree.leaves((stacked, stacked_metrics)), strict=True):
        assert one.shape[0] == 1 and two.shape[0] == 2
        np.testing.assert_allclose(np.asarray(two[1]), np.asarray(two[0]), rtol=0, atol=0)
        np.testing.assert_allclose(np.asarray(two[0]), np.asarray(one[0]), **tolerance)


def test_stack_mode_auto_maps_on_one_cpu_slot_and_vmaps_a_sharded_stack():
    from fcd_jax.parallel import runs_in_sequence

    assert jax.default_backend() == "cpu"
    assert runs_in_sequence("auto", 1) and not runs_in_sequence("auto", 2)
    assert runs_in_sequence("map", 1) and not runs_in_sequence("vmap", 1)
