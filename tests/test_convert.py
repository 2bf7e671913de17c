"""fcd_jax/convert (ViT layouts): converted teachers compute what the PyTorch reference computes.

One small HuggingFace ``ViTModel`` with random weights is the reference. Its weights are also
written by hand in the timm and Google layouts (from the documented key mappings; timm itself
would pull another torch), and every layout must convert to the same params and features.
"""

import argparse
import functools
import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conversion_checks import (  # noqa: E402
    HF_VIT_NAMES,
    TOLERANCE,
    features,
    jitted_apply,
    one_line_error,
    relative_error,
    timm_block,
    torch_save,
)
from safetensors.numpy import save_file  # noqa: E402

from fcd_jax import checkpoints, convert  # noqa: E402
from fcd_jax.convert import cli  # noqa: E402
from fcd_jax.errors import CheckpointError  # noqa: E402
from fcd_jax.models.vit import build_vit  # noqa: E402

WIDTH, DEPTH, HEADS, MLP, IMAGE, PATCH = 64, 4, 4, 128, 32, 8
HEAD_DIM = WIDTH // HEADS




@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A HuggingFace ViT with random non-trivial weights, saved; its outputs on random images."""
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
        intermediate_size=MLP, image_size=IMAGE, patch_size=PATCH, attn_implementation="eager")
    model = transformers.ViTModel(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("layernorm_before.weight", "layernorm_after.weight",
                              "layernorm.weight")):
                param.copy_(1 + 0.3 * torch.randn_like(param))
            elif param.ndim == 1 or ("embeddings" in name and "projection" not in name):
                param.copy_(0.3 * torch.randn_like(param))  # biases, cls token, positions
            else:
                param.copy_(torch.randn_like(param) / param[0].numel() ** 0.5)
    hf_dir = tmp_path_factory.mktemp("hf") / "vit-tiny"
    model.save_pretrained(hf_dir)
    images = np.random.default_rng(0).standard_normal((2, IMAGE, IMAGE, 3)).astype(np.float32)
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)),
                    output_hidden_states=True)
    from safetensors.numpy import load_file

    return dict(
        hf_dir=hf_dir, images=images, model=model,
        hub_state=load_file(hf_dir / "model.safetensors"),  # the names files on the Hub use
        blocks=np.stack([h.numpy() for h in out.hidden_states[1:]]),
        encoded=out.last_hidden_state.numpy(),
    )


# ------------------------------------------------------------------------------------------------
# The same weights in other layouts, written from the documented mappings.


def hub_layer(hub: dict, i: int, name: str) -> np.ndarray:
    return hub[f"encoder.layer.{i}.{name}"]


def timm_state(hub: dict) -> dict:
    state = {
        "patch_embed.proj.weight": hub["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": hub["embeddings.patch_embeddings.projection.bias"],
        "cls_token": hub["embeddings.cls_token"],
        "pos_embed": hub["embeddings.position_embeddings"],
        "norm.weight": hub["layernorm.weight"], "norm.bias": hub["layernorm.bias"],
        "head.weight": np.ones((10, WIDTH), np.float32), "head.bias": np.ones(10, np.float32),
    }
    for i in range(DEPTH):
        state |= timm_block(hub, i, f"blocks.{i}", HF_VIT_NAMES)
    return state


def google_state(hub: dict, prefix: str = "") -> dict:
    """vit_jax layout: Flax kernels ``[in, out]``; attention ``[D, H, hd]`` and ``[H, hd, D]``."""
    conv = hub["embeddings.patch_embeddings.projection.weight"]
    state = {
        "embedding/kernel": conv.transpose(2, 3, 1, 0),
        "embedding/bias": hub["embeddings.patch_embeddings.projection.bias"],
        "cls": hub["embeddings.cls_token"],
        "Transformer/posembed_input/pos_embedding": hub["embeddings.position_embeddings"],
        "Transformer/encoder_norm/scale": hub["layernorm.weight"],
        "Transformer/encoder_norm/bias": hub["layernorm.bias"],
        "head/kernel": np.ones((WIDTH, 10), np.float32), "head/bias": np.ones(10, np.float32),
        "pre_logits/kernel": np.ones((WIDTH, WIDTH), np.float32),
    }
    for i in range(DEPTH):
        layer = functools.partial(hub_layer, hub, i)
        block = f"Transformer/encoderblock_{i}/"
        for flax_name, hf_name in (("LayerNorm_0", "layernorm_before"),
                                   ("LayerNorm_2", "layernorm_after")):
            state[f"{block}{flax_name}/scale"] = layer(f"{hf_name}.weight")
            state[f"{block}{flax_name}/bias"] = layer(f"{hf_name}.bias")
        for n in ("query", "key", "value"):
            weight = layer(f"attention.attention.{n}.weight")
            attn = f"{block}MultiHeadDotProductAttention_1/{n}/"
            state[attn + "kernel"] = weight.T.reshape(WIDTH, HEADS, HEAD_DIM)
            state[attn + "bias"] = layer(f"attention.attention.{n}.bias").reshape(HEADS, HEAD_DIM)
        out = f"{block}MultiHeadDotProductAttention_1/out/"
        state[out + "kernel"] = layer("attention.output.dense.weight").T.reshape(
            HEADS, HEAD_DIM, WIDTH)
        state[out + "bias"] = layer("attention.output.dense.bias")
        for dense, hf_name in (("Dense_0", "intermediate.dense"), ("Dense_1", "output.dense")):
            state[f"{block}MlpBlock_3/{dense}/kernel"] = layer(f"{hf_name}.weight").T
            state[f"{block}MlpBlock_3/{dense}/bias"] = layer(f"{hf_name}.bias")
    return {prefix + key: value for key, value in state.items()}



def write_layout(layout: str, reference: dict, directory) -> tuple:
    """Writes ``reference``'s weights as ``layout``; returns (path, convert kwargs)."""
    hub = reference["hub_state"]
    if layout == "hf_folder_safetensors":
        return reference["hf_dir"], {}
    if layout == "hf_folder_bin":  # pytorch_model.bin, with the module names of transformers 5.24
        folder = directory / "hf_bin"
        folder.mkdir()
        (folder / "config.json").write_text((reference["hf_dir"] / "config.json").read_text())
        torch.save(reference["model"].state_dict(), folder / "pytorch_model.bin")
        return folder, {}
    if layout == "hf_file_classifier":  # ViTForImageClassification weights, no config.json
        state = {f"vit.{k}": v for k, v in hub.items() if not k.startswith("pooler.")}
        state |= {"classifier.weight": np.ones((10, WIDTH), np.float32),
                  "classifier.bias": np.ones(10, np.float32)}
        save_file(state, directory / "vit_classifier.safetensors")
        return directory / "vit_classifier.safetensors", dict(num_heads=HEADS)
    if layout == "timm_safetensors":
        save_file(timm_state(hub), directory / "timm.safetensors")
        return directory / "timm.safetensors", dict(num_heads=HEADS)
    if layout == "timm_pth":
        torch_save(timm_state(hub), directory / "timm.pth")
        return directory / "timm.pth", dict(num_heads=HEADS)
    if layout == "google_npz":
        np.savez(directory / "ViT-tiny.npz", **google_state(hub))
        return directory / "ViT-tiny.npz", {}
    if layout == "google_npz_opt_target":  # older vit_jax files keep params under opt/target/
        state = google_state(hub, prefix="opt/target/") | {"opt/state/step": np.zeros(1)}
        np.savez(directory / "ViT-tiny-opt.npz", **state)
        return directory / "ViT-tiny-opt.npz", {}
    raise ValueError(layout)


