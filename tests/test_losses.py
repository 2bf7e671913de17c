"""fcd_jax.losses against plain-NumPy loops over images, layers and tokens (METHOD.md eqs. 1-8)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fcd_jax import losses
from fcd_jax.errors import FcdError

# (num_layers, batch, tokens, width, layers, anchor_layers, explicit gram pairs)
CASES = [
    (4, 2, 5, 8, (3,), (3,), ()),  # one-layer groupc: no Gram pairs
    (5, 3, 10, 6, (0, 2, 4), (2, 4), ()),  # several anchor layers
    (12, 2, 17, 16, (3, 6, 9, 11), (11,), ()),  # the paper's groupc
    (6, 2, 9, 12, (1, 3, 5), (5,), ((1, 5), (3, 3))),  # configured pairs
    (7, 2, 6, 8, (1, 4), (2, 6), ((0, 4),)),  # anchor and pair blocks outside groupc
]


def random_blocks(seed, num_layers, batch, tokens, width, scale=3.0):
    rng = np.random.default_rng(seed)
    teacher = rng.normal(size=(num_layers, batch, tokens, width)) * scale
    student = teacher + rng.normal(size=teacher.shape) * scale
    anchor_base = rng.normal(size=(num_layers, width)) * scale
    return teacher.astype(np.float32), student.astype(np.float32), anchor_base.astype(np.float32)


def method_config(layers, anchor_layers, pairs=(), **overrides):
    config = ml_collections.ConfigDict(
        dict(
            layers=layers, anchor_layers=anchor_layers, lam=1.0, anchor_weight=1.0,
            gram_weight=1.0, distill_form="default",
            gram_form="default", gram_pairs=pairs, anchor_update="mean", anchor_momentum=0.99,
        )
    )
    config.update(overrides)
    return config


# ---------------------------------------------------------------- NumPy references (float64)


def np_diff(t, s):
    """eq. 8 for one pair of token vectors."""
    t, s = t.astype(np.float64), s.astype(np.float64)
    cos = np.dot(t, s) / (np.sqrt(np.dot(t, t)) * np.sqrt(np.dot(s, s)))
    return np.sqrt(np.sum((t - s) ** 2)) + 1.0 - cos


def np_distill(teacher, student, layers, form):
    per_image = []
    for b in range(teacher.shape[1]):
        total = 0.0
        for c in layers:
            diffs = [np_diff(teacher[c, b, p], student[c, b, p]) for p in range(teacher.shape[2])]
            if form == "default":
                total += np.mean(diffs)
            else:
                frobenius = np.sqrt(np.sum((teacher[c, b].astype(np.float64) - student[c, b]) ** 2))
                distances = [np.linalg.norm(teacher[c, b, p] - student[c, b, p].astype(np.float64))
                             for p in range(teacher.shape[2])]
                total += frobenius + np.sum(np.array(diffs) - np.array(distances))
        per_image.append(total)
    return np.mean(per_image)


def np_gram(teacher, student, pairs, form):
    per_image = []
    for b in range(teacher.shape[1]):
        total = 0.0
        for c1, c2 in pairs:
            t1, t2 = teacher[c1, b].astype(np.float64), teacher[c2, b].astype(np.float64)
            s1, s2 = student[c1, b].astype(np.float64), student[c2, b].astype(np.float64)
            gram_t = t1.T @ t2 / t1.shape[0]
            gram_s = s1.T @ s2 / s1.shape[0]
            norm = np.linalg.norm(gram_t - gram_s, "fro")
            total += norm / t1.shape[1] if form == "default" else norm
        per_image.append(total)
    return np.mean(per_image)


def np_anchor(student, anchor, anchor_layers):
    per_image = [
        sum(np.linalg.norm(student[c, b, 0].astype(np.float64) - anchor[i])
            for i, c in enumerate(anchor_layers))
        for b in range(student.shape[1])
    ]
    return np.mean(per_image)


# ---------------------------------------------------------------- tests


def test_token_diff_matches_numpy_per_token():
    teacher, student, _ = random_blocks(0, 2, 3, 7, 5)
    got = np.asarray(losses.token_diff(teacher, student))
    assert got.shape == (2, 3, 7)
    want = np.vectorize(lambda c, b, p: np_diff(teacher[c, b, p], student[c, b, p]))(
        *np.indices(got.shape)
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_token_diff_is_zero_for_equal_tokens_and_finite_for_zero_tokens():
    token_diff = jax.jit(losses.token_diff)
    tokens = jnp.asarray(np.random.default_rng(1).normal(size=(4, 8)), jnp.float32)
    np.testing.assert_allclose(token_diff(tokens, tokens), 0.0, atol=1e-6)
    zeros = jnp.zeros((3, 8))
    grad = jax.jit(jax.grad(lambda s: token_diff(zeros, s).sum()))(zeros)
    assert np.all(np.isfinite(token_diff(zeros, zeros)))
    assert np.all(np.isfinite(grad))


def test_gram_pairs_default_to_consecutive_layers():
    assert losses.gram_pairs(method_config((3, 6, 9, 11), (11,))) == ((3, 6), (6, 9), (9, 11))
    assert losses.gram_pairs(method_config((5,), (5,))) == ()
    assert losses.gram_pairs(method_config((1, 2), (2,), [[0, 2]])) == ((0, 2),)


@pytest.mark.parametrize("distill_form,gram_form", [("default", "paper"), ("paper", "default")])
@pytest.mark.parametrize("case", CASES)
def test_fcd_loss_terms_match_numpy(case, distill_form, gram_form):
    """Each term (distill eq. 3, Gram eq. 5, anchor eq. 2) and their sum (eq. 6), both forms."""
    num_layers, batch, tokens, width, layers, anchor_layers, pairs = case
    teacher, student, anchor_base = random_blocks(5, num_layers, batch, tokens, width)
    anchor = anchor_base[list(anchor_layers)]
    config = method_config(
        layers, anchor_layers, pairs, lam=0.7, distill_form=distill_form, gram_form=gram_form
    )
    # The teacher may stop after the last block any loss uses.
    needed = max(max(layers), max(anchor_layers), *(c for pair in pairs for c in pair)) + 1
    loss, metrics = jax.jit(lambda t, s, a: losses.fcd_loss(t, s, a, config))(
        teacher[:needed], student, anchor
    )

    distill = np_distill(teacher, student, layers, distill_form)
    gram = np_gram(teacher, student, losses.gram_pairs(config), gram_form)
    anchor_term = np_anchor(student, anchor, anchor_layers)
    np.testing.assert_allclose(metrics["distill"], distill, rtol=2e-5)
    np.testing.assert_allclose(metrics["gram"], gram, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(metrics["anchor"], anchor_term, rtol=2e-5)
    np.testing.assert_allclose(loss, distill + 0.7 * (anchor_term + gram), rtol=2e-5)
    np.testing.assert_array_equal(metrics["loss"], loss)
    assert all(value.dtype == jnp.float32 and value.shape == () for value in metrics.values())
    if len(layers) == 1 and not pairs:
        assert float(metrics["gram"]) == 0.0


@pytest.mark.parametrize("anchor_weight, gram_weight", [(0.0, 0.0), (0.0, 1.0), (1.0, 0.0),
                                                        (0.5, 2.0)])
def test_fcd_loss_weights_each_term(anchor_weight, gram_weight):
    """L = L_distill + lam * (w_anchor * L_anchor + w_gram * L_Gram) ("The paper's ablations")."""
    num_layers, batch, tokens, width, layers, anchor_layers, pairs = CASES[2]
    teacher, student, anchor_base = random_blocks(8, num_layers, batch, tokens, width)
    anchor = anchor_base[list(anchor_layers)]
    config = method_config(layers, anchor_layers, pairs, lam=0.7, anchor_weight=anchor_weight,
                           gram_weight=gram_weight)
    loss, _ = jax.jit(lambda t, s, a: losses.fcd_loss(t, s, a, config))(teacher, student, anchor)
    distill = np_distill(teacher, student, layers, "default")
    gram = np_gram(teacher, student, losses.consecutive_pairs(layers), "default")
    anchor_term = np_anchor(student, anchor, anchor_layers)
    want = distill + 0.7 * (anchor_weight * anchor_term + gram_weight * gram)
    np.testing.assert_allclose(loss, want, rtol=2e-5)
    if anchor_weight == gram_weight == 0.0:
        np.testing.assert_allclose(loss, distill, rtol=2e-5)  # distillation alone


def test_fcd_loss_computes_bf16_inputs_in_float32():
    teacher, student, anchor_base = random_blocks(6, 4, 2, 5, 8)
    config = method_config((1, 3), (3,))
    loss_of = jax.jit(lambda t, s: losses.fcd_loss(t, s, anchor_base[3:], config)[0])
    teacher_bf16, student_bf16 = (jnp.asarray(x, jnp.bfloat16) for x in (teacher, student))
    loss = loss_of(teacher_bf16, student_bf16)
    assert loss.dtype == jnp.float32
    want = loss_of(teacher_bf16.astype(jnp.float32), student_bf16.astype(jnp.float32))
    np.testing.assert_allclose(loss, want, rtol=1e-6)


def test_fcd_loss_gradient_matches_finite_differences_and_skips_anchor_and_teacher():
    teacher, student, anchor_base = random_blocks(7, 3, 2, 4, 6)
    anchor = jnp.asarray(anchor_base[1:])
    config = method_config((0, 2), (1, 2), distill_form="paper", gram_form="default")
    loss_of = jax.jit(lambda t, s, a: losses.fcd_loss(t, s, a, config)[0])
    grad_t, grad_s, grad_a = jax.jit(jax.grad(loss_of, argnums=(0, 1, 2)))(teacher, student, anchor)

    assert np.all(np.isfinite(grad_s)) and np.abs(grad_s).max() > 0
    np.testing.assert_array_equal(grad_a, 0.0)
    np.testing.assert_array_equal(grad_t, 0.0)
    direction = np.random.default_rng(8).normal(size=student.shape).astype(np.float32)
    step = 1e-2
    finite_difference = (
        loss_of(teacher, student + step * direction, anchor)
        - loss_of(teacher, student - step * direction, anchor)
    ) / (2 * step)
    np.testing.assert_allclose(np.sum(grad_s * direction), finite_difference, rtol=5e-3)


def test_anchor_running_mean_is_exact_mean_after_one_pass():
    rng = np.random.default_rng(9)
    teacher_cls = (rng.normal(size=(2, 23, 16)) * 5 + 3).astype(np.float32)  # [layers, images, D]
    config = method_config((0,), (0, 1))
    update = jax.jit(lambda a, n, cls: losses.update_anchor(a, n, cls, config))
    for dtype in (jnp.float32, jnp.int32):  # the step passes int32 step * batch
        anchor = jnp.zeros((2, 16))
        for start in range(0, 23, 5):  # batches of 5, 5, 5, 5 and 3
            batch = teacher_cls[:, start:start + 5]
            anchor = update(anchor, jnp.asarray(start, dtype), batch)
        np.testing.assert_allclose(anchor, teacher_cls.astype(np.float64).mean(axis=1), atol=1e-6)


def test_anchor_ema_follows_its_recurrence():
    rng = np.random.default_rng(10)
    batches = rng.normal(size=(6, 1, 4, 8)).astype(np.float32)  # 6 batches of 4 images
    config = method_config((0,), (0,), anchor_update="ema", anchor_momentum=0.9)
    anchor = jnp.full((1, 8), 123.0)
    want = None
    for step, batch in enumerate(batches):
        anchor = losses.update_anchor(anchor, jnp.asarray(4 * step), jnp.asarray(batch), config)
        batch_mean = batch.astype(np.float64).mean(axis=1)
        want = batch_mean if want is None else 0.9 * want + 0.1 * batch_mean
        np.testing.assert_allclose(anchor, want, rtol=1e-5, atol=1e-6)


def test_update_anchor_passes_no_gradient():
    config = method_config((0,), (0,))
    anchor_of = lambda cls: losses.update_anchor(jnp.zeros((1, 4)), jnp.ones(()), cls, config)
    grad = jax.grad(lambda cls: anchor_of(cls).sum())(jnp.ones((1, 3, 4)))
    np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(distill_form="l2"), "unknown distill_form"),
        (dict(gram_form="fsp"), "unknown gram_form"),
        (dict(layers=(1, 4)), "outside 0..3"),
        (dict(layers=()), "empty"),
        (dict(anchor_layers=(-1,)), "outside 0..3"),
        (dict(gram_pairs=((1, 9),)), "outside 0..3"),
        (dict(gram_pairs=(1, 3)), "pairs of block indices"),
    ],
)
def test_fcd_loss_rejects_bad_config_in_one_line(overrides, message):
    teacher, student, anchor_base = random_blocks(11, 4, 2, 5, 8)
    config = method_config((1, 3), (3,))
    config.update(overrides)
    with pytest.raises(FcdError, match=message) as error:
        losses.fcd_loss(teacher, student, anchor_base[:1], config)
    assert "\n" not in str(error.value)


def test_bad_anchor_shape_and_anchor_update_raise():
    teacher, student, anchor_base = random_blocks(12, 4, 2, 5, 8)
    with pytest.raises(FcdError, match="anchor has shape"):
        losses.fcd_loss(teacher, student, anchor_base[:2], method_config((1, 3), (3,)))
    with pytest.raises(FcdError, match="unknown anchor_update"):
        losses.update_anchor(
            anchor_base[:1], jnp.zeros(()), teacher[:1, :, 0],
            method_config((1,), (3,), anchor_update="median"),
        )
