"""fcd_jax/convert (DINOv2 and DeiT): converted teachers compute what the references compute.

The references are HuggingFace ``Dinov2Model``, ``Dinov2WithRegistersModel`` and ``DeiTModel``
built from small configs with random weights (every LayerNorm, bias, layer scale, token and
position randomised), saved with ``save_pretrained``. Every block's output and the final output
must equal ours at the native size and at sizes that resample the position grid (up and down).
The same weights are then written in the original DINOv2 ``.pth`` and the timm layouts (from
their documented key mappings: timm's ``_convert_dinov2``) and must convert to the same params.
"""

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conversion_checks import (  # noqa: E402
    HF_DINOV2_NAMES,
    HF_VIT_NAMES,
    TOLERANCE,
    features,
    one_line_error,
    relative_error,
    timm_block,
    torch_save,
)
from safetensors.numpy import load_file, save_file  # noqa: E402

from fcd_jax import convert  # noqa: E402
from fcd_jax.convert import positions  # noqa: E402
from fcd_jax.errors import CheckpointError  # noqa: E402

WIDTH, DEPTH, HEADS, PATCH, IMAGE, REGISTERS = 64, 3, 4, 14, 84, 4  # native grid 6x6
SIZES = (IMAGE, 140, 56)  # native, positions resampled up (10x10) and down (4x4)
IMAGENET = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])


def randomise(model) -> None:
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):  # every LayerNorm's scale
                param.copy_(1 + 0.3 * torch.randn_like(param))
            elif "lambda1" in name:  # layer scale: far from the 1.0 (or 1e-5) it starts at
                param.copy_(0.5 + torch.rand_like(param))
            elif param.ndim == 1 or "embeddings" in name and "projection" not in name:
                param.copy_(0.3 * torch.randn_like(param))  # biases, tokens, positions
            else:
                param.copy_(torch.randn_like(param) / param[0].numel() ** 0.5)


def build_reference(kind: str, directory):
    """A small random HF model of ``kind``, saved; returns (model, folder)."""
    common = dict(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                  image_size=IMAGE, patch_size=PATCH, attn_implementation="eager")
    if kind == "dinov2":
        model = transformers.Dinov2Model(transformers.Dinov2Config(mlp_ratio=2, **common))
    elif kind == "dinov2_registers":
        model = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
            mlp_ratio=2, num_register_tokens=REGISTERS, **common))
    else:
        model = transformers.DeiTModel(transformers.DeiTConfig(intermediate_size=128, **common))
    model.eval()
    randomise(model)
    model.save_pretrained(directory / kind)
    return model, directory / kind


def reference_outputs(model, images: np.ndarray, extra_tokens: int) -> tuple:
    """(every block's tokens, final output) of the HF model, its extra tokens dropped."""
    kwargs = {"interpolate_pos_encoding": True} if isinstance(model, transformers.DeiTModel) \
        else {}
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)),
                    output_hidden_states=True, **kwargs)
    drop = lambda t: np.concatenate([t[:, :1], t[:, 1 + extra_tokens:]], axis=1)
    blocks = np.stack([drop(h.numpy()) for h in out.hidden_states[1:]])
    return blocks, drop(out.last_hidden_state.numpy())


KINDS = {"dinov2": 0, "dinov2_registers": REGISTERS, "deit": 1}  # kind -> extra tokens


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf")
    return {kind: build_reference(kind, directory) for kind in KINDS}


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_block_matches_huggingface(references, kind, size):
    model, folder = references[kind]
    params, arch = convert.convert_checkpoint(folder, image_size=size)
    images = np.random.default_rng(size).standard_normal((2, size, size, 3)).astype(np.float32)
    blocks, encoded = reference_outputs(model, images, KINDS[kind])
    ours = features(params, arch, images)
    grid = size // PATCH
    assert ours["blocks"].shape == blocks.shape == (DEPTH, 2, 1 + grid * grid, WIDTH)
    errors = [relative_error(ours["blocks"][c], blocks[c]) for c in range(DEPTH)]
    errors.append(relative_error(ours["encoded"], encoded))
    print(f"\n{kind} at {size} px (grid {IMAGE // PATCH} -> {grid}): max relative error per "
          f"block and final {', '.join(f'{e:.1e}' for e in errors)}")
    assert max(errors) <= TOLERANCE, errors
    assert relative_error(ours["blocks"][1], blocks[2]) > 0.1  # the comparison can fail