EXPECTED_EPS = {"hf": 1e-12, "timm": 1e-6, "google": 1e-6}
LAYOUTS = ["hf_folder_safetensors", "hf_folder_bin", "hf_file_classifier", "timm_safetensors",
           "timm_pth", "google_npz", "google_npz_opt_target"]



@pytest.fixture(scope="module")
def hf_converted(reference):
    return convert.convert_checkpoint(reference["hf_dir"])


def test_huggingface_conversion_matches_pytorch(reference, hf_converted):
    params, arch = hf_converted
    assert {k: arch[k] for k in convert.ARCH_FIELDS} == dict(
        patch_size=PATCH, width=WIDTH, depth=DEPTH, num_heads=HEADS, mlp_dim=MLP,
        layernorm_eps=1e-12, gelu_approximate=False, layer_scale=False, num_registers=0)
    assert arch["image_size"] == IMAGE and arch["format"] == "huggingface"
    assert arch["family"] == "vit" and arch["image_mean"] is None  # no preprocessor_config.json
    ours = features(params, arch, reference["images"])
    assert ours["blocks"].shape == reference["blocks"].shape == (DEPTH, 2, 17, WIDTH)
    errors = [relative_error(ours["blocks"][c], reference["blocks"][c]) for c in range(DEPTH)]
    errors.append(relative_error(ours["encoded"], reference["encoded"]))
    assert max(errors) <= TOLERANCE, errors
    # The comparison can fail: the reference is far from a trivially-similar answer.
    assert relative_error(ours["blocks"][1], reference["blocks"][2]) > 0.1


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_gives_the_same_params_and_features(reference, hf_converted, layout,
                                                         tmp_path):
    path, kwargs = write_layout(layout, reference, tmp_path)
    params, arch = convert.convert_checkpoint(path, **kwargs)
    assert arch["format"] == layout.split("_")[0].replace("hf", "huggingface")
    assert arch["layernorm_eps"] == EXPECTED_EPS[layout.split("_")[0]]
    expected_params, expected_arch = hf_converted
    jax.tree.map(np.testing.assert_array_equal, params, expected_params)
    for field in ("patch_size", "width", "depth", "num_heads", "mlp_dim", "image_size"):
        assert arch[field] == expected_arch[field], field
    ours = features(params, arch, reference["images"])
    error = max(relative_error(ours["blocks"], reference["blocks"]),
                relative_error(ours["encoded"], reference["encoded"]))
    print(f"\n{layout}: max relative error vs PyTorch {error:.1e}")
    assert error <= TOLERANCE


