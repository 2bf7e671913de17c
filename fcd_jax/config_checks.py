"""Every config value a user can get wrong, checked before any long work, in one place.

Each check raises one ``ConfigError`` line naming the field, the bad value and the fix:

- ``check_config(config)``: the values of one dataset's config (after its ``per_dataset``
  overrides), before any data is read;
- ``check_data_shape(config)``: before training, from the file listing only (nothing decoded),
  that every selected split's ``data.holdout_fraction`` holds out at least one image
  (``check_holdout(num_train_images, fraction)``);
- ``mistyped_field_message(argv)``: for a ``--config.X`` override of a field that does not exist,
  the line that names the field meant (``did you mean optim.lr?``).

``method.layers`` / ``anchor_layers`` / ``gram_pairs`` are checked here for their type (block
indices, pairs of them) and against the model's depth by the block plan itself
(``networks.BlockPlan.from_method``). Not here: the teacher checkpoint (``teacher``), the images
themselves (``datasets``).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import ml_collections

from fcd_jax import input_pipeline, losses, parallel, scoring
from fcd_jax.datasets import embedded, folders
from fcd_jax.datasets.split import holdout_count
from fcd_jax.errors import ConfigError
from fcd_jax.models.vit import ATTENTION_IMPLEMENTATIONS, REMAT_POLICIES, build_vit
from fcd_jax.networks import TEACHER_SPEC_FIELDS, BlockPlan, check_backbone

# The names the code accepts, for the fields whose value is one of a few names.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.attention_implementation": ATTENTION_IMPLEMENTATIONS,
    "model.remat_policy": tuple(REMAT_POLICIES),
    "stack_mode": parallel.STACK_MODES,
    "teacher.init": ("pretrained", "random"),
    "method.distill_form": losses.DISTILL_FORMS,
    "method.gram_form": losses.GRAM_FORMS,
    "method.anchor_update": losses.ANCHOR_UPDATES,
    "method.pos_embedding": ("copy_frozen", "learned"),
    "method.image_score": scoring.IMAGE_SCORES,
    "optim.name": ("sgd", "adam"),
    "optim.schedule": ("constant", "cosine"),
    "train.teacher_cache": ("auto", "on", "off"),
}
POSITIVE_INTS = (
    "data.image_size", "data.batch_size", "data.eval_batch_size", "train.log_every",
    "train.checkpoint_every",
)  # fmt: skip
NON_NEGATIVE_INTS = (
    "model.patch_size", "model.width", "model.depth", "model.num_heads", "model.mlp_dim",
    "optim.warmup_steps", "train.epochs", "train.steps", "eval.max_heatmaps",
)  # fmt: skip
NON_NEGATIVE_NUMBERS = (  # model.layernorm_eps 0 means the default, 1e-6
    "model.layernorm_eps", "method.lam", "method.anchor_weight", "method.gram_weight",
    "method.map_sigma", "optim.weight_decay", "optim.clip_norm",
)  # fmt: skip
# field -> (low, high, high included), low always included
INTERVALS = {
    "data.holdout_fraction": (0.0, 1.0, False),
    "method.anchor_momentum": (0.0, 1.0, False),
    "optim.momentum": (0.0, 1.0, False),
    "eval.threshold_quantile": (0.0, 1.0, True),
}


def _value(config: ml_collections.ConfigDict, field: str) -> Any:
    for key in field.split("."):
        config = config[key]
    return config


def _fail(field: str, value: Any, problem: str, fix: str) -> ConfigError:
    return ConfigError(f"config.{field}={value!r} {problem}: {fix}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_simple_fields(config: ml_collections.ConfigDict) -> None:
    for field, choices in CHOICES.items():
        value = _value(config, field)
        if value not in choices:
            raise _fail(field, value, "is unknown", f"use one of {', '.join(map(repr, choices))}")
    kinds = (
        (POSITIVE_INTS, lambda v: _is_int(v) and v >= 1, "an integer", 1),
        (NON_NEGATIVE_INTS, lambda v: _is_int(v) and v >= 0, "an integer", 0),
        (NON_NEGATIVE_NUMBERS, lambda v: _is_number(v) and v >= 0, "a number", 0),
    )
    for fields, valid, kind, least in kinds:
        for field in fields:
            value = _value(config, field)
            if value is None and field in TEACHER_SPEC_FIELDS:
                continue  # unset: the teacher checkpoint's own (fcd_jax.teacher.reconcile)
            if not valid(value):
                raise _fail(field, value, f"must be {kind} >= {least}",
                            f"set --config.{field} to {least} or more")  # fmt: skip
    for field, (low, high, high_included) in INTERVALS.items():
        value = _value(config, field)
        inside = _is_number(value) and low <= value and (value <= high if high_included
                                                         else value < high)  # fmt: skip
        if not inside:
            bounds = f"[{low:g}, {high:g}{']' if high_included else ')'}"
            raise _fail(field, value, f"is outside {bounds}", f"use a value in {bounds}")


def _check_data(data: ml_collections.ConfigDict) -> None:
    datasets = [name.strip() for name in str(data.name).split(",") if name.strip()]
    unknown = [name for name in datasets if name not in input_pipeline.DATASETS]
    if not datasets or unknown:
        raise _fail("data.name", data.name, "names no known dataset",
                    f"use one or more of {', '.join(input_pipeline.DATASETS)}")  # fmt: skip
    for field in ("mean", "std"):
        if data[field] is None:
            continue  # unset: the teacher checkpoint's own (fcd_jax.teacher.reconcile)
        values = tuple(data[field]) if isinstance(data[field], tuple | list) else (data[field],)
        if len(values) not in (1, 3) or not all(_is_number(v) for v in values):
            raise _fail(f"data.{field}", data[field], "is not 1 or 3 numbers",
                        "give one number, or one per RGB channel")  # fmt: skip
        if field == "std" and 0 in values:
            raise _fail("data.std", data.std, "divides by zero", "use the teacher's std, e.g. 0.5")
    if "textures" in datasets:
        embedded.texture_spec(data)


def _is_index_list(value: Any) -> bool:
    return isinstance(value, tuple | list) and all(_is_int(block) for block in value)


def _check_block_indices(method: ml_collections.ConfigDict, depth: int) -> None:
    """``method.layers`` / ``anchor_layers``: block indices; ``gram_pairs``: pairs of them; all
    inside the ``depth``-block model (``BlockPlan.from_method``)."""
    for field in ("layers", "anchor_layers"):
        if not _is_index_list(method[field]) or not method[field]:
            raise _fail(f"method.{field}", method[field], "is not a list of block indices",
                        f"give 0-based block indices, e.g. --config.method.{field}="
                        "'(3, 6, 9, 11)'")  # fmt: skip
    pairs = method.gram_pairs
    if not isinstance(pairs, tuple | list) or not all(
        _is_index_list(pair) and len(pair) == 2 for pair in pairs
    ):
        raise _fail("method.gram_pairs", pairs, "is not a list of block index pairs",
                    "give pairs, e.g. --config.method.gram_pairs='((3, 6), (6, 9))', or () for "
                    "consecutive pairs of method.layers")  # fmt: skip
    BlockPlan.from_method(method, depth)


def _check_model_and_method(config: ml_collections.ConfigDict) -> None:
    """The ViT (variant, sizes), its block indices, and what the image size gives: patches and
    top_k."""
    model = build_vit(config.model)  # ConfigError for an unknown variant
    _check_block_indices(config.method, model.depth)
    if model.width % model.num_heads:
        raise _fail("model.num_heads", model.num_heads, f"does not divide the width {model.width}",
                    "use a divisor of model.width")  # fmt: skip
    image_size, patch = config.data.image_size, model.patch_size
    if image_size % patch:
        nearest = max(patch, round(image_size / patch) * patch)
        raise _fail("data.image_size", image_size,
                    f"is not a multiple of the patch size {patch} (model {config.model.variant})",
                    f"use e.g. --config.data.image_size={nearest}")  # fmt: skip
    num_patches = (image_size // patch) ** 2
    top_k = config.method.top_k
    if not _is_int(top_k) or not 1 <= top_k <= num_patches:
        raise _fail("method.top_k", top_k,
                    f"is not between 1 and the {num_patches} patches of a {image_size} px image "
                    f"in {patch} px patches", f"use --config.method.top_k=K, 1 <= K <= "
                    f"{num_patches}")  # fmt: skip


def _check_train_and_scale(config: ml_collections.ConfigDict, devices: list) -> None:
    if not config.optim.lr > 0:
        raise _fail("optim.lr", config.optim.lr, "must be positive", "use e.g. 0.1 (SGD) or 1e-3")
    if config.train.steps == 0 and config.train.epochs == 0:
        raise ConfigError(
            "config.train.steps=0 and config.train.epochs=0 train for zero steps: set "
            "--config.train.epochs=N or --config.train.steps=N with N >= 1"
        )
    value = str(config.parallel_splits).strip()
    if value != "auto" and not (value.isdigit() and int(value) >= 1):
        raise _fail("parallel_splits", config.parallel_splits, "is neither 'auto' nor a "
                    "positive integer", "use 'auto' or e.g. 2")  # fmt: skip
    mesh_shape = tuple(config.mesh_shape)
    if mesh_shape:
        if len(mesh_shape) != 2 or not all(_is_int(n) and n >= 1 for n in mesh_shape):
            raise _fail("mesh_shape", mesh_shape, "is not two positive integers (split, data)",
                        f"use () for automatic, or e.g. '(1, {len(devices)})'")  # fmt: skip
        parallel.make_mesh(1, config.data.batch_size, mesh_shape, devices)
    if config.stack_mode == "map" and len(devices) > 1 and mesh_shape[:1] != (1,):
        # A loop over a stack axis sharded over devices would gather the whole stack.
        raise _fail("stack_mode", "map", f"needs the stack on one device slot, but the "
                    f"{len(devices)} devices may spread it", "add --config.mesh_shape='(1, "
                    f"{len(devices)})' (every device on data) or use stack_mode='vmap'")
    for field in ("data.batch_size", "data.eval_batch_size"):
        if _value(config, field) % jax.process_count():
            raise _fail(field, _value(config, field), f"is not divisible by the "
                        f"{jax.process_count()} processes", "use a multiple of the process "
                        "count")  # fmt: skip


def check_config(
    config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None
) -> None:
    """Raises one ``FcdError`` line for the first value of ``config`` that cannot work.

    ``config`` is one dataset's config (``data.name`` one dataset, ``per_dataset`` applied);
    ``devices`` (default: all of JAX's) are what ``mesh_shape`` must use.
    """
    _check_simple_fields(config)
    _check_data(config.data)
    check_backbone(config)  # the backbone's name; a CNN's own options
    if config.model.get("backbone", "vit") == "vit":
        _check_model_and_method(config)
    _check_train_and_scale(config, list(jax.devices() if devices is None else devices))


def smallest_holdout_fraction(num_train_images: int) -> float | None:
    """The smallest fraction in steps of 0.01 that holds out at least one of the images (None if
    no fraction does: one image cannot be both trained on and held out)."""
    for hundredths in range(1, 100):
        if holdout_count(num_train_images, hundredths / 100) >= 1:
            return hundredths / 100
    return None


def check_holdout(num_train_images: int | None, fraction: float) -> None:
    """One ``ConfigError`` line unless ``fraction`` holds out at least one of the
    ``num_train_images`` normal training images (the threshold is set on them); None: a count
    not known before reading the data, large enough for any fraction above 0."""
    if num_train_images is None:
        if fraction > 0:
            return
        raise ConfigError(
            f"config.data.holdout_fraction={fraction!r} holds out no training image, and the "
            "threshold is set on held-out normal images: use e.g. "
            "--config.data.holdout_fraction=0.1"
        )
    if holdout_count(num_train_images, fraction) >= 1:
        return
    smallest = smallest_holdout_fraction(num_train_images)
    if smallest is None:
        raise ConfigError(
            f"config.data.holdout_fraction={fraction!r} cannot hold out an image of "
            f"{num_train_images} training image(s): add normal training images (at least 2: one "
            "to train on, one to set the threshold)"
        )
    raise ConfigError(
        f"config.data.holdout_fraction={fraction!r} holds out no image of the "
        f"{num_train_images} training images, and the threshold is set on held-out images: use "
        f"--config.data.holdout_fraction={smallest:g} or more"
    )


def train_image_counts(config: ml_collections.ConfigDict) -> dict[str, int | None]:
    """``{split: its number of normal training images}`` for the selected splits, from the file
    listing (folder and MVTec roots; the generated textures' spec, their folder checked); None
    where only reading the data tells (tfds, digits: thousands or hundreds of images a class)."""
    names = input_pipeline.select_splits(config)
    if config.data.name in ("folder", "mvtec"):
        return {name: folders.train_image_count(config.data, name) for name in names}
    if config.data.name == "textures":  # where they will be generated, checked, not written
        return dict.fromkeys(names, embedded.textures_location(config.data)[1].n_train)
    return dict.fromkeys(names)


def check_data_shape(config: ml_collections.ConfigDict) -> None:
    """Before training, one ``FcdError`` line if the data cannot be split as configured: a
    selected split missing its training images, or ``data.holdout_fraction`` holding out none
    of them (``check_holdout``). Only lists files."""
    for count in train_image_counts(config).values():
        check_holdout(count, config.data.holdout_fraction)


# --- Mistyped config fields on the command line ----------------------------------------------


def config_fields(config: ml_collections.ConfigDict | dict, prefix: str = "") -> list[str]:
    """Dotted names of every field and section of ``config`` (``data``, ``data.root``, ...)."""
    names = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        names.append(name)
        if isinstance(value, ml_collections.ConfigDict | dict):
            names += config_fields(value, name + ".")
    return names


def _initials(name: str) -> str:
    """``"learning_rate"`` -> ``"lr"``: how config fields abbreviate (lr, lam, ...)."""
    return "".join(word[0] for word in re.split(r"[_\W]+", name) if word)


def unknown_field_message(name: str, fields: Iterable[str]) -> str:
    """``"unknown config field optim.learnig_rate: did you mean optim.lr?"``: the closest field
    of the same section by spelling (difflib) or by initials, else the closest dotted name."""
    fields = list(fields)
    section, _, leaf = name.rpartition(".")
    siblings = [f for f in fields if f.rpartition(".")[0] == section]
    leaves = {f.rpartition(".")[2]: f for f in siblings}
    close = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.6)
    by_initials = [f for short, f in leaves.items() if short == _initials(leaf)]
    guess = (
        [leaves[close[0]]] if close else by_initials
        or difflib.get_close_matches(name, fields, n=1, cutoff=0.6)
    )
    hint = f"did you mean {guess[0]}?" if guess else "see configs/default.py for every field"
    return f"unknown config field {name}: {hint}"


def override_names(argv: Sequence[str], flag: str = "config") -> list[str]:
    """The fields that ``--config.X=V`` (or ``--config.X V``, ``--noconfig.X``) arguments set."""
    pattern = re.compile(rf"^--?(?:no)?{flag}\.([^=]+)")
    return [match.group(1) for arg in argv if (match := pattern.match(arg))]


def config_file_argument(argv: Sequence[str], flag: str = "config") -> str | None:
    """The value of ``--config=FILE[:ARG]`` or ``--config FILE[:ARG]`` in ``argv``."""
    for index, arg in enumerate(argv):
        if arg.startswith((f"--{flag}=", f"-{flag}=")):
            return arg.split("=", 1)[1]
        if arg in (f"--{flag}", f"-{flag}") and index + 1 < len(argv):
            return argv[index + 1]
    return None


def unknown_override_message(argv: Sequence[str], config: ml_collections.ConfigDict) -> str | None:
    """The ``unknown_field_message`` of the first override in ``argv`` that ``config`` lacks."""
    fields = config_fields(config)
    unknown = [name for name in override_names(argv) if name not in fields]
    return unknown_field_message(unknown[0], fields) if unknown else None


def mistyped_field_message(argv: Sequence[str]) -> str | None:
    """For ``main.py`` when flag parsing fails with ml_collections' KeyError / AttributeError:
    loads the ``--config`` file of ``argv`` again and names the override that does not exist."""
    from ml_collections.config_flags.config_flags import ConfigFileFlagParser

    spec = config_file_argument(argv)
    try:
        config = ConfigFileFlagParser(name="config").parse(spec)
        return unknown_override_message(argv, config)
    except Exception:  # no or a broken config file: ml_collections' own error stands
        return None
