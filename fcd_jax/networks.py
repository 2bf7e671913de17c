"""The networks of a run: the block plan (which encoder blocks the method reads), the student, the
teacher cut to those blocks, and the random keys they start from.

METHOD.md "Networks" and "Losses": teacher and student are the same ViT; the losses read the
blocks ``layers`` (groupc), ``anchor_layers`` and the Gram pairs, and the score reads ``layers``
and ``anchor_layers``. :class:`BlockPlan` is that choice decided once from ``config.method``:
negative indices resolved against the depth, every index checked, the Gram pairs' default filled
in. Everything that truncates the teacher, gathers blocks, or renumbers them reads the plan.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from fcd_jax.errors import ConfigError
from fcd_jax.losses import gram_pairs
from fcd_jax.models import build_vit, truncate_params

# Config fields the teacher's spec decides (``fcd_jax.teacher.reconcile`` fills them); None until
# then, so that nothing is built with a value that is not the one that runs.
TEACHER_SPEC_FIELDS = ("model.layernorm_eps", "model.gelu_approximate", "data.mean", "data.std")


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
class Networks:
    """The student, the teacher (the same ViT, ``plan.teacher_depth`` blocks) and the plan."""

    teacher: nn.Module
    student: nn.Module
    plan: BlockPlan

    def teacher_params(self, params: dict) -> dict:
        """A full-depth teacher's parameters cut to :attr:`teacher`'s blocks."""
        return truncate_params(params, self.plan.teacher_depth)


def build_networks(config: ml_collections.ConfigDict) -> Networks:
    """The networks of ``config`` (reconciled with its teacher: ``fcd_jax.teacher``)."""
    unset = [field for field in TEACHER_SPEC_FIELDS if get_field(config, field) is None]
    if unset:
        raise ConfigError(
            f"{', '.join(unset)} unset: the teacher's spec fills them before any network is "
            "built (fcd_jax.teacher.load_teacher, or reconcile(config, None) for a random one)"
        )
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