def test_big_vision_scanned_layout_without_cls_position(reference, hf_converted, tmp_path):
    """big_vision: ``params/`` prefix, ``MultiHeadDotProductAttention_0``, ``LayerNorm_1``,
    ``MlpBlock_0``, blocks stacked under ``encoderblock/``, and no position for the cls token."""
    google = google_state(reference["hub_state"])
    state = {"params/embedding/kernel": google["embedding/kernel"],
             "params/embedding/bias": google["embedding/bias"], "params/cls": google["cls"],
             "params/pos_embedding": google["Transformer/posembed_input/pos_embedding"][:, 1:]}
    for key in ("scale", "bias"):
        state[f"params/Transformer/encoder_norm/{key}"] = google[f"Transformer/encoder_norm/{key}"]
    renames = {"MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
               "LayerNorm_2": "LayerNorm_1", "MlpBlock_3": "MlpBlock_0"}
    block_keys = [k.split("/", 2)[2] for k in google if k.startswith("Transformer/encoderblock_0/")]
    for key in block_keys:
        new_key = "/".join(renames.get(part, part) for part in key.split("/"))
        state[f"params/Transformer/encoderblock/{new_key}"] = np.stack(
            [google[f"Transformer/encoderblock_{i}/{key}"] for i in range(DEPTH)])
    np.savez(tmp_path / "big_vision.npz", **state)
    params, _ = convert.convert_checkpoint(tmp_path / "big_vision.npz")
    expected = hf_converted[0]
    expected = expected | {"pos_embedding": np.concatenate(
        [np.zeros((1, 1, WIDTH), np.float32), expected["pos_embedding"][:, 1:]], axis=1)}
    jax.tree.map(np.testing.assert_array_equal, params, expected)


# ------------------------------------------------------------------------------------------------
# Position-embedding interpolation.


