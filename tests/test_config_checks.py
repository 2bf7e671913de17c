"""``config_checks``: each check fires with one line naming the field, the value and the fix; every
shipped config passes; mistyped ``--config.X`` fields are named with the field meant."""

import importlib
import shutil
from pathlib import Path

import jax
import pytest

from fcd_jax import config_checks
from fcd_jax.errors import ConfigError, DataError, FcdError

SHIPPED = sorted(p.stem for p in (Path(__file__).parents[1] / "configs").glob("*.py")
                 if p.stem != "__init__")  # fmt: skip


def folder_config(**overrides):
    """``configs/folder.py:runlocal`` (32 px, 8 px patches: 16 patches) with dotted overrides."""
    config = importlib.import_module("configs.folder").get_config("runlocal")
    for field, value in overrides.items():
        *sections, leaf = field.split(".")
        node = config
        for section in sections:
            node = node[section]
        if type(node[leaf]) is not type(value):  # a config file may give another type
            del node[leaf]
        node[leaf] = value
    return config


def per_dataset_configs(config):
    """One config per dataset of ``data.name`` with its ``per_dataset`` overrides (as main.run)."""
    for dataset in [name.strip() for name in config.data.name.split(",")]:
        one = config.copy_and_resolve_references()
        one.data.name = dataset
        one.update(one.get("per_dataset", {}).get(dataset, {}))
        yield one


@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("arg", [None, "runlocal"])
def test_every_shipped_config_passes(name, arg):
    config = importlib.import_module(f"configs.{name}").get_config(arg)
    config_checks.check_config(config)
    for one in per_dataset_configs(config):
        config_checks.check_config(one)


