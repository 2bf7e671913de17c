"""The block plan (which blocks the method reads, decided once) and the networks built from it."""

import ml_collections
import numpy as np
import pytest

from fcd_jax import losses
from fcd_jax.errors import ConfigError, FcdError
from fcd_jax.networks import BlockPlan, build_networks


def method(layers, anchor_layers, pairs=(), **overrides):
    return ml_collections.ConfigDict(dict(
        layers=layers, anchor_layers=anchor_layers, gram_pairs=pairs, lam=0.7, anchor_weight=1.0,
        gram_weight=1.0,
        distill_form="default", gram_form="default", anchor_update="mean", anchor_momentum=0.99,
        **overrides,
    ))


def test_plan_resolves_negative_indices_and_fills_the_default_gram_pairs():
    plan = BlockPlan.from_method(method((3, 6, 9, -1), (-1,)), 12)
    assert plan.layers == (3, 6, 9, 11) and plan.anchor_layers == (11,)
    assert plan.gram_pairs == ((3, 6), (6, 9), (9, 11))
    assert plan.read == (3, 6, 9, 11) and plan.teacher_depth == 12


def test_the_teacher_runs_to_the_last_block_any_loss_reads_gram_pairs_included():
    plan = BlockPlan.from_method(method((3, 6, 9), (9,), ((9, 11),)), 12)
    assert plan.read == (3, 6, 9, 11)
    assert plan.teacher_depth == 12  # block 11 of the Gram pair: not 10


def test_on_read_renumbers_to_positions_in_the_blocks_read():
    plan = BlockPlan.from_method(method((1, 4), (2, 6), ((0, 4),)), 7)
    compact = plan.on_read()
    assert plan.read == (0, 1, 2, 4, 6)
    assert compact == BlockPlan(5, (1, 3), (2, 4), ((0, 3),))
    assert compact.on_read() == compact


@pytest.mark.parametrize(
    "case",
    [
        ((4, 2, 5, 8), (3,), (3,), ()),  # one-layer groupc: no Gram pairs
        ((12, 2, 17, 16), (3, 6, 9, 11), (11,), ()),  # the paper's groupc
        ((6, 2, 9, 12), (1, 3, 5), (5,), ((1, 5), (3, 3))),  # configured pairs
        ((7, 2, 6, 8), (1, -3), (2, 6), ((0, 4),)),  # anchor and pair blocks outside groupc
    ],
)
def test_losses_on_only_the_blocks_read_equal_the_losses_on_every_block(case):
    """What the train step computes (both stacks cut to ``read``, the plan renumbered) is
    the loss of the full stacks with the plan's indices."""
    shape, layers, anchor_layers, pairs = case
    rng = np.random.default_rng(9)
    teacher = rng.normal(size=shape).astype(np.float32) * 3
    student = (teacher + rng.normal(size=teacher.shape) * 3).astype(np.float32)
    config = method(layers, anchor_layers, pairs)
    plan = BlockPlan.from_method(config, shape[0])
    anchor = rng.normal(size=(len(anchor_layers), shape[3])).astype(np.float32)
    full_loss, full = losses.fcd_loss(teacher, student, anchor, plan.method(config))
    read = list(plan.read)
    cut_loss, cut = losses.fcd_loss(
        teacher[read], student[read], anchor, plan.on_read().method(config)
    )
    np.testing.assert_allclose(cut_loss, full_loss, rtol=1e-6)
    for term in ("distill", "gram", "anchor"):
        np.testing.assert_allclose(cut[term], full[term], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(
    "config, message",
    [
        (method((1, 4), (3,)), r"method.layers \(1, 4\) has block indices \[4\] outside"),
        (method((1, 3), (-5,)), r"method.anchor_layers \(-5,\) has block indices \[-5\]"),
        (method((1, 3), (3,), ((1, 9),)), r"method.gram_pairs \(1, 9\) has block indices \[9\]"),
        (method((), (3,)), "method.layers is empty"),
        (method((1, 3), ()), "method.anchor_layers is empty"),
        (method((1, 3), (3,), (1, 3)), "pairs of block indices"),
    ],
)
def test_a_bad_plan_is_one_clear_error(config, message):
    with pytest.raises(FcdError, match=message) as error:
        BlockPlan.from_method(config, 4)
    assert "\n" not in str(error.value)


def test_networks_cut_the_teacher_to_the_plan_and_need_the_teachers_spec(tiny_config):
    config = tiny_config(layers=(0, 1), anchor_layers=(1,))
    networks = build_networks(config)
    assert networks.student.depth == 4 and networks.teacher.depth == 2
    assert networks.plan.read == (0, 1)
    unreconciled = tiny_config(reconciled=False)
    with pytest.raises(ConfigError, match="model.layernorm_eps, model.gelu_approximate, data.mean"):
        build_networks(unreconciled)