def test_arch_records_the_architecture_and_normalisation(references):
    expected = {"dinov2": dict(layer_scale=True, num_registers=0, pos_interpolation="bicubic",
                               layernorm_eps=1e-6, family="dinov2"),
                "dinov2_registers": dict(layer_scale=True, num_registers=REGISTERS,
                                         pos_interpolation="bicubic_antialias",
                                         layernorm_eps=1e-6, family="dinov2"),
                "deit": dict(layer_scale=False, num_registers=1, pos_interpolation="bicubic",
                             layernorm_eps=1e-12, family="deit")}
    for kind, fields in expected.items():
        _, arch = convert.convert_checkpoint(references[kind][1])
        assert {k: arch[k] for k in fields} == fields, kind
        assert {k: arch[k] for k in IMAGENET} == IMAGENET, kind
        assert (arch["patch_size"], arch["mlp_dim"], arch["format"]) == (PATCH, 128, "huggingface")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_module_names_of_recent_transformers_give_the_same_params(references, kind, tmp_path):
    """``torch.save(model.state_dict())`` writes transformers 5.24's module names
    (``attention.q_proj``; ViT/DeiT under ``layers.{i}``), not the Hub's."""
    model, folder = references[kind]
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    assert any(".q_proj." in key for key in model.state_dict())
    params, _ = convert.convert_checkpoint(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, params, convert.convert_checkpoint(folder)[0])


def test_preprocessor_config_normalisation_wins(references, tmp_path):
    folder = tmp_path / "custom"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((references["dinov2"][1] / name).read_bytes())
    mean, std = [0.1, 0.2, 0.3], [0.4, 0.5, 0.6]
    (folder / "preprocessor_config.json").write_text(json.dumps(dict(image_mean=mean,
                                                                     image_std=std)))
    _, arch = convert.convert_checkpoint(folder)
    assert (arch["image_mean"], arch["image_std"]) == (mean, std)


# ------------------------------------------------------------------------------------------------
# The same weights in the original DINOv2 and the timm layouts.