BAD_VALUES = [  # (overrides, *what the message says)
    ({"data.batch_size": 0}, "config.data.batch_size=0 must be an integer >= 1", "to 1 or more"),
    ({"data.batch_size": -4}, "config.data.batch_size=-4", "--config.data.batch_size"),
    ({"data.eval_batch_size": 0}, "config.data.eval_batch_size=0", "1 or more"),
    ({"data.holdout_fraction": 1.0}, "holdout_fraction=1.0 is outside [0, 1)", "a value in"),
    ({"data.holdout_fraction": -0.1}, "holdout_fraction=-0.1 is outside [0, 1)",),
    ({"train.checkpoint_every": 0}, "config.train.checkpoint_every=0", "1 or more"),
    ({"train.log_every": -1}, "config.train.log_every=-1",),
    ({"data.image_size": 0}, "config.data.image_size=0 must be an integer >= 1",),
    ({"data.image_size": 30}, "image_size=30 is not a multiple of the patch size 8", "=32"),
    ({"model.dtype": "float8"}, "config.model.dtype='float8' is unknown", "'bfloat16'"),
    ({"method.top_k": 17}, "top_k=17 is not between 1 and the 16 patches", "1 <= K <= 16"),
    ({"method.top_k": 0}, "config.method.top_k=0",),
    ({"method.map_sigma": -1.0}, "config.method.map_sigma=-1.0 must be a number >= 0",),
    ({"eval.threshold_quantile": 1.5}, "threshold_quantile=1.5 is outside [0, 1]",),
    ({"eval.threshold_quantile": -0.1}, "threshold_quantile=-0.1 is outside [0, 1]",),
    ({"optim.lr": -0.1}, "config.optim.lr=-0.1 must be positive", "e.g. 0.1"),
    ({"optim.lr": 0.0}, "config.optim.lr=0.0 must be positive",),
    ({"train.steps": 0, "train.epochs": 0}, "train for zero steps", "--config.train.epochs=N"),
    ({"train.steps": -1}, "config.train.steps=-1 must be an integer >= 0",),
    ({"train.epochs": -2}, "config.train.epochs=-2",),
    ({"optim.name": "sgdd"}, "config.optim.name='sgdd' is unknown", "'sgd', 'adam'"),
    ({"optim.schedule": "linear"}, "optim.schedule='linear' is unknown", "'cosine'"),
    ({"method.distill_form": "x"}, "method.distill_form='x' is unknown", "'paper'"),
    ({"method.gram_form": "x"}, "method.gram_form='x' is unknown",),
    ({"method.anchor_update": "x"}, "method.anchor_update='x' is unknown", "'ema'"),
    ({"method.image_score": "x"}, "method.image_score='x' is unknown", "'max'"),
    ({"method.pos_embedding": "x"}, "method.pos_embedding='x' is unknown", "'learned'"),
    ({"teacher.init": "x"}, "config.teacher.init='x' is unknown", "'random'"),
    ({"method.anchor_momentum": 1.0}, "anchor_momentum=1.0 is outside [0, 1)",),
    ({"optim.momentum": 1.5}, "config.optim.momentum=1.5 is outside [0, 1)",),
    ({"parallel_splits": "0"}, "parallel_splits='0' is neither 'auto' nor a positive integer",),
    ({"parallel_splits": "two"}, "parallel_splits='two'", "'auto' or e.g. 2"),
    ({"train.teacher_cache": "maybe"}, "teacher_cache='maybe' is unknown", "'on', 'off'"),
    ({"stack_mode": "loop"}, "config.stack_mode='loop' is unknown", "'vmap', 'map'"),
    ({"mesh_shape": (3,)}, "config.mesh_shape=(3,) is not two positive integers",),
    ({"mesh_shape": (0, 1)}, "mesh_shape=(0, 1) is not two positive integers",),
    ({"mesh_shape": (2, 2)}, "does not use the 1 devices",),
    ({"model.attention_implementation": "flash"}, "attention_implementation='flash' is unknown",),
    ({"model.remat_policy": "all"}, "remat_policy='all' is unknown",),
    ({"model.num_heads": 3}, "config.model.num_heads=3 does not divide the width 32",),
    ({"model.depth": -1}, "config.model.depth=-1 must be an integer >= 0",),
    ({"model.layernorm_eps": -1e-6}, "config.model.layernorm_eps=-1e-06 must be a number >= 0",),
    ({"model.variant": "X/16"}, "unknown ViT variant 'X/16'",),
    ({"method.lam": -1.0}, "config.method.lam=-1.0 must be a number >= 0",),
    ({"optim.weight_decay": -1e-4}, "config.optim.weight_decay=-0.0001",),
    ({"optim.clip_norm": -1.0}, "config.optim.clip_norm=-1.0",),
    ({"optim.warmup_steps": -1}, "config.optim.warmup_steps=-1",),
    ({"eval.max_heatmaps": -1}, "config.eval.max_heatmaps=-1",),
    ({"data.name": "cifar11"}, "config.data.name='cifar11' names no known dataset", "mvtec"),
    ({"data.std": 0.0}, "config.data.std=0.0 divides by zero",),
    ({"data.std": (0.5, 0.5)}, "config.data.std=(0.5, 0.5) is not 1 or 3 numbers",),
    ({"method.layers": "abc"}, "config.method.layers='abc' is not a list of block indices",
     "--config.method.layers='(3, 6, 9, 11)'"),
    ({"method.layers": ("a", "b")}, "method.layers=('a', 'b') is not a list of block indices",),
    ({"method.layers": (3.5,)}, "method.layers=(3.5,) is not a list of block indices",),
    ({"method.layers": ()}, "config.method.layers=() is not a list of block indices",),
    ({"method.anchor_layers": 11}, "method.anchor_layers=11 is not a list of block indices",),
    ({"method.gram_pairs": (3,)}, "method.gram_pairs=(3,) is not a list of block index pairs",
     "or () for consecutive pairs"),
    ({"method.gram_pairs": ((3, 6, 9),)}, "is not a list of block index pairs",),
    ({"method.layers": (3, 12)}, "method.layers (3, 12) has block indices [12] outside the "
                                 "model's 12 blocks",),
    ({"method.gram_pairs": ((3, 40),)}, "method.gram_pairs (3, 40) has block indices [40]",),
]


@pytest.mark.parametrize("overrides, needles", [(case[0], case[1:]) for case in BAD_VALUES],
                         ids=[str(case[0]) for case in BAD_VALUES])  # fmt: skip
