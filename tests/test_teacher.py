"""The teacher's spec reconciled with the config: unset fields take the checkpoint's values, set
ones override them with a warning, a random teacher gets Google's ViT values."""

import logging

import pytest

from fcd_jax.errors import CheckpointError, ConfigError
from fcd_jax.teacher import load_teacher, reconcile

HF_SPEC = dict(layernorm_eps=1e-12, gelu_approximate=True, image_mean=[0.485, 0.456, 0.406],
               image_std=[0.229, 0.224, 0.225])


def spec(config):
    return (config.model.layernorm_eps, config.model.gelu_approximate, config.data.mean,
            config.data.std)


def test_unset_fields_take_the_checkpoints_spec_and_the_callers_config_is_kept(tiny_config):
    config = tiny_config(reconciled=False)
    reconciled = reconcile(config, dict(HF_SPEC, patch_size=4, width=32, depth=4, num_heads=2,
                                        mlp_dim=64))
    assert spec(reconciled) == (1e-12, True, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert all(value is None for value in spec(config))


def test_a_random_teacher_gets_googles_values_and_uniform_channels_one_number(tiny_config):
    assert spec(reconcile(tiny_config(reconciled=False), None)) == (1e-6, False, 0.5, 0.5)
    config = tiny_config(reconciled=False)
    config.data.mean, config.data.std = [0.5, 0.5, 0.5], (0.25,)
    assert spec(reconcile(config, None))[2:] == (0.5, 0.25)


def test_a_value_set_explicitly_overrides_the_checkpoints_with_a_warning(tiny_config, caplog):
    config = tiny_config(reconciled=False)
    config.data.mean = 0.5
    config.model.layernorm_eps = 1e-12  # the checkpoint's own: no warning
    arch = dict(HF_SPEC, patch_size=4, width=32, depth=4, num_heads=2, mlp_dim=64)
    with caplog.at_level(logging.WARNING):
        reconciled = reconcile(config, arch, "hf_vit")
    assert spec(reconciled) == (1e-12, True, 0.5, (0.229, 0.224, 0.225))
    warnings = [record.getMessage() for record in caplog.records]
    assert warnings == [
        "--config.data.mean=0.5 overrides the teacher checkpoint's (0.485, 0.456, 0.406) (hf_vit)"
    ]


def test_a_checkpoint_that_does_not_record_its_normalisation_gets_05_with_a_warning(
    tiny_config, caplog
):
    arch = dict(HF_SPEC, image_mean=None, image_std=None, patch_size=4, width=32, depth=4,
                num_heads=2, mlp_dim=64)
    with caplog.at_level(logging.WARNING):
        reconciled = reconcile(tiny_config(reconciled=False), arch, "timm.safetensors")
    assert spec(reconciled)[2:] == (0.5, 0.5)
    assert sum("does not record image_mean" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("mean", (0.1, 0.2), r"data.mean=\(0.1, 0.2\): give one number or one per RGB channel"),
        ("std", (0.5, 0.0, 0.5), "data.std=.*, all positive"),
    ],
)
def test_a_bad_normalisation_is_one_clear_error(tiny_config, field, value, message):
    config = tiny_config(reconciled=False)
    config.data[field] = value
    with pytest.raises(ConfigError, match=message):
        reconcile(config, None)


def test_another_architecture_is_one_clear_error(tiny_config):
    arch = dict(HF_SPEC, patch_size=4, width=48, depth=4, num_heads=2, mlp_dim=64)
    with pytest.raises(CheckpointError, match="has width=48 but the model .* has 32"):
        reconcile(tiny_config(reconciled=False), arch, "other.npz")


def test_load_teacher_reconciles_with_a_converted_checkpoint(tiny_config, converted_teacher,
                                                              tmp_path):
    config = tiny_config(reconciled=False)
    config.teacher.update(init="pretrained", checkpoint=str(converted_teacher(config, **HF_SPEC)))
    teacher = load_teacher(config, str(tmp_path))
    assert not teacher.is_random
    assert teacher.params["blocks"]["attn"]["query"]["kernel"].shape[0] == 4  # every block
    assert spec(teacher.config) == (1e-12, True, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    random = load_teacher(tiny_config(reconciled=False), str(tmp_path))
    assert random.is_random and spec(random.config) == (1e-6, False, 0.5, 0.5)
