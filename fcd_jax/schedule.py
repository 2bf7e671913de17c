"""The training schedule: which split trains in which stack slot at every global step.

Splits of different lengths share one stacked program (``train_step.stacked_train_step``). A
plan spends no step on a finished split while untrained ones wait: the S slots take the splits
longest first; a slot whose split finishes takes the next untrained split (a fresh state); when
the queue runs dry, what is left is re-stacked into a smaller program (S, then halvings: at most
``max_sizes`` distinct compiled sizes, each a multiple of the mesh's ``split`` axis). The plan is
a pure function of the splits' lengths and the slots, so a resumed run recomputes it from its
config and its global step tells where it is.

A plan is a sequence of :class:`Segment` s, runs of global steps with a fixed slot -> split
assignment. Split ``i`` starts at global step ``begins[i]`` (its own step 0) and trains
``totals[i]`` steps; its own step at global step ``g`` is ``g - begins[i]``.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

import ml_collections
import numpy as np

from fcd_jax.errors import FcdError

IDLE = -1  # a slot that trains nothing: a finished split's or a padding state, masked


@dataclasses.dataclass(frozen=True)
class Segment:
    """Global steps ``start .. stop - 1``: slot ``s`` trains split ``slots[s]`` (or is IDLE)."""

    start: int
    stop: int
    slots: tuple[int, ...]

    @property
    def size(self) -> int:
        return len(self.slots)


@dataclasses.dataclass(frozen=True)
class Transition:
    """How the stack of a segment is built from the previous one's: new slot ``s`` takes old
    slot ``gather[s]``, then the ``incoming`` splits' fresh states are written at their
    ``incoming_slots`` (the old slots gathered there hold inactive states)."""

    old_size: int
    gather: tuple[int, ...]
    incoming_slots: tuple[int, ...]
    incoming: tuple[int, ...]

    @property
    def is_identity(self) -> bool:
        return not self.incoming and self.gather == tuple(range(self.old_size))


@dataclasses.dataclass(frozen=True)
class Plan:
    totals: tuple[int, ...]  # steps of each split
    begins: tuple[int, ...]  # the global step at which each split starts
    segments: tuple[Segment, ...]

    @property
    def last(self) -> int:
        """Global steps of the whole plan."""
        return self.segments[-1].stop

    @property
    def sizes(self) -> tuple[int, ...]:
        """The distinct stack sizes, largest first: one compiled step each."""
        return tuple(sorted({segment.size for segment in self.segments}, reverse=True))

    def ends(self, split: int) -> int:
        """The global step after the last step of ``split``."""
        return self.begins[split] + self.totals[split]

    def segment_index(self, step: int) -> int:
        """The segment that runs global step ``step`` (the last one for ``step == last``)."""
        for index, segment in enumerate(self.segments):
            if step < segment.stop:
                return index
        return len(self.segments) - 1

    def transition(self, index: int) -> Transition:
        """How segment ``index``'s stack is built from segment ``index - 1``'s (see
        :class:`Transition`); segment 0 is built fresh (every slot incoming, IDLE slots as
        padding states)."""
        new = self.segments[index]
        if index == 0:
            return Transition(0, tuple(range(new.size)), tuple(range(new.size)), new.slots)
        old = self.segments[index - 1]
        where = {split: slot for slot, split in enumerate(old.slots) if split != IDLE}
        # Old slots that are not carried over hold inactive states: any of them fills a slot
        # that trains nothing or takes a fresh state.
        carried = {where[split] for split in new.slots if split in where}
        spare = [slot for slot in range(old.size) if slot not in carried]
        gather, incoming_slots, incoming = [], [], []
        for slot, split in enumerate(new.slots):
            if split in where:
                gather.append(where[split])
                continue
            gather.append(slot if slot < old.size and slot not in carried else spare[0])
            if split != IDLE:
                incoming_slots.append(slot)
                incoming.append(split)
        return Transition(old.size, tuple(gather), tuple(incoming_slots), tuple(incoming))


def choose_sizes(
    totals: Sequence[int], slots: int, multiple: int = 1, max_sizes: int = 4
) -> tuple[int, ...]:
    """The stack sizes (largest first: ``slots`` rounded up to ``multiple``, then at most
    ``max_sizes - 1`` smaller multiples of ``multiple``) that idle the fewest split-steps.

    While untrained splits wait every slot trains; after that the number of running splits only
    falls, whatever the sizes. Each interval of that tail runs in the smallest chosen size that
    holds its running splits: a dynamic programme over the candidate sizes (the running counts,
    rounded up to ``multiple``) picks the cheapest set.
    """
    if slots < 1 or multiple < 1 or max_sizes < 1:
        raise ValueError(f"slots {slots}, multiple {multiple}, max_sizes {max_sizes}: need >= 1")
    full = -(-slots // multiple) * multiple
    weight = collections.Counter()  # tail steps by running count rounded up to the multiple
    for segment in _simulate(totals, (full,))[1]:
        running = sum(split != IDLE for split in segment.slots)
        weight[-(-running // multiple) * multiple] += segment.stop - segment.start
    candidates = sorted(set(weight) | {full})
    below = np.cumsum([0] + [weight[size] for size in candidates])  # steps up to a candidate

    # cost[t][i]: the cheapest tail up to candidates[i] with at most t + 1 sizes, the largest
    # candidates[i]; back[t][i]: (t', h), where that solution continues (h = -1: nowhere).
    cost = [[size * below[i + 1] for i, size in enumerate(candidates)]]
    back = [[(0, -1)] * len(candidates)]
    for t in range(1, max_sizes):
        row, pointers = [], []
        for i, size in enumerate(candidates):
            best = (cost[t - 1][i], back[t - 1][i])
            for h in range(i):
                option = cost[t - 1][h] + size * (below[i + 1] - below[h + 1])
                if option < best[0]:
                    best = (option, (t - 1, h))
            row.append(best[0])
            pointers.append(best[1])
        cost.append(row)
        back.append(pointers)
    sizes, (t, i) = [], (max_sizes - 1, len(candidates) - 1)
    while i >= 0:
        sizes.append(candidates[i])
        t, i = back[t][i]
    return tuple(sizes)


def make_plan(
    totals: Sequence[int], slots: int, multiple: int = 1, max_sizes: int = 4
) -> Plan:
    """The plan for splits of ``totals`` steps on ``slots`` stack slots (see the module)."""
    totals = tuple(int(total) for total in totals)
    if not totals:
        raise ValueError("no splits to schedule")
    if min(totals) < 1:
        raise FcdError(
            f"a split would train {min(totals)} steps: set --config.train.epochs or "
            "--config.train.steps to at least 1"
        )
    sizes = choose_sizes(totals, min(slots, len(totals)), multiple, max_sizes)
    begins, segments = _simulate(totals, sizes)
    return Plan(totals, begins, segments)


def _simulate(
    totals: tuple[int, ...], sizes: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[Segment, ...]]:
    """(begins, segments) of the queue on ``sizes[0]`` slots, re-stacked into the smallest of
    ``sizes`` that holds what is left once the queue is dry."""
    queue = collections.deque(sorted(range(len(totals)), key=lambda split: (-totals[split], split)))
    begins = [0] * len(totals)
    assignment = [IDLE] * sizes[0]
    segments = []
    step = 0
    while True:
        for slot, split in enumerate(assignment):
            if split == IDLE and queue:
                assignment[slot] = queue.popleft()
                begins[assignment[slot]] = step
        running = [split for split in assignment if split != IDLE]
        if not running:
            break
        if not queue:
            fits = min(size for size in sizes if size >= len(running))
            if fits < len(assignment):
                assignment = running + [IDLE] * (fits - len(running))
        stop = min(begins[split] + totals[split] for split in running)
        segments.append(Segment(step, stop, tuple(assignment)))
        step = stop
        assignment = [IDLE if split != IDLE and begins[split] + totals[split] == step else split
                      for split in assignment]
    return tuple(begins), tuple(segments)


def idle_fraction(plan: Plan) -> float:
    """Split-steps computed on IDLE slots (finished or padding) / all split-steps computed."""
    computed = sum((segment.stop - segment.start) * segment.size for segment in plan.segments)
    return 1.0 - sum(plan.totals) / computed


def fixed_groups_idle_fraction(totals: Sequence[int], group_size: int, multiple: int = 1) -> float:
    """The idle fraction of consecutive fixed groups of ``group_size`` splits, each padded to
    ``multiple`` and trained until its longest split ends (the loop before schedules)."""
    padded = -(-group_size // multiple) * multiple
    computed = sum(
        padded * max(totals[start: start + group_size])
        for start in range(0, len(totals), group_size)
    )
    return 1.0 - sum(totals) / computed


def plan_for(
    config: ml_collections.ConfigDict, split_sizes: Sequence[int], slots: int, multiple: int = 1
) -> Plan:
    """The production plan: splits of ``split_sizes`` training images under ``config.train``
    (``train_state.total_steps_for``) on ``slots`` slots; ``multiple``: the mesh's split axis."""
    from fcd_jax.train_state import total_steps_for  # jax-free import of this module otherwise

    return make_plan([total_steps_for(config, size) for size in split_sizes], slots, multiple)


def describe(plan: Plan, group_size: int, multiple: int = 1) -> str:
    """The plan's log line: segments, compiled sizes, idle split-steps vs fixed groups."""
    sizes = ", ".join(str(size) for size in plan.sizes)
    return (
        f"schedule: {len(plan.segments)} segments, sizes {{{sizes}}}, idle split-steps "
        f"{100 * idle_fraction(plan):.1f}% (fixed groups would idle "
        f"{100 * fixed_groups_idle_fraction(plan.totals, group_size, multiple):.1f}%)"
    )
