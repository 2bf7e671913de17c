"""``fcd_jax.sizing``: the stacked step's memory is linear in the splits per device (the model
``parallel_splits="auto"`` and ``train.teacher_cache="auto"`` both read), fitted to XLA's own
analysis of one and two splits, so no question about any other stack compiles another step."""

import pytest

from fcd_jax import sizing


@pytest.fixture(scope="module")
def config(tiny_config):
    config = tiny_config()
    config.data.batch_size = 8
    return config


def test_memory_is_linear_in_the_splits(config):
    one, two = sizing.step_memory_bytes(config, 1, 8), sizing.step_memory_bytes(config, 2, 8)
    assert 0 < one < two
    assert sizing.stacked_step_bytes(config, 1, 8) == one
    assert sizing.stacked_step_bytes(config, 2, 8) == two
    # The model's assumption, against XLA's analysis of a stack of four compiled for it.
    four = sizing.step_memory_bytes(config, 4, 8)
    assert sizing.stacked_step_bytes(config, 4, 8) == pytest.approx(four, rel=0.05)


def test_auto_takes_the_most_splits_that_fit(config, monkeypatch):
    config = config.copy_and_resolve_references()
    config.parallel_splits = "auto"
    config.mesh_shape = (1, 1)
    five = sizing.stacked_step_bytes(config, 5, 8)
    monkeypatch.setattr(sizing, "device_memory_bytes", lambda: (five + 1) / 0.9)
    assert sizing.group_size_for(config, 20) == 5
    assert sizing.group_size_for(config, 3) == 3
    monkeypatch.setattr(sizing, "device_memory_bytes", lambda: sizing.stacked_step_bytes(
        config, 1, 8) / 0.9 - 1)
    with pytest.raises(sizing.FcdError, match="one split needs"):
        sizing.group_size_for(config, 20)


def test_other_stack_sizes_compile_no_step(config):
    config = config.copy_and_resolve_references()
    config.seed = 12345  # a config of its own: nothing measured for it yet
    sizing.stacked_step_bytes(config, 15, 8)
    sizing.stacked_step_bytes(config, 7, 8)
    measured = {key[1] for key in sizing._STEP_MEMORY if key[0] == config.to_json()}
    assert measured == {1, 2}
