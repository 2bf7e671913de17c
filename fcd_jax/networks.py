"""The networks of a run: the backbone, the plan (which blocks or taps the method reads), the
student, the teacher (a ViT cut to those blocks), and the random keys they start from.

METHOD.md "Networks" and "Losses": teacher and student are the same ViT; the losses read the
blocks ``layers`` (groupc), ``anchor_layers`` and the Gram pairs, and the score reads ``layers``
and ``anchor_layers``. :class:`BlockPlan` is that choice decided once from ``config.method``:
negative indices resolved against the depth, every index checked, the Gram pairs' default filled
in. Everything that truncates the teacher, gathers blocks, or renumbers them reads the plan.

METHOD.md "The paper's ablations": ``model.backbone`` "vgg16" or "resnet18" runs the method on a
CNN instead (teacher VGG16 / ResNet18, student MKDAD's cloner / ResNet18, ``fcd_jax.mkdad``'s
losses and score); :class:`TapPlan` is then the plan (``method.loss_taps`` / ``score_taps``),
and a network's "params" are its Flax variables (``params`` and, with batch norm,
``batch_stats``): :func:`init_model` and ``models.model_outputs`` hide the difference.
:func:`check_backbone` checks the CNN options before anything runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from fcd_jax import mkdad
from fcd_jax.errors import ConfigError
from fcd_jax.losses import gram_pairs
from fcd_jax.models import (
    build_vit,
    init_params,
    init_variables,
    is_cnn_model,
    resnet,
    truncate_params,
    vgg,
)

# Config fields the teacher's spec decides (``fcd_jax.teacher.reconcile`` fills them); None until
# then, so that nothing is built with a value that is not the one that runs.
TEACHER_SPEC_FIELDS = ("model.layernorm_eps", "model.gelu_approximate", "data.mean", "data.std")
BACKBONES = ("vit", "vgg16", "resnet18")
CNN_BACKBONES = BACKBONES[1:]
CLONERS = tuple(vgg.CLONER_WIDTHS)
NUM_TAPS = {"vgg16": len(vgg.TAP_NAMES), "resnet18": len(resnet.TAP_NAMES)}
# The smallest image whose last tap is at least 1 x 1 (VGG16: 4 max-pools; ResNet18: stride 32).
CNN_MIN_IMAGE_SIZE = {"vgg16": 16, "resnet18": 32}


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """0-based block indices the method reads, all in ``0..depth - 1``.

    ``read`` is every block a loss reads, ascending: the teacher runs to ``teacher_depth`` =
    ``max(read) + 1`` blocks, and a stack of only those blocks (``blocks[read]``, the teacher
    cache) is indexed by :meth:`on_read`'s plan.
    """

    depth: int  # blocks of the model the indices refer to
    layers: tuple[int, ...]
    anchor_layers: tuple[int, ...]
    gram_pairs: tuple[tuple[int, int], ...]

    @classmethod
    def from_method(cls, method_config: Any, depth: int) -> BlockPlan:
        """``method_config.layers``, ``anchor_layers`` and ``gram_pairs`` (() = consecutive pairs
        of ``layers``), negative indices counted from the end; one ``ConfigError`` naming the
        field if an index is outside a ``depth``-block model."""

        def resolve(blocks: Sequence[int], field: str) -> tuple[int, ...]:
            blocks = tuple(int(block) for block in blocks)
            bad = [block for block in blocks if not -depth <= block < depth]
            if bad:
                raise ConfigError(
                    f"method.{field} {blocks} has block indices {bad} outside the model's "
                    f"{depth} blocks: use 0-based indices below {depth} (or -1 for the last)"
                )
            return tuple(block % depth for block in blocks)

        layers = resolve(method_config.layers, "layers")
        anchor_layers = resolve(method_config.anchor_layers, "anchor_layers")
        if not layers or not anchor_layers:
            empty = "layers" if not layers else "anchor_layers"
            raise ConfigError(f"method.{empty} is empty: list at least one 0-based block index")
        pairs = tuple(
            resolve(pair, "gram_pairs") for pair in gram_pairs(method_config)
        )
        return cls(depth, layers, anchor_layers, pairs)  # type: ignore[arg-type]

    @property
    def read(self) -> tuple[int, ...]:
        """Every block a loss reads, ascending."""
        used = {*self.layers, *self.anchor_layers, *(block for pair in self.gram_pairs
                                                      for block in pair)}
        return tuple(sorted(used))

    @property
    def teacher_depth(self) -> int:
        """The teacher need not run past the last block that a loss or the score reads."""
        return max(self.read) + 1

    def on_read(self) -> BlockPlan:
        """This plan renumbered to positions in :attr:`read`, for stacks that hold only those
        blocks (``blocks[read]``): the losses then give the very same values."""
        position = {block: index for index, block in enumerate(self.read)}
        renumber = lambda blocks: tuple(position[block] for block in blocks)
        return BlockPlan(
            len(self.read), renumber(self.layers), renumber(self.anchor_layers),
            tuple(renumber(pair) for pair in self.gram_pairs),  # type: ignore[misc]
        )

    def method(self, method_config: Any) -> ml_collections.ConfigDict:
        """``method_config`` with this plan's block indices (what the losses and scores read)."""
        return ml_collections.ConfigDict(dict(
            method_config, layers=self.layers, anchor_layers=self.anchor_layers,
            gram_pairs=self.gram_pairs,
        ))


