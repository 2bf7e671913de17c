"""``fcd_jax.schedule``: the plan of segments (pure Python, no device)."""

import itertools

import numpy as np
import pytest

from fcd_jax import schedule
from fcd_jax.errors import FcdError
from fcd_jax.schedule import IDLE

# MVTec AD's training-set sizes; 100 epochs of batch 4 (full batches).
MVTEC_SIZES = dict(
    bottle=209, cable=224, capsule=219, carpet=280, grid=264, hazelnut=391, leather=245,
    metal_nut=220, pill=267, screw=320, tile=230, toothbrush=60, transistor=213, wood=247,
    zipper=240,
)
MVTEC_TOTALS = [100 * (size // 4) for size in MVTEC_SIZES.values()]


def check_plan(plan, slots, multiple=1, max_sizes=4):
    """Every invariant a plan keeps: each split trains its steps, contiguously, in one slot at
    a time; segments tile the steps; no slot idles while a split waits; sizes are bounded."""
    totals = plan.totals
    assert plan.segments[0].start == 0
    for before, after in itertools.pairwise(plan.segments):
        assert before.stop == after.start and before.start < before.stop
    trained = np.zeros(len(totals), int)
    for segment in plan.segments:
        running = [split for split in segment.slots if split != IDLE]
        assert len(running) == len(set(running))  # one slot per split
        for split in running:
            assert plan.begins[split] <= segment.start and segment.stop <= plan.ends(split)
            trained[split] += segment.stop - segment.start
        waiting = [split for split in range(len(totals)) if plan.begins[split] >= segment.stop]
        assert not waiting or IDLE not in segment.slots
    np.testing.assert_array_equal(trained, totals)
    assert len(plan.sizes) <= max_sizes
    assert plan.sizes[0] == -(-min(slots, len(totals)) // multiple) * multiple
    assert all(size % multiple == 0 for size in plan.sizes)
    assert [segment.size for segment in plan.segments] == sorted(
        (segment.size for segment in plan.segments), reverse=True)  # never grows


def brute_idle(plan):
    computed = idle = 0
    for segment in plan.segments:
        for step in range(segment.start, segment.stop):
            for split in segment.slots:
                computed += 1
                idle += split == IDLE or not plan.begins[split] <= step < plan.ends(split)
    return idle / computed


@pytest.mark.parametrize("slots, multiple", [(15, 1), (8, 1), (4, 1), (8, 2), (6, 4), (1, 1)])
def test_plan_keeps_its_invariants_on_mvtec(slots, multiple):
    totals = [total // 50 for total in MVTEC_TOTALS]  # the same shape, 50x fewer steps
    plan = schedule.make_plan(totals, slots, multiple)
    check_plan(plan, slots, multiple)
    assert schedule.idle_fraction(plan) == pytest.approx(brute_idle(plan))
    assert schedule.make_plan(totals, slots, multiple) == plan  # pure: a rerun recomputes it


def test_splits_start_longest_first_and_a_freed_slot_takes_the_next():
    plan = schedule.make_plan([5, 9, 3, 7], slots=2)
    assert plan.segments[0].slots == (1, 3)  # 9 and 7 steps first
    assert plan.begins == (7, 0, 9, 0)  # "0" takes the slot freed at 7, "2" the one at 9
    assert plan.segments[1].slots == (1, 0)
    assert plan.last == 12  # 24 split-steps on 2 slots: none idle ...
    assert schedule.idle_fraction(plan) == 0.0
    # ... where fixed groups of 2 ("0"+"1", "2"+"3") idle 1 - 24 / (2 * 9 + 2 * 7).
    assert schedule.fixed_groups_idle_fraction(plan.totals, 2) == pytest.approx(1 - 24 / 32)


def test_a_dry_queue_restacks_into_a_smaller_program():
    plan = schedule.make_plan([10, 4, 4, 4], slots=4, multiple=2, max_sizes=2)
    assert [(segment.size, segment.start, segment.stop) for segment in plan.segments] == [
        (4, 0, 4), (2, 4, 10)]
    assert plan.segments[1].slots == (0, IDLE)
    assert schedule.idle_fraction(plan) == pytest.approx(1 - 22 / 28)
    transition = plan.transition(1)
    assert transition.gather[0] == 0 and not transition.incoming
    assert not transition.is_identity  # 4 slots -> 2: a new program


def test_transitions_carry_running_splits_and_bring_in_fresh_ones():
    totals = [total // 100 for total in MVTEC_TOTALS]
    plan = schedule.make_plan(totals, slots=6, multiple=2)
    first = plan.transition(0)
    assert first.incoming == plan.segments[0].slots
    for index in range(1, len(plan.segments)):
        old, new = plan.segments[index - 1], plan.segments[index]
        transition = plan.transition(index)
        assert len(transition.gather) == new.size
        incoming = dict(zip(transition.incoming_slots, transition.incoming, strict=True))
        assert sorted(incoming.values()) == sorted(
            split for split in range(len(totals)) if plan.begins[split] == new.start)
        for slot, split in enumerate(new.slots):
            source = old.slots[transition.gather[slot]]
            if split == IDLE or slot in incoming:
                # an inactive state: finished here, idle, or padding
                assert source == IDLE or plan.ends(source) == new.start
            else:
                assert source == split


def test_chosen_sizes_are_the_cheapest_of_every_bounded_set():
    rng = np.random.default_rng(0)
    for _ in range(20):
        totals = rng.integers(1, 40, size=rng.integers(2, 9)).tolist()
        slots, multiple, max_sizes = int(rng.integers(1, 9)), int(rng.integers(1, 3)), 3
        plan = schedule.make_plan(totals, slots, multiple, max_sizes)
        check_plan(plan, slots, multiple, max_sizes)
        full = plan.sizes[0]
        smaller = range(multiple, full, multiple)
        best = min(
            schedule.idle_fraction(schedule.Plan(totals, *schedule._simulate(
                tuple(totals), (full, *sorted(others, reverse=True)))))
            for count in range(max_sizes) for others in itertools.combinations(smaller, count)
        )
        assert schedule.idle_fraction(plan) == pytest.approx(best)


def test_mvtec_protocol_idles_a_fraction_of_fixed_groups():
    """15 categories, 100 epochs of batch 4: fixed groups idle 37.9% (one group of 15), 36.2%
    (groups of 8) and 26.7% (groups of 4); the plan (at most 4 compiled sizes) far less."""
    expected = {15: (0.379, 0.068), 8: (0.362, 0.009), 4: (0.267, 0.001)}
    for slots, (fixed, planned) in expected.items():
        plan = schedule.make_plan(MVTEC_TOTALS, slots)
        check_plan(plan, slots)
        assert schedule.fixed_groups_idle_fraction(MVTEC_TOTALS, slots) == pytest.approx(
            fixed, abs=5e-4)
        assert schedule.idle_fraction(plan) <= planned
    line = schedule.describe(schedule.make_plan(MVTEC_TOTALS, 15), 15)
    assert line == ("schedule: 13 segments, sizes {15, 14, 5, 2}, idle split-steps 6.7% "
                    "(fixed groups would idle 37.9%)")


def test_plan_for_counts_the_configs_steps(tiny_config):
    config = tiny_config()
    config.data.batch_size = 4
    config.train.update(steps=0, epochs=100)
    plan = schedule.plan_for(config, list(MVTEC_SIZES.values()), 15)
    assert plan.totals == tuple(MVTEC_TOTALS)
    config.train.steps = 7
    assert schedule.plan_for(config, [60, 391], 2).segments == (schedule.Segment(0, 7, (0, 1)),)


def test_a_split_without_steps_is_one_clear_error():
    with pytest.raises(FcdError, match="at least 1"):
        schedule.make_plan([3, 0], slots=2)
