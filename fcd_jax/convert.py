"""Teacher checkpoints: read Google / timm / HuggingFace ViT weights into our param tree.

METHOD.md "Networks": the teacher is an ImageNet-pretrained ViT. Three public layouts exist:

- Google ``.npz`` (vit_jax, incl. AugReg; big_vision's ``params/`` layout with ``MultiHead..._0``,
  ``LayerNorm_1``, ``MlpBlock_0`` and scanned ``encoderblock/`` stacks): Flax shapes already.
- timm state dicts (``.safetensors``; ``.pth``/``.bin`` only through
  ``torch.load(weights_only=True)``): PyTorch ``Linear`` weights ``[out, in]``, a fused ``qkv``.
- HuggingFace ``ViTModel`` / ``ViTForImageClassification``: a folder with ``config.json`` and
  ``model.safetensors`` (or ``pytorch_model.bin``), or a single weights file.

Every reader returns ``(params, arch)``: ``params`` is the tree of ``fcd_jax.models.vit.ViT``
(numpy float32; classification heads and pre-logits dropped) and ``arch`` a JSON-able dict whose
architecture fields (``patch_size, width, depth, num_heads, mlp_dim, layernorm_eps,
gelu_approximate``) can be passed straight to ``build_vit``, plus ``image_size``, ``format``,
``source``, ``source_sha256`` and the input normalisation (``image_mean``/``image_std``, ``None``
where the file does not say). Converted teachers are stored as an orbax checkpoint plus
``arch.json`` (:func:`save_converted`) and cached by :func:`load_teacher`, so a run converts once.

CLI: ``python -m fcd_jax.convert SRC DST [--image_size 224] [--num_heads N]``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import scipy.ndimage

from fcd_jax.errors import CheckpointError
from fcd_jax.models.vit import VARIANTS, ViT

Params = dict[str, Any]

ARCH_FIELDS = ("patch_size", "width", "depth", "num_heads", "mlp_dim", "layernorm_eps",
               "gelu_approximate")
# Heads of the standard variants by width (ViT paper Table 1, DeiT; H/14 has width 1280).
HEADS_BY_WIDTH = {v["width"]: v["num_heads"] for v in VARIANTS.values()} | {1280: 16}
# Google's ViT checkpoints were trained on [-1, 1] inputs (vit_jax input pipeline).
GOOGLE_NORMALISATION = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
ARCH_FILE = "arch.json"
PARAMS_DIR = "params"


# ------------------------------------------------------------------------------------------------
# Reading raw arrays.


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    arrays = {}
    with safe_open(str(path), framework="np") as handle:
        for key in handle.keys():
            try:
                arrays[key] = handle.get_tensor(key)
            except TypeError:  # bfloat16 has no numpy dtype: go through a jax array.
                with safe_open(str(path), framework="flax") as flax_handle:
                    arrays[key] = np.asarray(flax_handle.get_tensor(key), np.float32)
    return arrays


def _read_torch(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as error:
        raise CheckpointError(
            f"reading {path.name} needs PyTorch: pip install 'fcd-jax[torch]', or convert the "
            "file to .safetensors"
        ) from error
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("model", "state_dict", "model_state"):  # training checkpoints nest the weights
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    arrays = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu()
            arrays[key] = (value.float() if value.is_floating_point() else value).numpy()
    return arrays


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    """Reads one weights file into ``{name: array}``; unreadable files raise CheckpointError."""
    readers = {".npz": _read_npz, ".safetensors": _read_safetensors, ".pth": _read_torch,
               ".pt": _read_torch, ".bin": _read_torch}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise CheckpointError(
            f"unknown checkpoint format {path.name!r}: expected a Google ViT .npz, a timm "
            ".safetensors/.pth/.bin, a HuggingFace folder or a folder written by fcd_jax.convert"
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return reader(path)
    except CheckpointError:
        raise
    except Exception as error:  # zip, pickle, torch and safetensors errors share no base class
        detail = _one_line(error)
        if isinstance(error, pickle.UnpicklingError):  # torch's message spans many lines
            found = re.search(r"WeightsUnpickler error:\s*(.+)", str(error))
            detail = found.group(1).strip() if found else detail
            if detail.startswith("Unsupported global"):
                raise CheckpointError(
                    f"{path} holds Python objects besides tensors ({detail.split(' was ')[0]}), "
                    "never unpickled here: save model.state_dict() alone, or use .safetensors"
                ) from error
        raise CheckpointError(
            f"cannot read {path}: corrupt or truncated file ({detail}); download it again"
        ) from error


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _Arrays:
    """Named arrays that remember which were used, so that unknown leftovers can be reported."""

    def __init__(self, arrays: Mapping[str, np.ndarray], source: Path, layout: str):
        self.arrays, self.source, self.layout, self.used = dict(arrays), source, layout, set()

    def __contains__(self, key: str) -> bool:
        return key in self.arrays

    def take(self, key: str) -> np.ndarray:
        if key not in self.arrays:
            raise CheckpointError(
                f"{self.source} ({self.layout} layout) has no {key!r}: not a plain ViT checkpoint "
                "of a supported layout"
            )
        self.used.add(key)
        return np.asarray(self.arrays[key], np.float32)

    def check_all_used(self, ignored: Callable[[str], bool]) -> None:
        left = sorted(k for k in self.arrays if k not in self.used and not ignored(k))
        if left:
            raise CheckpointError(
                f"{self.source} ({self.layout} layout) has weights this ViT has no place for: "
                f"{', '.join(left[:3])}{' ...' if len(left) > 3 else ''} (an unsupported variant, "
                "e.g. layer scale, register tokens or a hybrid backbone)"
            )


def _block_count(keys, pattern: str) -> int:
    indices = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    if not indices:
        return 0
    if indices != set(range(len(indices))):
        raise CheckpointError(f"encoder blocks are not numbered 0..n-1: found {sorted(indices)}")
    return len(indices)


def _stack(blocks: list[Params]) -> Params:
    return jax.tree.map(lambda *leaves: np.stack(leaves), *blocks)


def _dense(kernel: np.ndarray, bias: np.ndarray) -> Params:
    return {"kernel": kernel, "bias": bias}


def _norm(scale: np.ndarray, bias: np.ndarray) -> Params:
    return {"scale": scale, "bias": bias}


def _tree(embedding_kernel, embedding_bias, cls, pos_embedding, blocks, encoder_norm) -> Params:
    return {
        "embedding_kernel": embedding_kernel, "embedding_bias": embedding_bias,
        "cls": cls.reshape(1, 1, -1), "pos_embedding": pos_embedding.reshape(1, -1, cls.size),
        "blocks": _stack(blocks), "encoder_norm": encoder_norm,
    }


def _arch_from_params(params: Params, **fields: Any) -> dict[str, Any]:
    blocks = params["blocks"]
    arch = dict(
        patch_size=int(params["embedding_kernel"].shape[0]),
        width=int(params["embedding_kernel"].shape[-1]),
        depth=int(blocks["ln1"]["scale"].shape[0]),
        num_heads=int(blocks["attn"]["query"]["kernel"].shape[-2]),
        mlp_dim=int(blocks["mlp"]["fc1"]["kernel"].shape[-1]),
    )
    return arch | fields


# ------------------------------------------------------------------------------------------------
# Layouts: each maps named arrays to (params, arch).


def _from_google(arrays: _Arrays, gelu_approximate: bool | None) -> tuple[Params, dict]:
    """vit_jax (``Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1``, ``LayerNorm_0/2``,
    ``MlpBlock_3``; AugReg files alike, some under ``opt/target/``) and big_vision (``params/``,
    ``MultiHeadDotProductAttention_0``, ``LayerNorm_0/1``, ``MlpBlock_0``, maybe scanned)."""
    prefix = next((p for p in ("opt/target/", "params/img/", "params/", "")
                   if f"{p}embedding/kernel" in arrays), None)
    if prefix is None:
        raise CheckpointError(f"{arrays.source} has no 'embedding/kernel': not a Google ViT .npz "
                              "(hybrid ResNet+ViT checkpoints are not supported)")
    get = lambda key: arrays.take(prefix + key)
    big_vision = any(f"{prefix}Transformer/{block}/MultiHeadDotProductAttention_0/out/kernel"
                     in arrays for block in ("encoderblock_0", "encoderblock"))
    mha, ln2, mlp = ("_0", "LayerNorm_1", "MlpBlock_0") if big_vision else \
        ("_1", "LayerNorm_2", "MlpBlock_3")
    scanned = f"{prefix}Transformer/encoderblock/LayerNorm_0/scale" in arrays
    if scanned:
        depth = get("Transformer/encoderblock/LayerNorm_0/scale").shape[0]
        block_get = lambda i, key: get(f"Transformer/encoderblock/{key}")[i]
    else:
        depth = _block_count(arrays.arrays, re.escape(prefix) + r"Transformer/encoderblock_(\d+)/")
        block_get = lambda i, key: get(f"Transformer/encoderblock_{i}/{key}")

    def block(i: int) -> Params:
        leaf = lambda key: block_get(i, key)
        dense = lambda key: _dense(leaf(f"{key}/kernel"), leaf(f"{key}/bias"))
        attn = f"MultiHeadDotProductAttention{mha}"
        return {
            "ln1": _norm(leaf("LayerNorm_0/scale"), leaf("LayerNorm_0/bias")),
            "attn": {name: dense(f"{attn}/{name}") for name in ("query", "key", "value", "out")},
            "ln2": _norm(leaf(f"{ln2}/scale"), leaf(f"{ln2}/bias")),
            "mlp": {"fc1": dense(f"{mlp}/Dense_0"), "fc2": dense(f"{mlp}/Dense_1")},
        }

    if f"{prefix}cls" not in arrays:
        raise CheckpointError(f"{arrays.source} has no class token ('cls'): this is a "
                              "global-average or MAP-pooled ViT; FCD needs a class-token ViT")
    pos_key = next((k for k in ("Transformer/posembed_input/pos_embedding", "pos_embedding")
                    if prefix + k in arrays), "Transformer/posembed_input/pos_embedding")
    params = _tree(
        get("embedding/kernel"), get("embedding/bias"), get("cls"), get(pos_key),
        [block(i) for i in range(depth)],
        _norm(get("Transformer/encoder_norm/scale"), get("Transformer/encoder_norm/bias")),
    )
    arrays.check_all_used(lambda k: not k.startswith(prefix) or
                          k[len(prefix):].startswith(("head/", "pre_logits/", "MAPHead")))
    arch = _arch_from_params(params, layernorm_eps=1e-6,
                             gelu_approximate=bool(gelu_approximate), **GOOGLE_NORMALISATION)
    return params, arch


def _heads_from_torch(weight: np.ndarray, bias: np.ndarray, num_heads: int) -> Params:
    """PyTorch ``Linear`` ``[heads * head_dim, width]`` -> ``DenseGeneral [width, heads, hd]``."""
    return _dense(weight.T.reshape(weight.shape[1], num_heads, -1), bias.reshape(num_heads, -1))


def _torch_block(get: Callable[[str], np.ndarray], num_heads: int) -> Params:
    """One block from PyTorch names ``ln1, q, k, v, proj, ln2, fc1, fc2`` + ``.weight/.bias``."""
    proj = get("proj.weight")
    return {
        "ln1": _norm(get("ln1.weight"), get("ln1.bias")),
        "attn": {
            name: _heads_from_torch(get(f"{short}.weight"), get(f"{short}.bias"), num_heads)
            for name, short in (("query", "q"), ("key", "k"), ("value", "v"))
        } | {"out": _dense(proj.T.reshape(num_heads, -1, proj.shape[0]), get("proj.bias"))},
        "ln2": _norm(get("ln2.weight"), get("ln2.bias")),
        "mlp": {f"fc{n}": _dense(get(f"fc{n}.weight").T, get(f"fc{n}.bias")) for n in (1, 2)},
    }


def _conv_to_hwio(weight: np.ndarray) -> np.ndarray:
    return weight.transpose(2, 3, 1, 0)  # PyTorch Conv2d [out, in, h, w] -> Flax [h, w, in, out]


def _infer_heads(width: int, num_heads: int | None, source: Path) -> int:
    if num_heads:
        return int(num_heads)
    if width not in HEADS_BY_WIDTH:
        raise CheckpointError(
            f"{source}: cannot infer the number of heads for width {width} (not a standard "
            "variant): pass num_heads (--num_heads)"
        )
    return HEADS_BY_WIDTH[width]


def _from_timm(arrays: _Arrays, num_heads: int | None) -> tuple[Params, dict]:
    """timm ``VisionTransformer``: ``patch_embed.proj``, ``cls_token``, ``pos_embed``,
    ``blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm``."""
    width = arrays.take("cls_token").size
    heads = _infer_heads(width, num_heads, arrays.source)
    names = dict(ln1="norm1", proj="attn.proj", ln2="norm2", fc1="mlp.fc1", fc2="mlp.fc2")

    def block(i: int) -> Params:
        qkv_weight = arrays.take(f"blocks.{i}.attn.qkv.weight")  # rows: [q | k | v], each [H, hd]
        qkv_bias = arrays.take(f"blocks.{i}.attn.qkv.bias")
        fused = {f"{name}.{kind}": np.split(value, 3)[n] for n, name in enumerate("qkv")
                 for kind, value in (("weight", qkv_weight), ("bias", qkv_bias))}

        def get(key: str) -> np.ndarray:
            if key in fused:
                return fused[key]
            short, kind = key.split(".")
            return arrays.take(f"blocks.{i}.{names[short]}.{kind}")

        return _torch_block(get, heads)

    depth = _block_count(arrays.arrays, r"blocks\.(\d+)\.")
    params = _tree(
        _conv_to_hwio(arrays.take("patch_embed.proj.weight")), arrays.take("patch_embed.proj.bias"),
        arrays.take("cls_token"), arrays.take("pos_embed"), [block(i) for i in range(depth)],
        _norm(arrays.take("norm.weight"), arrays.take("norm.bias")),
    )
    arrays.check_all_used(lambda k: k.startswith(("head.", "pre_logits.")))
    arch = _arch_from_params(params, layernorm_eps=1e-6, gelu_approximate=False,
                             image_mean=None, image_std=None)
    return params, arch


# Block names in files on the Hub (``encoder.layer.{i}``) and in the modules of recent transformers
# (5.24: ``layers.{i}``), which ``torch.save(model.state_dict())`` writes.
HF_BLOCK_NAMES = {
    "encoder.layer": dict(
        ln1="layernorm_before", q="attention.attention.query", k="attention.attention.key",
        v="attention.attention.value", proj="attention.output.dense", ln2="layernorm_after",
        fc1="intermediate.dense", fc2="output.dense"),
    "layers": dict(
        ln1="layernorm_before", q="attention.q_proj", k="attention.k_proj", v="attention.v_proj",
        proj="attention.o_proj", ln2="layernorm_after", fc1="mlp.fc1", fc2="mlp.fc2"),
}
HF_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def _from_huggingface(arrays: _Arrays, config: Mapping[str, Any], num_heads: int | None
                      ) -> tuple[Params, dict]:
    """HuggingFace ``ViTModel`` (keys ``embeddings.*``, ``encoder.layer.{i}.*``, ``layernorm``),
    or ``ViTForImageClassification`` (the same under ``vit.``); pooler and classifier dropped."""
    prefix = "vit." if "vit.embeddings.cls_token" in arrays else ""
    get = lambda key: arrays.take(prefix + key)
    width = get("embeddings.cls_token").size
    heads = int(config.get("num_attention_heads") or _infer_heads(width, num_heads, arrays.source))
    layers = "layers" if f"{prefix}layers.0.layernorm_before.weight" in arrays else "encoder.layer"
    depth = _block_count(arrays.arrays, re.escape(f"{prefix}{layers}.") + r"(\d+)\.")

    def block(i: int) -> Params:
        def leaf(key: str) -> np.ndarray:
            short, kind = key.split(".")
            return get(f"{layers}.{i}.{HF_BLOCK_NAMES[layers][short]}.{kind}")

        return _torch_block(leaf, heads)

    embed = "embeddings.patch_embeddings.projection"
    params = _tree(
        _conv_to_hwio(get(f"{embed}.weight")), get(f"{embed}.bias"), get("embeddings.cls_token"),
        get("embeddings.position_embeddings"), [block(i) for i in range(depth)],
        _norm(get("layernorm.weight"), get("layernorm.bias")),
    )
    arrays.check_all_used(lambda k: k.startswith(("pooler.", "vit.pooler.", "classifier."))
                          or k.endswith("embeddings.mask_token"))
    activation = config.get("hidden_act", "gelu")
    if activation not in ("gelu", *HF_TANH_GELUS):
        raise CheckpointError(f"{arrays.source}: activation {activation!r} is not supported "
                              "(use a ViT with GELU)")
    arch = _arch_from_params(
        params, layernorm_eps=float(config.get("layer_norm_eps", 1e-12)),
        gelu_approximate=activation in HF_TANH_GELUS,
        image_mean=config.get("image_mean"), image_std=config.get("image_std"),
    )
    return params, arch


def _layout(arrays: Mapping[str, np.ndarray]) -> str:
    keys = set(arrays)
    if any(k.endswith("embedding/kernel") for k in keys):
        return "google"
    if "patch_embed.proj.weight" in keys or "module.patch_embed.proj.weight" in keys:
        return "timm"
    if any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in keys):
        return "huggingface"
    return "unknown"


# ------------------------------------------------------------------------------------------------
# Position embeddings.


def interpolate_pos_embedding(pos_embedding: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Resizes ``[1, 1 + g*g, D]`` to ``[1, 1 + grid[0]*grid[1], D]``: bilinear on the square patch
    grid (``scipy.ndimage.zoom(order=1)``, corners aligned, as vit_jax does); cls slot kept."""
    cls_slot, old = pos_embedding[:, :1], pos_embedding[0, 1:]
    side = math.isqrt(len(old))
    if side * side != len(old):
        raise CheckpointError(f"position embedding of {len(old)} patches is not a square grid")
    if (side, side) == tuple(grid):
        return pos_embedding
    zoom = (grid[0] / side, grid[1] / side, 1)
    new = scipy.ndimage.zoom(old.reshape(side, side, -1), zoom, order=1, grid_mode=False)
    new = new[: grid[0], : grid[1]]
    if new.shape[:2] != tuple(grid):
        raise AssertionError(f"zoom gave {new.shape[:2]}, wanted {grid}")
    return np.concatenate([cls_slot, new.reshape(1, grid[0] * grid[1], -1)], axis=1)


