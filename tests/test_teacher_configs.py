"""``configs/X.py:teacher=dinov2_*`` on every dataset config: each resolves to the checkpoint's
architecture (patch 14 at 224, layer scale, registers) with groupc scaled to its depth, and
builds a model; a tiny DINOv2-with-registers teacher trains and scores end to end (registers
stay out of every loss and score: the contract of ``fcd_jax.models.vit``)."""

import functools
import importlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fixtures import make_mvtec_folder

from configs import default
from fcd_jax import experiment
from fcd_jax.models import build_vit
from fcd_jax.networks import build_networks
from fcd_jax.teacher import reconcile

DATASET_CONFIGS = ("cifar10", "cifar100_super", "fashion_mnist", "mvtec", "folder")
WIDTHS = {"S": 384, "B": 768, "L": 1024}


@functools.cache
def param_shapes(variant: str, registers: int, image_size: int):
    model = build_vit(dict(variant=variant, layer_scale=True, num_registers=registers))
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), images)["params"]


@pytest.mark.parametrize("teacher", sorted(default.TEACHERS))
@pytest.mark.parametrize("config_name", DATASET_CONFIGS)
def test_teacher_argument_resolves_and_builds(config_name, teacher):
    plain = importlib.import_module(f"configs.{config_name}").get_config()
    config = importlib.import_module(f"configs.{config_name}").get_config(f"teacher={teacher}")
    size = teacher.split("_")[1][0].upper()
    depth = 24 if size == "L" else 12
    assert config.model.variant == f"{size}/14" and config.model.layer_scale
    assert config.model.num_registers == (4 if teacher.endswith("_reg") else 0)
    assert config.data.image_size == 224
    assert config.method.layers == ((7, 13, 19, 23) if depth == 24 else (3, 6, 9, 11))
    assert config.method.anchor_layers == (depth - 1,)
    # The dataset's own settings stay (batch, lr, epochs: the paper's per dataset).
    for field in ("batch_size", "eval_batch_size", "name"):
        assert config.data[field] == plain.data[field]
    assert (config.optim.lr, config.train.epochs) == (plain.optim.lr, plain.train.epochs)
    networks = build_networks(reconcile(config, None))  # validates layers against the depth
    teacher_model, student = networks.teacher, networks.student
    assert (student.depth, teacher_model.depth, student.patch_size) == (depth, depth, 14)
    shapes = param_shapes(config.model.variant, config.model.num_registers, 224)
    assert shapes["pos_embedding"].shape == (1, 1 + 16 * 16, WIDTHS[size])
    assert shapes["blocks"]["ls1"].shape == (depth, WIDTHS[size])
    assert ("registers" in shapes) == teacher.endswith("_reg")


def test_groupc_keeps_the_papers_relative_depths():
    assert default.groupc_for_depth(12) == default.PAPER_GROUPC == (3, 6, 9, 11)
    for depth in (12, 24, 36):  # block c of 12 sits at the same fraction (c + 1) / 12 of depth
        fractions = [(c + 1) / depth for c in default.groupc_for_depth(depth)]
        assert fractions == [(c + 1) / 12 for c in default.PAPER_GROUPC]


def test_unknown_teacher_is_one_clear_line():
    with pytest.raises(ValueError, match="unknown teacher=dinov2_g14: use one of dinov2_s14"):
        default.parse_arg("teacher=dinov2_g14")


def test_runlocal_keeps_the_teachers_layers_valid():
    config = importlib.import_module("configs.mvtec").get_config("teacher=dinov2_l14,runlocal")
    assert config.model.depth == 24 and config.method.layers == (7, 13, 19, 23)
    assert config.model.layer_scale
    build_networks(reconcile(config, None))


@pytest.mark.slow
def test_tiny_dinov2_with_registers_teacher_trains_and_scores(tmp_path):
    """A HuggingFace Dinov2WithRegistersModel shaped like ``runlocal``'s ViT, as the teacher."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = importlib.import_module("configs.mvtec").get_config("teacher=dinov2_b14_reg,runlocal")
    model = config.model
    torch.manual_seed(0)
    hf = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
        hidden_size=model.width, num_hidden_layers=model.depth, num_attention_heads=model.num_heads,
        mlp_ratio=model.mlp_dim // model.width, patch_size=model.patch_size,
        image_size=config.data.image_size, num_register_tokens=model.num_registers))
    hf.save_pretrained(tmp_path / "dinov2_tiny")
    config.teacher.checkpoint = str(tmp_path / "dinov2_tiny")
    config.data.root = str(make_mvtec_folder(tmp_path / "mvtec", categories=("bottle",),
                                             n_train=4))
    config.splits = "bottle"
    config.train.steps = 1
    config.data.holdout_fraction = 0.5
    config.eval.max_heatmaps = 1
    outcome = experiment.train_and_evaluate(config, str(tmp_path / "run"))
    assert not outcome["teacher_is_random"]
    run = json.loads((tmp_path / "run" / "results.json").read_text())["runs"][0]
    assert run["name"] == "bottle" and np.isfinite(run["image_auroc"])
    assert 0.0 <= run["pixel_auroc"] <= 1.0  # maps of the 4x4 patch grid, registers left out
    cached = next((tmp_path / "run" / "teacher").iterdir())
    arch = json.loads((cached / "arch.json").read_text())
    assert (arch["num_registers"], arch["layer_scale"], arch["family"]) == (4, True, "dinov2")
    # The checkpoint's ImageNet normalisation is what ran and what the workdir records.
    recorded = json.loads((tmp_path / "run" / "training_config.json").read_text())
    np.testing.assert_allclose(recorded["data.mean"], arch["image_mean"])
    np.testing.assert_allclose(recorded["data.std"], arch["image_std"])
