"""fcd_jax.ablation and configs/ablations: the arms, the comparison table, a :runlocal run."""

import json

import pytest

from configs.ablations import loss_terms, pos_embedding
from fcd_jax import ablation
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


def test_comparison_has_arms_as_columns_runs_as_rows_and_means():
    def result(aurocs):
        return dict(teacher_is_random=False, runs=[
            dict(name=name, image_auroc=value, f1=0.5, pixel_auroc=None, pro=None)
            for name, value in aurocs.items()])
    table = ablation.comparison({"a": result({"x": 0.8, "y": 0.6}),
                                 "b": result({"x": 0.9, "y": 0.7})}, "paper says")
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