def original_state(hub: dict, registers: bool, chunks: int = 0) -> dict:
    """facebookresearch/dinov2 ``state_dict()`` names, from the HF Hub names (the inverse of
    transformers' convert_dinov2_to_hf.py); ``chunks`` > 0: FSDP ``blocks.{chunk}.{i}``."""
    state = {
        "cls_token": hub["embeddings.cls_token"], "mask_token": hub["embeddings.mask_token"],
        "pos_embed": hub["embeddings.position_embeddings"],
        "patch_embed.proj.weight": hub["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": hub["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": hub["layernorm.weight"], "norm.bias": hub["layernorm.bias"],
    }
    if registers:
        state["register_tokens"] = hub["embeddings.register_tokens"]
    for i in range(DEPTH):
        block = f"blocks.{i // -(-DEPTH // chunks)}.{i}" if chunks else f"blocks.{i}"
        state |= timm_block(hub, i, block, HF_DINOV2_NAMES)
    return state


def timm_state(original: dict) -> dict:
    """timm's ``_convert_dinov2``: mask token dropped; with registers, ``reg_token`` and a
    ``no_embed_class`` model (the cls position added into ``cls_token``, its row removed)."""
    state = {k: v for k, v in original.items() if k != "mask_token"}
    if "register_tokens" in state:
        state["reg_token"] = state.pop("register_tokens")
        state["cls_token"] = state["cls_token"] + state["pos_embed"][:, 0]
        state["pos_embed"] = state["pos_embed"][:, 1:]
    return state


@pytest.fixture(scope="module", params=["dinov2", "dinov2_registers"])
def dinov2_layouts(request, references, tmp_path_factory):
    """{layout name: path} for one HF reference written in the other layouts."""
    kind = request.param
    directory = tmp_path_factory.mktemp(kind)
    hub = load_file(references[kind][1] / "model.safetensors")
    registers = kind == "dinov2_registers"
    torch_save(original_state(hub, registers), directory / "dinov2_pretrain.pth")
    torch_save(original_state(hub, registers, chunks=2), directory / "dinov2_chunked.pth")
    save_file(timm_state(original_state(hub, registers)), directory / "timm.safetensors")
    hub_folder = directory / "timm_hub"  # what huggingface_hub downloads for timm/vit_*_dinov2
    hub_folder.mkdir()
    save_file(timm_state(original_state(hub, registers)), hub_folder / "model.safetensors")
    pretrained_cfg = dict(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    (hub_folder / "config.json").write_text(json.dumps(
        dict(architecture="vit_small_patch14_dinov2", pretrained_cfg=pretrained_cfg)))
    return kind, {"dinov2": directory / "dinov2_pretrain.pth",
                  "dinov2_chunked": directory / "dinov2_chunked.pth",
                  "timm": directory / "timm.safetensors", "timm_hub": hub_folder}


def test_original_and_timm_layouts_give_the_same_params(references, dinov2_layouts):
    kind, paths = dinov2_layouts
    expected, expected_arch = convert.convert_checkpoint(references[kind][1])
    for name, path in paths.items():
        params, arch = convert.convert_checkpoint(path, num_heads=HEADS)
        assert arch["format"] == name.removesuffix("_chunked").removesuffix("_hub"), name
        for field in (*convert.ARCH_FIELDS, "image_size", "image_mean", "image_std", "family"):
            assert arch[field] == expected_arch[field], (name, field)
        if name.startswith("timm") and kind == "dinov2_registers":
            # timm's no_embed_class file: the cls position lives in the cls token, the very sum.
            cls = expected["cls"] + expected["pos_embedding"][:, :1]
            np.testing.assert_array_equal(params["cls"], cls)
            np.testing.assert_array_equal(params["pos_embedding"][:, 0], 0)
            params = params | {"cls": expected["cls"], "pos_embedding": np.concatenate(
                [expected["pos_embedding"][:, :1], params["pos_embedding"][:, 1:]], axis=1)}
        jax.tree.map(np.testing.assert_array_equal, params, expected)  # bit-identical


@pytest.mark.parametrize("size", SIZES[1:])
def test_each_layout_resamples_positions_as_its_own_code(references, dinov2_layouts, size):
    """timm: ``F.interpolate(size, bicubic, antialias=True)``; the original DINOv2 code:
    ``F.interpolate(scale_factor=(g + 0.1) / 6, bicubic)``, antialiased by size for registers."""
    kind, paths = dinov2_layouts
    grid = size // PATCH
    hub = load_file(references[kind][1] / "model.safetensors")
    old = torch.from_numpy(hub["embeddings.position_embeddings"][0, 1:])
    old = old.reshape(IMAGE // PATCH, IMAGE // PATCH, WIDTH).permute(2, 0, 1)[None]
    antialias = dict(size=(grid, grid), mode="bicubic", antialias=True)
    offset = dict(scale_factor=((grid + 0.1) / (IMAGE // PATCH),) * 2, mode="bicubic")
    original = antialias if kind == "dinov2_registers" else offset
    for name, kwargs in (("timm", antialias), ("dinov2", original)):
        params, _ = convert.convert_checkpoint(paths[name], image_size=size, num_heads=HEADS)
        want = torch.nn.functional.interpolate(old, **kwargs)[0].permute(1, 2, 0).numpy()
        got = params["pos_embedding"][0, 1:].reshape(grid, grid, WIDTH)
        assert relative_error(got, want) <= 1e-6, name


# ------------------------------------------------------------------------------------------------
# DeiT in timm's layout; unsupported variants.


def deit_timm_state(hub: dict) -> dict:
    """timm ``VisionTransformerDistilled`` names from the HF DeiT Hub names."""
    state = {"cls_token": hub["embeddings.cls_token"],
             "dist_token": hub["embeddings.distillation_token"],
             "pos_embed": hub["embeddings.position_embeddings"],
             "patch_embed.proj.weight": hub["embeddings.patch_embeddings.projection.weight"],
             "patch_embed.proj.bias": hub["embeddings.patch_embeddings.projection.bias"],
             "norm.weight": hub["layernorm.weight"], "norm.bias": hub["layernorm.bias"],
             "head.weight": np.ones((3, WIDTH), np.float32), "head.bias": np.ones(3, np.float32),
             "head_dist.weight": np.ones((3, WIDTH), np.float32),
             "head_dist.bias": np.ones(3, np.float32)}
    for i in range(DEPTH):
        state |= timm_block(hub, i, f"blocks.{i}", HF_VIT_NAMES)
    return state


def test_deit_timm_and_classifier_layouts_give_the_same_params(references, tmp_path):
    model, folder = references["deit"]
    expected, expected_arch = convert.convert_checkpoint(folder)
    hub = load_file(folder / "model.safetensors")
    save_file(deit_timm_state(hub), tmp_path / "deit_distilled.safetensors")
    classifier = {f"deit.{k}": v for k, v in hub.items() if not k.startswith("pooler.")}
    classifier |= {f"{head}.{kind}": np.ones((3, WIDTH) if kind == "weight" else 3, np.float32)
                   for head in ("cls_classifier", "distillation_classifier")
                   for kind in ("weight", "bias")}
    save_file(classifier, tmp_path / "deit_with_teacher.safetensors")
    for path, layout, eps in ((tmp_path / "deit_distilled.safetensors", "timm", 1e-6),
                              (tmp_path / "deit_with_teacher.safetensors", "huggingface", 1e-12)):
        params, arch = convert.convert_checkpoint(path, num_heads=HEADS)
        assert (arch["format"], arch["family"], arch["layernorm_eps"]) == (layout, "deit", eps)
        assert arch["num_registers"] == 1 and arch["image_mean"] == IMAGENET["image_mean"]
        jax.tree.map(np.testing.assert_array_equal, params, expected)


def test_unsupported_variants_are_one_clear_line(references, tmp_path):
    config = transformers.Dinov2Config(hidden_size=WIDTH, num_hidden_layers=1, image_size=IMAGE,
                                       num_attention_heads=HEADS, patch_size=PATCH,
                                       use_swiglu_ffn=True)
    transformers.Dinov2Model(config).save_pretrained(tmp_path / "giant")
    one_line_error(tmp_path / "giant", "SwiGLU MLP .* not supported")
    hub = load_file(references["dinov2"][1] / "model.safetensors")
    swiglu = original_state(hub, registers=False)
    swiglu["blocks.0.mlp.w12.weight"] = swiglu.pop("blocks.0.mlp.fc1.weight")
    torch_save(swiglu, tmp_path / "dinov2_vitg14_pretrain.pth")
    one_line_error(tmp_path / "dinov2_vitg14_pretrain.pth", "SwiGLU MLP .* not supported",
                   num_heads=HEADS)
    no_bias = json.loads((references["dinov2"][1] / "config.json").read_text())
    folder = tmp_path / "no_bias"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(no_bias | {"qkv_bias": False}))
    (folder / "model.safetensors").write_bytes(
        (references["dinov2"][1] / "model.safetensors").read_bytes())
    one_line_error(folder, r"qkv_bias=false\) is not supported")
    both = deit_timm_state(load_file(references["deit"][1] / "model.safetensors"))
    both["reg_token"] = np.zeros((1, 4, WIDTH), np.float32)
    save_file(both, tmp_path / "both.safetensors")
    one_line_error(tmp_path / "both.safetensors", "both a distillation token and register tokens",
                   num_heads=HEADS)


def test_unknown_resampling_mode_is_one_clear_line():
    with pytest.raises(CheckpointError, match="unknown position interpolation 'nearest'"):
        positions.interpolate_pos_embedding(np.zeros((1, 37, 4), np.float32), (4, 4), "nearest")
