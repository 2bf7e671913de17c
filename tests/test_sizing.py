"""``fcd_jax.sizing``: the stacked step's memory is linear in the splits per device (the model
``parallel_splits="auto"`` and ``train.teacher_cache="auto"`` both read), fitted to XLA's own
analysis of two stack sizes, so no question about any other stack compiles another step."""

import pytest

from fcd_jax import sizing


@pytest.fixture(scope="module")
def config(tiny_config):
    config = tiny_config()
    config.data.batch_size = 8
    return config


@pytest.mark.parametrize("stack_mode, probes", [("vmap", (1, 2)), ("map", (2, 3))])
def test_memory_is_linear_in_the_splits(config, stack_mode, probes):
    config = config.copy_and_resolve_references()
    config.stack_mode = stack_mode
    low, high = (sizing.step_memory_bytes(config, splits, 8) for splits in probes)
    assert 0 < low < high
    for splits, measured in zip(probes, (low, high), strict=True):
        assert sizing.stacked_step_bytes(config, splits, 8) == measured
    assert sizing.stacked_step_bytes(config, 1, 8) == sizing.step_memory_bytes(config, 1, 8)
    # The model's assumption, against XLA's analysis of a stack of five compiled for it.
    five = sizing.step_memory_bytes(config, 5, 8)
    assert sizing.stacked_step_bytes(config, 5, 8) == pytest.approx(five, rel=0.05)


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
    assert measured == ({2, 3} if sizing.parallel.runs_in_sequence(config.stack_mode, 1)
                        else {1, 2})