def bilinear_align_corners(grid: np.ndarray, size: int) -> np.ndarray:
    """Plain NumPy reference: output pixel i samples input position i * (old - 1) / (size - 1)."""
    old = grid.shape[0]
    coords = np.arange(size) * (old - 1) / (size - 1)
    low = np.clip(np.floor(coords).astype(int), 0, old - 2)
    frac = coords - low
    rows = grid[low] * (1 - frac)[:, None, None] + grid[low + 1] * frac[:, None, None]
    return rows[:, low] * (1 - frac)[None, :, None] + rows[:, low + 1] * frac[None, :, None]


def test_interpolating_to_the_same_size_is_the_identity(reference, hf_converted):
    params, _ = convert.convert_checkpoint(reference["hf_dir"], image_size=IMAGE)
    np.testing.assert_array_equal(params["pos_embedding"], hf_converted[0]["pos_embedding"])


def test_google_position_embedding_is_interpolated_bilinearly(reference, hf_converted, tmp_path):
    """vit_jax resamples with scipy.ndimage.zoom(order=1), corners aligned."""
    npz, _ = write_layout("google_npz", reference, tmp_path)
    params, arch = convert.convert_checkpoint(npz, image_size=48)
    assert arch["image_size"] == 48 and arch["pos_interpolation"] == "bilinear"
    old = hf_converted[0]["pos_embedding"]
    new = params["pos_embedding"]
    assert new.shape == (1, 1 + 6 * 6, WIDTH)
    np.testing.assert_array_equal(new[:, 0], old[:, 0])  # cls slot kept
    expected = bilinear_align_corners(old[0, 1:].reshape(4, 4, WIDTH), 6).reshape(36, WIDTH)
    np.testing.assert_allclose(new[0, 1:], expected, rtol=1e-5, atol=1e-6)
    for name in ("blocks", "cls", "embedding_kernel"):  # nothing else changes
        jax.tree.map(np.testing.assert_array_equal, params[name], hf_converted[0][name])


def test_huggingface_vit_at_another_size_matches_its_own_interpolation(reference):
    """HF ``ViTModel(interpolate_pos_encoding=True)`` resamples bicubically: so do we."""
    params, arch = convert.convert_checkpoint(reference["hf_dir"], image_size=48)
    assert arch["pos_interpolation"] == "bicubic"
    images = np.random.default_rng(2).standard_normal((2, 48, 48, 3)).astype(np.float32)
    with torch.no_grad():
        out = reference["model"](pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)),
                                 output_hidden_states=True, interpolate_pos_encoding=True)
    ours = features(params, arch, images)
    blocks = np.stack([h.numpy() for h in out.hidden_states[1:]])
    error = max(relative_error(ours["blocks"], blocks),
                relative_error(ours["encoded"], out.last_hidden_state.numpy()))
    print(f"\nHF ViT at 48 px (positions resampled 4x4 -> 6x6): max relative error {error:.1e}")
    assert error <= TOLERANCE


def test_image_size_not_multiple_of_patch_is_one_line_error(reference):
    with pytest.raises(CheckpointError, match="not a multiple of the checkpoint's patch size 8"):
        convert.convert_checkpoint(reference["hf_dir"], image_size=30)


# ------------------------------------------------------------------------------------------------
# Bad files: one line naming the problem.



@pytest.mark.parametrize("suffix", [".npz", ".safetensors", ".pth", ".bin"])
def test_corrupt_file(tmp_path, suffix):
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    message = one_line_error(path, "corrupt or truncated")
    assert str(path) in message