def _with_cls_slot(pos_embedding: np.ndarray) -> np.ndarray:
    """Checkpoints whose cls token gets no position embedding (big_vision, timm
    ``no_embed_class``) store ``g*g`` rows: a zero cls row is the same model."""
    tokens = pos_embedding.shape[1]
    if math.isqrt(tokens) ** 2 == tokens:
        return np.concatenate([np.zeros_like(pos_embedding[:, :1]), pos_embedding], axis=1)
    return pos_embedding


def _fit_image_size(params: Params, arch: dict, image_size: int | None) -> tuple[Params, dict]:
    pos = _with_cls_slot(params["pos_embedding"])
    side = math.isqrt(pos.shape[1] - 1)
    if side * side != pos.shape[1] - 1:
        raise CheckpointError(f"{arch.get('source')}: position embedding has {pos.shape[1]} rows, "
                              "neither 1 + a square grid nor a square grid")
    patch = arch["patch_size"]
    if image_size is None:
        image_size = side * patch
    if image_size % patch:
        raise CheckpointError(f"image size {image_size} is not a multiple of the checkpoint's "
                              f"patch size {patch}: choose e.g. {image_size // patch * patch}")
    grid = image_size // patch
    params = params | {"pos_embedding": interpolate_pos_embedding(pos, (grid, grid))}
    return params, arch | {"image_size": int(image_size)}


