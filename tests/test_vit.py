"""fcd_jax/models/vit.py: parameter counts, outputs, scan/remat/truncation equivalence, and
layer scale and register tokens against a plain NumPy ViT."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from fcd_jax.models.vit import (
    ATTENTION_RESIDUALS,
    REMAT_POLICIES,
    build_vit,
    heads_first_attention,
    parse_variant,
    truncate_params,
)

TINY = dict(variant="Ti/16", patch_size=8, width=32, depth=3, num_heads=4, mlp_dim=64)
IMAGE_SIZE = 32


def count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def reference_count(width, depth, mlp_dim, patch_size, image_size=224) -> int:
    """Plain arithmetic over the ViT's layers (no classification head)."""
    tokens = 1 + (image_size // patch_size) ** 2
    stem = patch_size * patch_size * 3 * width + width + width + tokens * width
    attention = 4 * (width * width + width)  # query, key, value, out
    mlp = width * mlp_dim + mlp_dim + mlp_dim * width + width
    block = 2 * 2 * width + attention + mlp
    return stem + depth * block + 2 * width


# vit_jax's models_test.py pins these with the 1000-class head (B/16: 86,567,656); ours has none:
# subtract width * 1000 + 1000.
PINNED_COUNTS = {"Ti/16": 5_524_416, "S/16": 21_665_664, "B/16": 85_798_656, "L/16": 303_301_632}
VIT_JAX_WITH_HEAD = {"Ti/16": 5_717_416, "S/16": 22_050_664, "B/16": 86_567_656,
                     "L/16": 304_326_632}


@pytest.mark.parametrize("variant", sorted(PINNED_COUNTS))
def test_parameter_count_is_pinned(variant):
    model = build_vit({"variant": variant})
    images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
    arch = parse_variant(variant)
    assert count(shapes) == PINNED_COUNTS[variant]
    assert count(shapes) == reference_count(arch["width"], arch["depth"], arch["mlp_dim"], 16)
    assert count(shapes) == VIT_JAX_WITH_HEAD[variant] - (arch["width"] * 1000 + 1000)


def test_param_tree_layout():
    shapes = jax.eval_shape(
        build_vit(TINY).init, jax.random.key(0),
        jax.ShapeDtypeStruct((1, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32))["params"]
    assert shapes["embedding_kernel"].shape == (8, 8, 3, 32)
    assert shapes["pos_embedding"].shape == (1, 1 + 16, 32)
    assert shapes["blocks"]["attn"]["query"]["kernel"].shape == (3, 32, 4, 8)
    assert shapes["blocks"]["attn"]["out"]["kernel"].shape == (3, 4, 8, 32)
    assert shapes["blocks"]["mlp"]["fc1"]["kernel"].shape == (3, 32, 64)
    assert set(shapes) == {"embedding_kernel", "embedding_bias", "cls", "pos_embedding", "blocks",
                           "encoder_norm"}


def random_params(model, image_size: int, seed: int = 0):
    """Random values for every parameter (LayerNorm scales and biases included), from NumPy."""
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32), shapes)


@functools.cache
def jitted_apply(model):
    return jax.jit(model.apply)


def apply(model, params, images):
    return jitted_apply(model)({"params": params}, images)