@dataclasses.dataclass(frozen=True)
class TapPlan:
    """0-based CNN tap indices the method reads (METHOD.md "The paper's ablations"), all in
    ``0..num_taps - 1``: the loss on ``loss_taps``, the score on ``score_taps``, the anchor on the
    last tap. ``read`` is every tap used, ascending, the last tap always included, so that in a
    tuple of only those taps (:meth:`on_read`, the teacher cache) the last is still the anchor's.
    """

    num_taps: int
    loss_taps: tuple[int, ...]
    score_taps: tuple[int, ...]

    @classmethod
    def from_method(cls, method_config: Any, backbone: str, num_taps: int) -> TapPlan:
        """``method_config.loss_taps`` / ``score_taps`` (() = METHOD.md's for ``backbone``:
        ``mkdad.TAPS``), negative indices counted from the end; one ``ConfigError`` naming the
        field for an index outside the ``num_taps`` taps."""

        def resolve(field: str) -> tuple[int, ...]:
            taps = tuple(int(tap) for tap in (method_config.get(field) or ()))
            taps = taps or mkdad.TAPS[backbone][field]
            bad = [tap for tap in taps if not -num_taps <= tap < num_taps]
            if bad:
                raise ConfigError(
                    f"method.{field} {taps} has tap indices {bad} outside the {num_taps} taps of "
                    f"{backbone}: use 0-based indices below {num_taps} (or () for METHOD.md's "
                    f"{mkdad.TAPS[backbone][field]})"
                )
            return tuple(tap % num_taps for tap in taps)

        return cls(num_taps, resolve("loss_taps"), resolve("score_taps"))

    @property
    def read(self) -> tuple[int, ...]:
        """Every tap the losses or the score read, and the anchor's last tap, ascending."""
        return tuple(sorted({*self.loss_taps, *self.score_taps, self.num_taps - 1}))

    def on_read(self) -> TapPlan:
        """This plan renumbered to positions in :attr:`read` (a tuple of only those taps)."""
        position = {tap: index for index, tap in enumerate(self.read)}
        return TapPlan(len(self.read), tuple(position[tap] for tap in self.loss_taps),
                       tuple(position[tap] for tap in self.score_taps))

    def method(self, method_config: Any) -> ml_collections.ConfigDict:
        """``method_config`` with this plan's tap indices (what the losses and scores read)."""
        return ml_collections.ConfigDict(dict(
            method_config, loss_taps=self.loss_taps, score_taps=self.score_taps))


@dataclasses.dataclass(frozen=True)
class Networks:
    """The student, the teacher (a ViT: the same ViT, ``plan.teacher_depth`` blocks; a CNN: the
    backbone's teacher network) and the plan."""

    teacher: nn.Module
    student: nn.Module
    plan: BlockPlan | TapPlan
    backbone: str = "vit"

    @property
    def is_cnn(self) -> bool:
        return self.backbone in CNN_BACKBONES

    @property
    def feature_batch_axis(self) -> int:
        """The batch axis of ``train_step.teacher_features``' arrays: 1 in the ViT's stacked
        blocks ``[L, B, tokens, width]``, 0 in each CNN tap ``[B, h, w, c]``."""
        return 0 if self.is_cnn else 1

    def teacher_params(self, params: dict) -> dict:
        """A full-depth ViT teacher's parameters cut to :attr:`teacher`'s blocks; a CNN
        teacher's variables as they are."""
        if self.is_cnn:
            return params
        return truncate_params(params, self.plan.teacher_depth)

    def init_teacher(self, image_size: int, key: jax.Array) -> dict:
        """A random teacher's params as the train step takes them (a ViT's full depth is not
        needed: :attr:`teacher`'s blocks only)."""
        return init_model(self.teacher, image_size, key)

    def anchor_shape(self, image_size: int) -> tuple[int, int]:
        """``[len(anchor_layers), width]`` (ViT) or ``[1, channels of the last tap]`` (CNN)."""
        if not self.is_cnn:
            return len(self.plan.anchor_layers), self.student.width
        images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jax.numpy.float32)
        taps = jax.eval_shape(lambda x: self.teacher.init_with_output(jax.random.key(0), x)[0],
                              images)["taps"]
        return 1, taps[-1].shape[-1]


def init_model(model: nn.Module, image_size: int, key: jax.Array) -> dict:
    """Random params of ``model`` for ``image_size`` px RGB input: a ViT's ``params`` tree, a
    CNN's Flax variables (``params`` and any ``batch_stats``)."""
    if not is_cnn_model(model):
        return init_params(model, image_size, key)
    return init_variables(model, image_size, key)