@pytest.mark.parametrize("layout", ["timm_safetensors", "timm_pth", "google_npz"])
def test_truncated_file(reference, tmp_path, layout):
    path, kwargs = write_layout(layout, reference, tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    one_line_error(path, "corrupt or truncated", **kwargs)


def test_unknown_format_and_unknown_layout(tmp_path):
    (tmp_path / "weights.ckpt").write_bytes(b"x")
    one_line_error(tmp_path / "weights.ckpt", "unknown checkpoint format")
    save_file({"conv1.weight": np.ones((8, 3, 7, 7), np.float32)}, tmp_path / "resnet.safetensors")
    one_line_error(tmp_path / "resnet.safetensors", "unknown checkpoint layout.*conv1.weight")
    one_line_error(tmp_path / "missing.npz", "does not exist")
    (tmp_path / "empty_dir").mkdir()
    one_line_error(tmp_path / "empty_dir", "without config.json")


def test_wrong_architecture(reference, tmp_path):
    state = timm_state(reference["hub_state"])
    qk_norm = {"blocks.0.attn.q_norm.weight": np.ones(HEAD_DIM, np.float32)}
    save_file(state | qk_norm, tmp_path / "qk_norm.safetensors")
    one_line_error(tmp_path / "qk_norm.safetensors", "no place for: blocks.0.attn.q_norm.weight",
                   num_heads=HEADS)
    del state["norm.weight"]
    save_file(state, tmp_path / "no_norm.safetensors")
    one_line_error(tmp_path / "no_norm.safetensors", "has no 'norm.weight'", num_heads=HEADS)
    save_file(timm_state(reference["hub_state"]), tmp_path / "odd_width.safetensors")
    one_line_error(tmp_path / "odd_width.safetensors", "cannot infer the number of heads for width")
    mlp_mismatch = timm_state(reference["hub_state"])
    mlp_mismatch["blocks.2.mlp.fc1.weight"] = np.ones((2 * MLP, WIDTH), np.float32)
    save_file(mlp_mismatch, tmp_path / "mixed.safetensors")
    one_line_error(tmp_path / "mixed.safetensors", "inconsistent shapes", num_heads=HEADS)


def test_torch_training_checkpoint(reference, hf_converted, tmp_path):
    """``{"model": state_dict, ...}`` is unwrapped; pickled Python objects are refused."""
    state = {k: torch.from_numpy(v) for k, v in timm_state(reference["hub_state"]).items()}
    torch.save({"model": state, "epoch": 3}, tmp_path / "train.pth")
    params, _ = convert.convert_checkpoint(tmp_path / "train.pth", num_heads=HEADS)
    jax.tree.map(np.testing.assert_array_equal, params, hf_converted[0])
    torch.save({"model": state, "args": argparse.Namespace(lr=0.1)}, tmp_path / "args.pth")
    one_line_error(tmp_path / "args.pth", "Python objects besides tensors .*argparse.Namespace",
                   num_heads=HEADS)


def test_bfloat16_safetensors(reference, hf_converted, tmp_path):
    from safetensors.torch import save_file as save_torch_file

    state = timm_state(reference["hub_state"])
    state = {k: torch.from_numpy(v).bfloat16() for k, v in state.items()}
    save_torch_file(state, tmp_path / "bf16.safetensors")
    params, _ = convert.convert_checkpoint(tmp_path / "bf16.safetensors", num_heads=HEADS)
    to_bfloat16 = lambda x: torch.from_numpy(x).bfloat16().float().numpy()
    rounded = jax.tree.map(to_bfloat16, hf_converted[0])
    jax.tree.map(np.testing.assert_array_equal, params, rounded)
    assert params["embedding_kernel"].dtype == np.float32


def test_check_params_names_key_and_both_shapes(hf_converted):
    params, arch = hf_converted
    convert.check_params(params, convert.param_shapes(arch))  # fits
    with pytest.raises(CheckpointError, match=r"blocks/attn/key/bias has shape \(4, 4, 16\) "
                                              r"but the model expects \(4, 8, 8\)"):
        convert.check_params(params, convert.param_shapes(arch | {"num_heads": 8}))
    with pytest.raises(CheckpointError, match="missing encoder_norm/bias"):
        convert.check_params(params | {"encoder_norm": {"scale": 0}}, convert.param_shapes(arch))
    with pytest.raises(CheckpointError, match="unexpected head"):
        convert.check_params(params | {"head": np.ones(3)}, convert.param_shapes(arch))


# ------------------------------------------------------------------------------------------------
# Saving, loading, caching, CLI.


def test_save_and_load_converted_round_trip(hf_converted, tmp_path):
    params, arch = hf_converted
    convert.save_converted(tmp_path / "teacher", params, arch)
    assert convert.is_converted(tmp_path / "teacher")
    assert not list(tmp_path.glob(".*partial*"))
    loaded, loaded_arch = convert.load_converted(tmp_path / "teacher")
    assert loaded_arch == json.loads(json.dumps(arch))
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
    with pytest.raises(CheckpointError, match="already exists"):
        convert.save_converted(tmp_path / "teacher", params, arch)
    # An arch.json that disagrees with the stored params is caught on load.
    (tmp_path / "teacher" / "arch.json").write_text(json.dumps(arch | {"mlp_dim": 2 * MLP}))
    shapes = r"blocks/mlp/fc1/bias has shape \(4, 128\) but the model expects \(4, 256\)"
    with pytest.raises(CheckpointError, match=shapes):
        convert.load_converted(tmp_path / "teacher")


def test_arch_json_of_an_older_version_loads_with_the_new_fields_off(hf_converted, tmp_path):
    params, arch = hf_converted
    older = {k: v for k, v in arch.items() if k not in ("layer_scale", "num_registers")}
    convert.save_converted(tmp_path / "older", params, older)
    loaded, loaded_arch = convert.load_converted(tmp_path / "older")
    assert loaded_arch["layer_scale"] is False and loaded_arch["num_registers"] == 0
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_load_teacher_converts_once_and_reuses_the_cache(reference, tmp_path, monkeypatch):
    calls = []
    real = convert.convert_checkpoint
    monkeypatch.setattr(convert, "convert_checkpoint",
                        lambda *args, **kwargs: calls.append(args) or real(*args, **kwargs))
    npz, _ = write_layout("google_npz", reference, tmp_path)
    cache = tmp_path / "cache"
    first, arch = convert.load_teacher(npz, cache, IMAGE)
    assert len(calls) == 1 and len(list(cache.iterdir())) == 1
    second, arch_again = convert.load_teacher(npz, cache, IMAGE)
    assert len(calls) == 1 and arch_again == arch
    jax.tree.map(np.testing.assert_array_equal, first, second)
    convert.load_teacher(npz, cache, 48)  # another image size: another cache entry
    assert len(calls) == 2 and len(list(cache.iterdir())) == 2
    # A converted folder is used as is: nothing new in the cache.
    cached_dir = next(cache.iterdir())
    params, _ = convert.load_teacher(cached_dir, tmp_path / "other_cache", None)
    assert not (tmp_path / "other_cache").exists()


def test_load_teacher_writes_nothing_for_a_bad_file(tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"not a zip file")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        convert.load_teacher(tmp_path / "bad.npz", tmp_path / "cache", IMAGE)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_cli(reference, hf_converted, tmp_path, capsys):
    path, _ = write_layout("google_npz", reference, tmp_path)
    assert cli.main([str(path), str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    count = sum(leaf.size for leaf in jax.tree.leaves(hf_converted[0]))
    assert count == 147_520  # embedding 12_352 + cls 64 + positions 1_088 + 4 * 33_472 + norm 128
    assert f"parameters: {count:,}" in printed and '"num_heads": 4' in printed
    (tmp_path / "bad.npz").write_bytes(b"junk")
    assert cli.main([str(tmp_path / "bad.npz"), str(tmp_path / "out2")]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "corrupt or truncated" in error
    assert not (tmp_path / "out2").exists()



def test_load_vit_reads_checkpoints_and_converted_directories(reference, hf_converted, tmp_path):
    model_config, params = checkpoints.load_vit(str(reference["hf_dir"]))
    assert model_config.layernorm_eps == 1e-12 and model_config.width == WIDTH
    ours = jitted_apply(build_vit(model_config))({"params": params}, reference["images"])
    assert relative_error(np.asarray(ours["blocks"]), reference["blocks"]) <= TOLERANCE
    converted = convert.save_converted(tmp_path / "converted", *hf_converted)
    config_again, params_again = checkpoints.load_vit(str(converted))
    assert config_again.to_dict() == model_config.to_dict()
    jax.tree.map(np.testing.assert_array_equal, params, params_again)