# ------------------------------------------------------------------------------------------------
# Checking against the configured model.


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flat(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def param_shapes(arch: Mapping[str, Any], image_size: int | None = None) -> Params:
    """``jax.eval_shape`` of the ViT that ``arch`` describes (no memory allocated)."""
    return _param_shapes(tuple(arch[field] for field in ARCH_FIELDS),
                         image_size or arch["image_size"])


@functools.lru_cache(maxsize=16)
def _param_shapes(fields: tuple, image_size: int) -> Params:
    model = ViT(**dict(zip(ARCH_FIELDS, fields, strict=True)))
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), np.float32)
    return jax.eval_shape(model.init, jax.random.key(0), images)["params"]


def check_params(params: Params, expected_shapes: Params) -> None:
    """Raises one-line CheckpointError on the first missing or extra key, or wrong shape."""
    got, want = _flat(params), _flat(expected_shapes)
    missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
    if missing or extra:
        parts = [f"missing {', '.join(missing[:3])}" if missing else "",
                 f"unexpected {', '.join(extra[:3])}" if extra else ""]
        raise CheckpointError(
            "checkpoint does not fit the model: " + "; ".join(p for p in parts if p))
    for key in sorted(want):
        if tuple(np.shape(got[key])) != tuple(want[key].shape):
            raise CheckpointError(
                f"checkpoint does not fit the model: {key} has shape {tuple(np.shape(got[key]))} "
                f"but the model expects {tuple(want[key].shape)} (another ViT variant, patch size "
                "or image size?)"
            )