@pytest.fixture(scope="module")
def tiny():
    params = random_params(build_vit(TINY), IMAGE_SIZE)
    images = np.random.default_rng(1).standard_normal((2, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    return params, images, apply(build_vit(TINY), params, images)


def test_output_shapes_and_encoded_is_layernorm_of_last_block(tiny):
    params, images, outputs = tiny
    assert outputs["blocks"].shape == (3, 2, 17, 32)
    assert outputs["encoded"].shape == (2, 17, 32)
    last = np.asarray(outputs["blocks"][-1], np.float64)
    mean, var = last.mean(-1, keepdims=True), last.var(-1, keepdims=True)
    norm = params["encoder_norm"]
    expected = (last - mean) / np.sqrt(var + 1e-6) * norm["scale"] + norm["bias"]
    np.testing.assert_allclose(outputs["encoded"], expected, rtol=1e-4, atol=1e-4)


def test_first_tokens_are_patch_embedding_plus_position(tiny):
    """Patchify in NumPy; a block with all-zero weights passes its input through unchanged."""
    params, images, _ = tiny
    zero_blocks = jax.tree.map(np.zeros_like, truncate_params(params, 2)["blocks"])
    params_2 = dict(truncate_params(params, 2), blocks=zero_blocks)
    out = apply(build_vit(TINY, depth=2), params_2, images)["blocks"]
    x = np.asarray(images)
    patches = x.reshape(2, 4, 8, 4, 8, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 16, 8 * 8 * 3)
    kernel = np.asarray(params["embedding_kernel"]).reshape(-1, 32)
    embedded = patches @ kernel + np.asarray(params["embedding_bias"])
    cls = np.broadcast_to(np.asarray(params["cls"]), (2, 1, 32))
    expected = np.concatenate([cls, embedded], 1) + np.asarray(params["pos_embedding"])
    np.testing.assert_allclose(out[0], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[1], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("option", [dict(scan_layers=False), dict(remat=True),
                                    dict(remat=True, remat_policy="dots")])
def test_scan_and_remat_options_give_identical_numbers(tiny, option):
    params, images, outputs = tiny
    other = apply(build_vit(dict(TINY, **option)), params, images)
    for key in ("blocks", "encoded"):
        np.testing.assert_allclose(other[key], outputs[key], rtol=1e-6, atol=1e-6)


def test_attention_implementations_give_the_same_numbers(tiny):
    """JAX's tokens-first attention against the CPU's heads-first one (the default here): other
    matmul orders, so float32 rounding, not bits."""
    params, images, outputs = tiny
    other = apply(build_vit(dict(TINY, attention_implementation="xla")), params, images)
    for key in ("blocks", "encoded"):
        np.testing.assert_allclose(other[key], outputs[key], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("option", [dict(remat=True, remat_policy="nothing"),
                                    dict(remat=True, remat_policy="dots"),
                                    dict(attention_implementation="xla")])
def test_remat_and_attention_options_give_the_same_gradients(tiny, option):
    """What the backward pass recomputes instead of keeping, and which attention program runs,
    change no gradient (to float32 rounding of each leaf's scale: the programs are fused
    differently; the key bias's gradient is 0 in exact arithmetic, softmax ignoring a constant
    per row, so its floor is a thousandth of the largest gradient)."""
    params, images, _ = tiny

    def gradients(model):
        def loss(params):
            out = model.apply({"params": params}, images)
            return jnp.sum(out["blocks"] ** 2) + jnp.sum(out["encoded"])
        return jax.grad(loss)(params)

    plain = gradients(build_vit(TINY))
    rematerialised = gradients(build_vit(dict(TINY, **option)))
    largest = max(np.abs(leaf).max() for leaf in jax.tree.leaves(plain))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=0, atol=1e-5 * max(np.abs(b).max(), 1e-3 * largest)), rematerialised, plain)


def test_truncated_params_give_the_same_first_blocks(tiny):
    params, images, outputs = tiny
    truncated = truncate_params(params, 2)
    assert truncated["blocks"]["ln1"]["scale"].shape[0] == 2
    short = apply(build_vit(TINY, depth=2), truncated, images)
    np.testing.assert_allclose(short["blocks"], outputs["blocks"][:2], rtol=1e-6, atol=1e-6)


def test_image_size_not_multiple_of_patch_is_a_clear_error(tiny):
    params, _, _ = tiny
    with pytest.raises(ValueError, match="not a multiple of the patch size 8"):
        build_vit(TINY).apply({"params": params}, jnp.zeros((1, 30, 30, 3)))


def test_unknown_variant_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown ViT variant 'X/16'"):
        parse_variant("X/16")


# ------------------------------------------------------------------------------------------------
# Layer scale and register tokens, against a plain NumPy ViT.


def numpy_vit(params, images, patch: int, layer_scale: bool, num_registers: int,
              eps: float = 1e-6):
    """The ViT forward in float64 NumPy: patchify, cls + positions, registers after cls, then
    pre-LN blocks ``x + ls1 * attn(ln1 x)``, ``x + ls2 * mlp(ln2 x)``; registers dropped."""
    from scipy.special import erf

    p = jax.tree.map(lambda leaf: np.asarray(leaf, np.float64), params)
    x = np.asarray(images, np.float64)
    batch, size = x.shape[0], x.shape[1]
    grid = size // patch
    patches = x.reshape(batch, grid, patch, grid, patch, 3).transpose(0, 1, 3, 2, 4, 5)
    tokens = patches.reshape(batch, grid * grid, -1) @ p["embedding_kernel"].reshape(
        -1, p["embedding_bias"].size) + p["embedding_bias"]
    cls = np.broadcast_to(p["cls"], (batch, 1, tokens.shape[-1]))
    tokens = np.concatenate([cls, tokens], 1) + p["pos_embedding"]
    if num_registers:
        registers = np.broadcast_to(p["registers"], (batch, num_registers, tokens.shape[-1]))
        tokens = np.concatenate([tokens[:, :1], registers, tokens[:, 1:]], 1)

    def layernorm(t, n):
        return (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, keepdims=True) + eps) * \
            n["scale"] + n["bias"]

    def drop(t):
        return np.concatenate([t[:, :1], t[:, 1 + num_registers:]], 1)

    outputs = []
    for c in range(p["blocks"]["ln1"]["scale"].shape[0]):
        b = jax.tree.map(lambda leaf, c=c: leaf[c], p["blocks"])
        h = layernorm(tokens, b["ln1"])
        q, k, v = (np.einsum("btd,dhk->bthk", h, b["attn"][n]["kernel"]) + b["attn"][n]["bias"]
                   for n in ("query", "key", "value"))
        logits = np.einsum("bqhk,bthk->bhqt", q, k) / np.sqrt(q.shape[-1])
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        attended = np.einsum("bhqt,bthk->bqhk", weights, v)
        attn = np.einsum("bqhk,hkd->bqd", attended, b["attn"]["out"]["kernel"]) + \
            b["attn"]["out"]["bias"]
        tokens = tokens + (b["ls1"] if layer_scale else 1) * attn
        h = layernorm(tokens, b["ln2"]) @ b["mlp"]["fc1"]["kernel"] + b["mlp"]["fc1"]["bias"]
        h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
        mlp = h @ b["mlp"]["fc2"]["kernel"] + b["mlp"]["fc2"]["bias"]
        tokens = tokens + (b["ls2"] if layer_scale else 1) * mlp
        outputs.append(drop(tokens))
    return np.stack(outputs), layernorm(drop(tokens), p["encoder_norm"])


@pytest.mark.parametrize(("layer_scale", "num_registers"), [(False, 0), (True, 0), (True, 4),
                                                            (False, 1)])
def test_layer_scale_and_registers_match_numpy(layer_scale, num_registers):
    config = dict(TINY, layer_scale=layer_scale, num_registers=num_registers)
    model = build_vit(config)
    params = random_params(model, IMAGE_SIZE, seed=3)
    images = np.random.default_rng(4).standard_normal((2, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    ours = apply(model, params, images)
    blocks, encoded = numpy_vit(params, images, 8, layer_scale, num_registers)
    assert ours["blocks"].shape == blocks.shape == (3, 2, 17, 32)  # registers dropped
    assert ours["encoded"].shape == encoded.shape == (2, 17, 32)
    for got, want in ((ours["blocks"], blocks), (ours["encoded"], encoded)):
        error = np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max()
        assert error <= 1e-5, error
    if layer_scale:
        assert params["blocks"]["ls1"].shape == params["blocks"]["ls2"].shape == (3, 32)
    if num_registers:
        assert params["registers"].shape == (1, num_registers, 32)
        # The registers take part in attention: other register values, other patch outputs.
        other = np.random.default_rng(5).standard_normal(params["registers"].shape)
        moved = dict(params, registers=params["registers"] + other.astype(np.float32))
        assert np.abs(apply(model, moved, images)["blocks"][0] - ours["blocks"][0]).max() > 1e-3


def test_layer_scale_of_ones_is_the_plain_vit(tiny):
    params, images, outputs = tiny
    ones = np.ones((3, 32), np.float32)
    scaled = dict(params, blocks=dict(params["blocks"], ls1=ones, ls2=ones))
    out = apply(build_vit(dict(TINY, layer_scale=True)), scaled, images)
    np.testing.assert_array_equal(out["blocks"], outputs["blocks"])


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_heads_first_attention_gradients_are_autodiffs(dtype, tolerance):
    """Its hand-written backward (flash attention's, from the output and the log-sum-exp) gives
    the gradients JAX's autodiff gives through a plain softmax attention, in float32 and in
    bfloat16 (which keeps the logits and the softmax in float32)."""
    rng = np.random.default_rng(1)
    query, key, value, cotangent = (
        jnp.asarray(rng.standard_normal((2, 17, 3, 8)), dtype) for _ in range(4))

    def plain(query, key, value):
        logits = jnp.einsum("bthd,bshd->bhts", query, key, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(logits / np.sqrt(8), axis=-1)
        return jnp.einsum("bhts,bshd->bthd", probs, value.astype(jnp.float32))

    def gradients(attention):
        return jax.grad(lambda *qkv: jnp.sum(attention(*qkv).astype(jnp.float32) * cotangent),
                        argnums=(0, 1, 2))(query, key, value)

    for ours, theirs in zip(gradients(heads_first_attention), gradients(plain), strict=True):
        scale = float(jnp.abs(theirs.astype(jnp.float32)).max())
        np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(theirs, np.float32),
                                   atol=tolerance * scale)


def test_rematerialised_block_keeps_the_attention_output(capsys):
    """Under remat_policy "dots" the backward pass reads the attention's output and log-sum-exp
    rather than recomputing the attention forward (the products of q k^T with v)."""
    query = jnp.ones((2, 5, 3, 4))
    policy = REMAT_POLICIES["dots"]
    block = jax.checkpoint(lambda q: heads_first_attention(q, 2 * q, 3 * q).sum(), policy=policy)
    print_saved_residuals(block, query)
    saved = capsys.readouterr().out
    assert all(f"named '{name}'" in saved for name in ATTENTION_RESIDUALS), saved


def test_defaults_have_no_layer_scale_nor_registers():
    shapes = jax.eval_shape(
        build_vit({"variant": "B/14"}).init, jax.random.key(0),
        jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))["params"]
    assert "registers" not in shapes and "ls1" not in shapes["blocks"]
    assert shapes["pos_embedding"].shape == (1, 1 + 16 * 16, 768)  # patch 14 at 224: 16x16
    assert shapes["embedding_kernel"].shape == (14, 14, 3, 768)


def test_heads_first_attention_is_dot_product_attention():
    """The CPU's attention equals JAX's own softmax(q k^T / sqrt(d)) v on random inputs, and a
    plain NumPy one, in the [batch, tokens, heads, head_dim] layout both take."""
    rng = np.random.default_rng(0)
    query, key, value = (rng.standard_normal((2, 17, 3, 8)).astype(np.float32) for _ in range(3))
    ours = np.asarray(heads_first_attention(query, key, value))
    theirs = np.asarray(jax.nn.dot_product_attention(query, key, value, implementation="xla"))
    logits = np.einsum("bthd,bshd->bhts", query, key) / np.sqrt(8)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    reference = np.einsum("bhts,bshd->bthd", probs, value)
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