def build_cnns(model_config: Any) -> tuple[nn.Module, nn.Module]:
    """(teacher, student) of a CNN backbone: VGG16 and MKDAD's cloner (``model.cloner``), or
    ResNet18 twice; ``model.cnn_width_divisor`` > 1 narrows both (random teachers only)."""
    dtype = jax.numpy.dtype(model_config.get("dtype") or "float32")
    divisor = int(model_config.get("cnn_width_divisor") or 1)
    if model_config.backbone == "vgg16":
        return (vgg.vgg16_teacher(dtype, divisor),
                vgg.mkdad_cloner(model_config.get("cloner") or "equal", dtype, divisor))
    resnet18 = resnet.ResNet18(dtype, tuple(width // divisor for width in resnet.STAGE_WIDTHS))
    return resnet18, resnet18


def check_backbone(config: ml_collections.ConfigDict) -> None:
    """One ``ConfigError`` line for the first backbone option that cannot work (METHOD.md "The
    paper's ablations"), before anything runs: the backbone's name, and for a CNN the cloner,
    the width divisor, the image size, the taps (the small cloner matches VGG16's widths at
    taps 3, 6, 9, 12 only), ``lambda_mse``, and L_Gram: the paper defines it on ViT blocks
    only, so any ``method.gram_weight`` other than 0 asks for it and is refused."""
    model, method = config.model, config.method
    backbone = model.get("backbone", "vit")
    if backbone not in BACKBONES:
        raise ConfigError(f"config.model.backbone={backbone!r} is unknown: use one of "
                          f"{', '.join(map(repr, BACKBONES))}")
    if backbone == "vit":
        return
    if float(method.gram_weight) != 0:
        raise ConfigError(
            f"config.method.gram_weight={method.gram_weight!r} asks for L_Gram, which the paper "
            f"defines on ViT blocks only: set --config.method.gram_weight=0 with "
            f"model.backbone={backbone!r} (configs/ablations/backbones.py does)"
        )
    cloner = model.get("cloner", "equal")
    if cloner not in CLONERS:
        raise ConfigError(f"config.model.cloner={cloner!r} is unknown: use one of "
                          f"{', '.join(map(repr, CLONERS))}")
    divisor = model.get("cnn_width_divisor", 1)
    if not isinstance(divisor, int) or isinstance(divisor, bool) or divisor < 1:
        raise ConfigError(f"config.model.cnn_width_divisor={divisor!r} must be an integer >= 1: "
                          "use 1 (the published widths)")
    if divisor != 1 and config.teacher.init != "random":
        raise ConfigError(
            f"config.model.cnn_width_divisor={divisor} narrows the networks, which no pretrained "
            f"{backbone} fits: use 1 with a pretrained teacher (divisors are for random ones)"
        )
    lambda_mse = method.get("lambda_mse", 0.0)
    if not isinstance(lambda_mse, int | float) or isinstance(lambda_mse, bool) or lambda_mse < 0:
        raise ConfigError(f"config.method.lambda_mse={lambda_mse!r} must be a number >= 0: use "
                          "0.01 (MKDAD; 0.5 on MVTec AD)")
    least = CNN_MIN_IMAGE_SIZE[backbone]
    if config.data.image_size < least:
        raise ConfigError(f"config.data.image_size={config.data.image_size} is too small for "
                          f"{backbone}: use {least} px or more")
    teacher, student = build_cnns(model)
    plan = TapPlan.from_method(method, backbone, NUM_TAPS[backbone])
    if backbone == "vgg16":
        same = [tap for tap, (ours, theirs) in enumerate(zip(
            vgg.conv_widths(student.widths), vgg.conv_widths(teacher.widths), strict=True))
            if ours == theirs]
        for field in ("loss_taps", "score_taps"):
            bad = [tap for tap in getattr(plan, field) if tap not in same]
            if bad:
                raise ConfigError(
                    f"config.method.{field} reads taps {bad}, where the {cloner} cloner's "
                    f"widths differ from VGG16's: use taps among {tuple(same)}"
                )


def build_networks(config: ml_collections.ConfigDict) -> Networks:
    """The networks of ``config`` (reconciled with its teacher: ``fcd_jax.teacher``)."""
    unset = [field for field in TEACHER_SPEC_FIELDS if get_field(config, field) is None]
    if unset:
        raise ConfigError(
            f"{', '.join(unset)} unset: the teacher's spec fills them before any network is "
            "built (fcd_jax.teacher.load_teacher, or reconcile(config, None) for a random one)"
        )
    backbone = config.model.get("backbone", "vit")
    if backbone != "vit":
        check_backbone(config)
        teacher, student = build_cnns(config.model)
        plan = TapPlan.from_method(config.method, backbone, NUM_TAPS[backbone])
        return Networks(teacher, student, plan, backbone)
    student = build_vit(config.model)
    plan = BlockPlan.from_method(config.method, student.depth)
    return Networks(student.clone(depth=plan.teacher_depth), student, plan)


def get_field(config: ml_collections.ConfigDict, dotted: str) -> Any:
    section, field = dotted.split(".")
    return config[section].get(field)


def split_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(teacher key, base key of the students); student ``i`` uses ``fold_in(base, i)``."""
    teacher_key, student_key = jax.random.split(jax.random.key(seed))
    return teacher_key, student_key