# ------------------------------------------------------------------------------------------------
# Public entry points.


def is_converted(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / ARCH_FILE).is_file() and (path / PARAMS_DIR).is_dir()


def _huggingface_folder(path: Path) -> tuple[Path, dict]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} is a folder without config.json or {ARCH_FILE}: not a "
                              "HuggingFace model folder nor one written by fcd_jax.convert")
    weights = next((path / name for name in HF_WEIGHT_FILES if (path / name).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{path} has config.json but none of {', '.join(HF_WEIGHT_FILES)}")
    preprocessor = path / "preprocessor_config.json"
    try:
        config = json.loads(config_file.read_text())
        preprocessing = json.loads(preprocessor.read_text()) if preprocessor.is_file() else {}
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read the JSON files in {path}: {_one_line(error)}") from None
    config |= {k: preprocessing[k] for k in ("image_mean", "image_std") if k in preprocessing}
    return weights, config


def convert_checkpoint(path: str | os.PathLike, *, image_size: int | None = None,
                       num_heads: int | None = None, gelu_approximate: bool | None = None
                       ) -> tuple[Params, dict]:
    """Reads any supported checkpoint (format detected from the file) into ``(params, arch)``.

    ``image_size``: interpolate the position embedding to this input size (default: the
    checkpoint's own). ``num_heads``: for timm files of a non-standard width. ``gelu_approximate``:
    for Google ``.npz`` (default False, exact GELU; vit_jax's Flax code uses the tanh form).
    """
    path = Path(path)
    if is_converted(path):
        params, arch = load_converted(path)
        return _fit_image_size(params, arch, image_size)
    config: dict = {}
    weights = path
    if path.is_dir():
        weights, config = _huggingface_folder(path)
    raw = _read_arrays(weights)
    raw = {k.removeprefix("module."): v for k, v in raw.items()}  # DistributedDataParallel saves
    layout = "huggingface" if config else _layout(raw)
    arrays = _Arrays(raw, weights, layout)
    try:
        if layout == "google":
            params, arch = _from_google(arrays, gelu_approximate)
        elif layout == "timm":
            params, arch = _from_timm(arrays, num_heads)
        elif layout == "huggingface":
            params, arch = _from_huggingface(arrays, config, num_heads)
        else:
            raise CheckpointError(
                f"{weights}: unknown checkpoint layout (first keys: {', '.join(sorted(raw)[:3])}); "
                "expected Google ViT, timm or HuggingFace ViT weights"
            )
    except (ValueError, IndexError) as error:  # reshapes of inconsistent shapes
        raise CheckpointError(f"{weights} ({layout} layout) has inconsistent shapes: "
                              f"{_one_line(error)}") from error
    arch |= dict(format=layout, source=str(path.resolve()), source_sha256=_file_sha256(weights))
    params, arch = _fit_image_size(params, arch, image_size)
    check_params(params, param_shapes(arch))
    return params, arch


def save_converted(directory: str | os.PathLike, params: Params, arch: Mapping[str, Any]) -> Path:
    """Writes ``directory/params`` (orbax) and ``directory/arch.json``; all or nothing."""
    import orbax.checkpoint as ocp

    directory = Path(directory).resolve()
    if directory.exists() and any(directory.iterdir()):
        raise CheckpointError(f"{directory} already exists and is not empty: choose another place")
    partial = directory.with_name(f".{directory.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(partial / PARAMS_DIR, jax.tree.map(np.asarray, params))
        checkpointer.wait_until_finished()
        checkpointer.close()
        (partial / ARCH_FILE).write_text(json.dumps(dict(arch), indent=2) + "\n")
        if directory.exists():
            directory.rmdir()
        os.replace(partial, directory)
    except OSError:
        if not is_converted(directory):  # lost a race against another writer: theirs is as good
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return directory


def load_converted(directory: str | os.PathLike) -> tuple[Params, dict]:
    """Reads what :func:`save_converted` wrote: ``(params as numpy float32, arch)``."""
    import orbax.checkpoint as ocp

    directory = Path(directory).resolve()
    if not is_converted(directory):
        raise CheckpointError(f"{directory} is not a converted checkpoint (no {ARCH_FILE} + "
                              f"{PARAMS_DIR}/): run python -m fcd_jax.convert SRC {directory}")
    try:
        arch = json.loads((directory / ARCH_FILE).read_text())
        checkpointer = ocp.StandardCheckpointer()
        params = checkpointer.restore(directory / PARAMS_DIR)
        checkpointer.close()
    except Exception as error:  # orbax and json raise many types
        raise CheckpointError(f"cannot read converted checkpoint {directory}: "
                              f"{_one_line(error)}; delete it to convert again") from error
    params = jax.tree.map(lambda leaf: np.asarray(leaf, np.float32), params)
    check_params(params, param_shapes(arch))
    return params, arch


def _cache_key(path: Path, image_size: int | None) -> str:
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    stats = [p.stat() for p in files]
    size, mtime = sum(s.st_size for s in stats), max(s.st_mtime_ns for s in stats)
    return f"{path.name}-{size}-{mtime}-{image_size or 'native'}"


def load_teacher(checkpoint: str | os.PathLike, cache_dir: str | os.PathLike,
                 image_size: int | None, *, num_heads: int | None = None) -> tuple[Params, dict]:
    """Teacher ``(params, arch)`` at ``image_size``: a converted folder is used as is (position
    embedding interpolated in memory if needed); anything else is converted once and cached under
    ``cache_dir`` keyed by file name, size, mtime and image size."""
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise CheckpointError(f"teacher checkpoint {checkpoint} does not exist "
                              "(config.teacher.checkpoint)")
    if is_converted(checkpoint):
        return convert_checkpoint(checkpoint, image_size=image_size)
    cached = Path(cache_dir) / _cache_key(checkpoint, image_size)
    if is_converted(cached):
        return load_converted(cached)
    params, arch = convert_checkpoint(checkpoint, image_size=image_size, num_heads=num_heads)
    save_converted(cached, params, arch)
    return params, arch


def count_params(params: Params) -> int:
    return sum(int(np.size(leaf)) for leaf in jax.tree.leaves(params))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fcd_jax.convert", description=__doc__.split("\n")[0])
    parser.add_argument("src", help="Google .npz, timm .safetensors/.pth/.bin, or a HF folder")
    parser.add_argument("dst", help="output folder (orbax checkpoint + arch.json)")
    parser.add_argument("--image_size", type=int, default=None,
                        help="interpolate the position embedding to this input size")
    parser.add_argument("--num_heads", type=int, default=None,
                        help="heads, for timm files of a non-standard width")
    parser.add_argument("--gelu_approximate", action="store_true",
                        help="Google .npz: record the tanh GELU (vit_jax's Flax code) instead")
    args = parser.parse_args(argv)
    try:
        params, arch = convert_checkpoint(
            args.src, image_size=args.image_size, num_heads=args.num_heads,
            gelu_approximate=args.gelu_approximate or None)
        directory = save_converted(args.dst, params, arch)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(arch, indent=2))
    print(f"parameters: {count_params(params):,}")
    print(f"written to {directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