def test_each_check_fires_with_one_line(overrides, needles):
    with pytest.raises(FcdError) as error:
        config_checks.check_config(folder_config(**overrides), devices=jax.devices()[:1])
    message = str(error.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_stack_mode_map_needs_every_device_on_data():
    two_devices = [jax.devices()[0]] * 2  # only their number matters before a mesh is made
    with pytest.raises(ConfigError) as error:
        config_checks.check_config(folder_config(stack_mode="map"), devices=two_devices)
    assert str(error.value) == (
        "config.stack_mode='map' needs the stack on one device slot, but the 2 devices may "
        "spread it: add --config.mesh_shape='(1, 2)' (every device on data) or use "
        "stack_mode='vmap'")
    config_checks.check_config(folder_config(stack_mode="map"), devices=jax.devices()[:1])


def test_textures_spec_is_checked_before_any_image_is_written():
    config = importlib.import_module("configs.demo").get_config("runlocal")
    config.data.textures.crop = 500
    textures = list(per_dataset_configs(config))[1]
    with pytest.raises(DataError, match="crop=500: use 1..192"):
        config_checks.check_config(textures)


@pytest.mark.parametrize("num_images, fraction, needle", [
    (5, 0.1, "holdout_fraction=0.1 holds out no image of the 5 training images"),
    (5, 0.0, "holdout_fraction=0.0 holds out no image"),
    (1, 0.5, "cannot hold out an image of 1 training image(s)"),
])  # fmt: skip
def test_holdout_that_leaves_no_held_out_image(num_images, fraction, needle):
    with pytest.raises(ConfigError) as error:
        config_checks.check_holdout(num_images, fraction)
    assert needle in str(error.value)
    if num_images == 5:  # 5 x 0.1 = 0.5 rounds (half to even) to 0; 5 x 0.11 = 0.55 to 1
        assert "use --config.data.holdout_fraction=0.11 or more" in str(error.value)
        config_checks.check_holdout(num_images, 0.11)


def test_negative_block_indices_count_from_the_end():
    config_checks.check_config(folder_config(**{"method.layers": (3, 6, 9, -1)}),
                               devices=jax.devices()[:1])  # fmt: skip


def test_holdout_of_an_unknown_count_needs_a_fraction_above_zero():
    config_checks.check_holdout(None, 0.01)
    with pytest.raises(ConfigError, match=r"holdout_fraction=0.0 holds out no training image"):
        config_checks.check_holdout(None, 0.0)


def test_data_shape_counts_the_listed_training_images(tmp_path):
    from fixtures import make_mvtec_folder

    root = make_mvtec_folder(tmp_path / "data", categories=("a", "b"), n_train=5)
    (root / "b" / "train" / "good" / "000.png").unlink()  # b: 4 images
    config = folder_config(**{"data.root": str(root), "data.holdout_fraction": 0.2})
    assert config_checks.train_image_counts(config) == {"a": 5, "b": 4}
    config_checks.check_data_shape(config)  # 5 x 0.2 = 1, 4 x 0.2 = 0.8 -> 1
    config.data.holdout_fraction = 0.1  # 0.5 rounds to 0
    with pytest.raises(ConfigError, match="holds out no image of the 5 training images"):
        config_checks.check_data_shape(config)
    config.splits = "b"
    with pytest.raises(ConfigError, match="holds out no image of the 4 training images.*=0.13"):
        config_checks.check_data_shape(config)
    shutil.rmtree(root / "b" / "train" / "good")
    with pytest.raises(DataError, match="normal training images"):
        config_checks.check_data_shape(config)


def test_data_shape_checks_the_textures_folder_without_writing(tmp_path):
    config = importlib.import_module("configs.demo").get_config("runlocal")
    textures = list(per_dataset_configs(config))[1]
    (tmp_path / "mine.txt").write_text("mine")
    textures.data.root = str(tmp_path)
    with pytest.raises(DataError, match="is not empty and holds no generated textures"):
        config_checks.check_data_shape(textures)
    textures.data.root = str(tmp_path / "new")
    config_checks.check_data_shape(textures)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


def test_smallest_holdout_fraction_is_the_smallest_that_works():
    for n in (2, 3, 5, 7, 10, 19, 150, 1000):
        smallest = config_checks.smallest_holdout_fraction(n)
        config_checks.check_holdout(n, smallest)
        with pytest.raises(ConfigError):
            config_checks.check_holdout(n, round(smallest - 0.01, 2))
    assert config_checks.smallest_holdout_fraction(1) is None
    assert config_checks.smallest_holdout_fraction(1000) == 0.01


def test_unknown_field_message_names_the_field_meant():
    fields = config_checks.config_fields(folder_config())
    assert "optim.lr" in fields and "data" in fields and "data.textures.crop" in fields
    cases = {
        "optim.learnig_rate": "did you mean optim.lr?",  # initials of learning_rate
        "optim.learning_rate": "did you mean optim.lr?",
        "data.batchsize": "did you mean data.batch_size?",
        "method.topk": "did you mean method.top_k?",
        "optimm.lr": "did you mean optim.lr?",
        "data.textures.crops": "did you mean data.textures.crop?",
        "zzz": "see configs/default.py for every field",
    }
    for name, hint in cases.items():
        assert config_checks.unknown_field_message(name, fields) == (
            f"unknown config field {name}: {hint}"
        )


def test_mistyped_field_message_reads_the_command_line():
    argv = ["main.py", "--config=configs/folder.py:runlocal", "--config.data.root=/x",
            "--config.optim.learnig_rate=1", "--workdir", "w"]  # fmt: skip
    assert config_checks.mistyped_field_message(argv) == (
        "unknown config field optim.learnig_rate: did you mean optim.lr?"
    )
    argv = ["main.py", "--config", "configs/demo.py", "--noconfig.data.skip_bad_image"]
    assert config_checks.mistyped_field_message(argv) == (
        "unknown config field data.skip_bad_image: did you mean data.skip_bad_images?"
    )
    assert config_checks.mistyped_field_message(["main.py", "--config=configs/demo.py"]) is None
    assert config_checks.mistyped_field_message(["main.py", "--config.optim.lrr=1"]) is None
