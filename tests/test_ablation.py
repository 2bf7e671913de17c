"""fcd_jax.ablation and configs/ablations: the arms, the comparison table, a :runlocal run."""

import json

import pytest

from configs.ablations import backbones, loss_terms, pos_embedding
from fcd_jax import ablation, networks
from fcd_jax.errors import ConfigError


def test_loss_terms_arms_switch_each_term():
    arms = ablation.arm_configs(loss_terms.get_config())
    assert list(arms) == ["distill_only", "distill+gram", "full"]
    weights = {arm: (c.method.anchor_weight, c.method.gram_weight) for arm, c in arms.items()}
    assert weights == {"distill_only": (0.0, 0.0), "distill+gram": (0.0, 1.0), "full": (1.0, 1.0)}
    assert all("ablation" not in c for c in arms.values())
    assert {c.data.name for c in arms.values()} == {"mvtec"}


def test_pos_embedding_arms_and_a_plain_config_is_one_line():
    arms = ablation.arm_configs(pos_embedding.get_config("runlocal"))
    assert {arm: c.method.pos_embedding for arm, c in arms.items()} == {
        "learned": "learned", "copy_frozen": "copy_frozen"}
    plain = loss_terms.get_config()
    with plain.unlocked():
        del plain["ablation"]
    with pytest.raises(ConfigError, match="no ablation arms"):
        ablation.arm_configs(plain)


def arm_result(aurocs, teacher_is_random=False):
    """An arm's ``train_and_evaluate`` result with these image AUROCs per run."""
    return dict(teacher_is_random=teacher_is_random, runs=[
        dict(name=name, image_auroc=value, f1=0.5, pixel_auroc=None, pro=None)
        for name, value in aurocs.items()])


def test_comparison_has_arms_as_columns_runs_as_rows_and_means():
    table = ablation.comparison({"a": arm_result({"x": 0.8, "y": 0.6}),
                                 "b": arm_result({"x": 0.9, "y": 0.7})}, "paper says")
    assert table["metrics"]["image_auroc"]["rows"] == {"x": {"a": 0.8, "b": 0.9},
                                                       "y": {"a": 0.6, "b": 0.7}}
    assert table["metrics"]["image_auroc"]["mean"] == pytest.approx({"a": 0.7, "b": 0.8})
    assert "pixel_auroc" not in table["metrics"]
    markdown = ablation.comparison_markdown(table)
    assert "| run | a | b |" in markdown and "| **mean of 2** | 70.0 | 80.0 |" in markdown
    assert "paper says" in markdown


def test_runlocal_runs_every_arm_end_to_end(tmp_path):
    config = pos_embedding.get_config("runlocal")
    with config.unlocked():
        config.splits = "0"
    result = ablation.run_ablation(config, tmp_path)
    assert result["arms"] == ["learned", "copy_frozen"] and result["runs"] == ["0"]
    assert result["teacher_is_random"]
    for arm in result["arms"]:
        arm_results = json.loads((tmp_path / arm / "results.json").read_text())
        auroc = result["metrics"]["image_auroc"]["rows"]["0"][arm]
        assert arm_results["runs"][0]["image_auroc"] == auroc and 0.0 <= auroc <= 1.0
    assert json.loads((tmp_path / "ablation.json").read_text()) == result
    assert "| run | learned | copy_frozen |" in (tmp_path / "ablation.md").read_text()


def test_backbones_arms_are_figs_3_and_5():
    arms = ablation.arm_configs(backbones.get_config())
    assert list(arms) == ["vgg16", "vgg16+anchor", "resnet18", "resnet18+anchor", "vit",
                          "vit+anchor", "cifar10/vgg16", "cifar10/vgg16+anchor"]
    for name, config in arms.items():
        backbone = name.split("/")[-1].split("+")[0]
        assert config.model.backbone == backbone
        assert config.method.anchor_weight == (1.0 if name.endswith("+anchor") else 0.0)
        assert config.method.gram_weight == (1.0 if backbone == "vit" else 0.0)
        assert config.data.name == ("cifar10" if name.startswith("cifar10/") else "mvtec")
        if backbone != "vit":
            networks.check_backbone(config)  # every CNN arm is a valid CNN config
            assert config.method.lambda_mse == (0.01 if name.startswith("cifar10/") else 0.5)
            assert (config.optim.name, config.optim.lr, config.data.batch_size) == (
                "sgd", 1e-3, 128)
            assert config.teacher.checkpoint == backbones.CNN_TEACHERS[backbone]
    assert arms["vit+anchor"].optim.lr == 0.2 and arms["vit"].data.batch_size == 4  # mvtec.py
    mkdad_arms = ablation.arm_configs(backbones.get_config("cnn_optim=mkdad"))
    assert (mkdad_arms["resnet18"].optim.name, mkdad_arms["resnet18"].data.batch_size) == (
        "adam", 64)
    with pytest.raises(ValueError, match="unknown cnn_optim=lbfgs"):
        backbones.get_config("cnn_optim=lbfgs")


def test_arms_on_other_datasets_get_their_own_table():
    table = ablation.comparison({"a": arm_result({"x": 0.8, "y": 0.6}, True),
                                 "c/a": arm_result({"cat": 0.5, "dog": 0.7, "owl": 0.9}, True)},
                                "says")
    assert table["runs"] == ["x", "y", "cat", "dog", "owl"]
    rows = table["metrics"]["image_auroc"]["rows"]
    assert rows["x"] == {"a": 0.8, "c/a": None} and rows["owl"] == {"a": None, "c/a": 0.9}
    assert table["metrics"]["image_auroc"]["mean"] == pytest.approx({"a": 0.7, "c/a": 0.7})
    markdown = ablation.comparison_markdown(table)
    assert "| run | a |" in markdown and "| run | c/a |" in markdown
    assert "| **mean of 2** | 70.0 |" in markdown and "| **mean of 3** | 70.0 |" in markdown



def test_backbones_runlocal_runs_every_backbone_end_to_end(tmp_path):
    """Three of its arms, one per backbone (each arm compiles its own programs); the whole
    ``:runlocal`` (8 arms) is the same code, timed in the README."""
    config = backbones.get_config("runlocal")
    with config.unlocked():
        config.splits = "0"
        config.ablation.arms = ("vgg16+anchor", "resnet18", "vit+anchor")
    result = ablation.run_ablation(config, tmp_path)
    assert result["arms"] == ["vgg16+anchor", "resnet18", "vit+anchor"] and result["runs"] == ["0"]
    assert result["teacher_is_random"]
    for arm in result["arms"]:
        recorded = json.loads((tmp_path / arm / "training_config.json").read_text())
        assert recorded["model.backbone"] == arm.split("+")[0]
        auroc = result["metrics"]["image_auroc"]["rows"]["0"][arm]
        assert 0.0 <= auroc <= 1.0
    assert "| run | vgg16+anchor | resnet18 | vit+anchor |" in (
        tmp_path / "ablation.md").read_text()
