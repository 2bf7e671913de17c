"""Mesh, shardings, many splits in one program: ``fcd_jax.parallel`` and ``GroupTrainer``.

The 8-device checks run once, in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (``tests/scale_checks.py``), so this test
process keeps its single CPU device; each test below asserts on one of its measurements.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from fcd_jax import parallel
from fcd_jax.datasets import tfds_one_class
from fcd_jax.errors import FcdError

ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-5  # float32 sums over 8 devices in another order than over one


@pytest.mark.parametrize(
    "num_splits, batch_size, num_devices, expected",
    [
        (20, 32, 8, (8, 1)),  # splits first
        (1, 32, 8, (1, 8)),  # one split: every device on data
        (3, 8, 8, (2, 4)),  # at most 3 on split, a divisor of 8
        (3, 2, 8, (4, 2)),  # data must divide the batch: one padding split more
        (1, 4, 8, (2, 4)),  # one split of batch 4 on 8 devices: one padding split
        (1, 3, 8, (8, 1)),  # only data 1 divides 3
        (5, 32, 6, (3, 2)),
    ],
)
def test_choose_mesh_shape(num_splits, batch_size, num_devices, expected):
    assert parallel.choose_mesh_shape(num_splits, batch_size, num_devices) == expected


def test_make_mesh_rejects_shapes_that_do_not_use_the_devices():
    with pytest.raises(FcdError, match=r"split \* data = 1"):
        parallel.make_mesh(1, 4, (2, 1))


def test_one_device_mesh_and_global_batch():
    mesh = parallel.make_mesh(3, 4)
    assert dict(mesh.shape) == {"split": 1, "data": 1}
    assert parallel.padded_num_splits(3, mesh) == 3
    layout = parallel.GlobalBatch(parallel.batch_sharding(mesh), (3, 4, 2))
    assert (layout.splits, layout.rows, layout.process_slot) == (slice(0, 3), slice(0, 4), (0, 1))
    parts = {0: np.ones((4, 2), np.uint8), 2: np.full((3, 2), 7, np.uint8)}  # split 1: none
    batch = np.asarray(layout.assemble(parts))
    assert batch.shape == (3, 4, 2) and batch.dtype == np.uint8
    np.testing.assert_array_equal(batch[0], 1)
    np.testing.assert_array_equal(batch[1], 0)
    np.testing.assert_array_equal(batch[2], [[7, 7]] * 3 + [[0, 0]])  # fewer rows: zero-padded
    evaluation = parallel.GlobalBatch(parallel.all_devices_sharding(mesh), (1, 5))
    assert (evaluation.splits, evaluation.rows) == (slice(0, 1), slice(0, 5))


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory, fast_compile_xla_flags) -> dict:
    out = tmp_path_factory.mktemp("scale") / "checks.json"
    env = dict(
        os.environ, JAX_PLATFORMS="cpu", OMP_WAIT_POLICY="PASSIVE",
        XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {fast_compile_xla_flags}",
    )
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "scale_checks.py"), str(out)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_main_process_keeps_one_device():
    assert jax.device_count() == 1


@pytest.mark.slow
def test_data_parallel_step_equals_one_device_step(eight_devices):
    checks = eight_devices["data_parallel"]
    assert checks["steps_taken"] == 3
    assert checks["max_state_diff"] < ATOL
    np.testing.assert_allclose(
        checks["losses_eight_devices"], checks["losses_one_device"], rtol=1e-5
    )
    assert checks["losses_one_device"][0] != checks["losses_one_device"][-1]  # it trained


@pytest.mark.slow
def test_step_compiles_once_per_shape(eight_devices):
    # The production step compiled once for 3 steps, and again for a wider batch.
    assert eight_devices["data_parallel"]["compilations"] == [1, 2]
    group = eight_devices["group_vs_sequential"]
    assert group["plan_sizes"] == [4, 2]  # re-stacked when the shortest split ends
    # once per stack size: the first through jax.jit, the later one compiled ahead, on 8 devices
    assert group["group_step_compilations"] == 1 and group["group_compiled_ahead"] == [2]
    assert group["alone_step_compilations"] == [1, 1, 1]
    assert group["alone_shares_one_step"]  # 3 groups of one split: one compiled step
    # ... and after the first group nothing at all is lowered again (init, step, take, gathers)
    assert group["alone_lowerings"][0] > 0 and group["alone_lowerings"][1:] == [0, 0]
    assert eight_devices["twenty_splits"]["step_compilations"] == 1


@pytest.mark.slow
def test_three_splits_in_one_program_equal_three_runs(eight_devices):
    group = eight_devices["group_vs_sequential"]
    assert group["mesh_shape"] == [2, 4]
    assert group["num_stacked"] == 4
    totals = group["totals"]
    assert len(set(totals[:3])) > 1, "one epoch of each digit: splits of different lengths"
    assert totals[3] == 0 and group["group_steps"] == totals  # padding never steps
    assert group["alone_steps"] == totals[:3]
    assert group["max_model_diff"] < ATOL
    # One epoch: "auto" computes the teacher in the step; "on" reads the teacher cache, whose
    # batches are sharded over the data axis (4 devices) while it is filled.
    assert group["cached_teacher"] == [False, True]
    assert group["max_cached_model_diff"] < ATOL


@pytest.mark.slow
def test_twenty_splits_on_eight_devices_pad_to_24_and_report_20(eight_devices):
    twenty = eight_devices["twenty_splits"]
    names = tfds_one_class.list_runs("cifar100")
    assert len(names) == 20
    assert twenty["mesh_shape"] == [8, 1]
    assert (twenty["num_splits"], twenty["num_stacked"]) == (20, 24)
    assert twenty["steps"] == [2] * 20 + [0] * 4
    assert twenty["returned_runs"] == names
    assert twenty["results_json_runs"] == names
    safe = sorted(name.replace("/", "_") for name in names)
    assert twenty["run_dirs"] == safe
    assert twenty["tensorboard_dirs"] == sorted(names)
