"""Multi-host through ``jax.distributed``: ``launch/local_multiprocess.sh`` on 127.0.0.1.

Two processes with 2 CPU devices each (one 4-device mesh over gloo) train and score 3 digits
splits on 2 slots; a single process with 4 devices does the same; both must report the same
numbers. On a (split 2, data 2) mesh the third split refills a freed slot beside a padding slot
(fresh state, teacher-cache rows and the re-stack gathered across the processes); on a (1, 4) mesh
the stack of 2 is re-stacked into the smaller program of 1, compiled ahead on each process.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch" / "local_multiprocess.sh"
SPLITS = ["0", "1", "2"]  # on 2 slots: "0" and "1", then "2" (all train the same steps)


def read_runs(workdir: Path) -> dict[str, dict]:
    runs = json.loads((workdir / "results.json").read_text())["runs"]
    return {run["name"]: run for run in runs}


@pytest.mark.slow
@pytest.mark.parametrize(
    "mesh_shape, schedule",
    [
        ((2, 2), "schedule: 2 segments, sizes {2}"),  # "2" beside a padding slot
        ((1, 4), "schedule: 2 segments, sizes {2, 1}"),  # "2" alone in the smaller program
    ],
)
def test_two_processes_report_what_one_process_reports(
    tmp_path, tiny_flags, fast_compile_xla_flags, mesh_shape, schedule
):
    # The teacher cache too: each process fills its block of it.
    flags = tiny_flags(
        splits=",".join(SPLITS), parallel_splits=2, mesh_shape=mesh_shape,
        **{"train.teacher_cache": "on"},
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", OMP_WAIT_POLICY="PASSIVE")
    multi = subprocess.Popen(
        ["bash", str(LAUNCH), "2", *flags, f"--workdir={tmp_path / 'multi'}"],
        env=dict(
            env, XLA_FLAGS=fast_compile_xla_flags, FCD_DEVICES_PER_PROCESS="2",
            FCD_LOG_DIR=str(tmp_path / "logs"), PYTHON=sys.executable,
        ),
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    single = subprocess.Popen(  # at the same time: the machine's cores are shared anyway
        [sys.executable, "-m", "fcd_jax.main", *flags, f"--workdir={tmp_path / 'single'}"],
        env=dict(
            env, XLA_FLAGS=f"{fast_compile_xla_flags} --xla_force_host_platform_device_count=4"
        ),
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    multi_out, _ = multi.communicate(timeout=900)
    single_out, _ = single.communicate(timeout=900)
    logs = {i: (tmp_path / "logs" / f"process_{i}.log").read_text() for i in range(2)}
    assert multi.returncode == 0, multi_out[-2000:] + logs[0][-2000:] + logs[1][-2000:]
    assert single.returncode == 0, single_out[-3000:]
    assert "JAX process 1 of 2" in logs[1] and "all devices: 4" in logs[1]
    assert all("teacher cache on" in log for log in [*logs.values(), single_out])
    assert all(schedule in log for log in [*logs.values(), single_out])

    multi_runs, single_runs = read_runs(tmp_path / "multi"), read_runs(tmp_path / "single")
    assert list(multi_runs) == list(single_runs) == SPLITS
    for name in SPLITS:
        for key in ("image_auroc", "threshold", "f1"):
            np.testing.assert_allclose(multi_runs[name][key], single_runs[name][key], rtol=1e-5)
        with (
            np.load(tmp_path / "multi" / "runs" / name / "scores.npz", allow_pickle=False) as a,
            np.load(tmp_path / "single" / "runs" / name / "scores.npz", allow_pickle=False) as b,
        ):
            np.testing.assert_array_equal(a["labels"], b["labels"])
            np.testing.assert_allclose(a["scores"], b["scores"], rtol=1e-5)
        # Only process 0 writes reports: one TensorBoard event file per run.
        assert len(list((tmp_path / "multi" / "tensorboard" / name).iterdir())) == 1


def test_one_failed_process_stops_the_others(tmp_path):
    fake_python = tmp_path / "python"
    fake_python.write_text(
        "#!/bin/bash\n"
        'case "$*" in *--process_id=1*) echo boom; exit 3 ;; *) exec sleep 120 ;; esac\n'
    )
    fake_python.chmod(0o755)
    start = time.perf_counter()
    done = subprocess.run(
        ["bash", str(LAUNCH), "3", "--config=configs/demo.py"],
        env=dict(os.environ, PYTHON=str(fake_python), FCD_PORT="1",
                 FCD_LOG_DIR=str(tmp_path / "logs")),
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 3
    assert time.perf_counter() - start < 30  # processes 0 and 2 were stopped, not waited for
    assert "process 1 failed (exit 3)" in done.stderr and "boom" in done.stderr
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == [
        f"process_{i}.log" for i in range(3)
    ]


def test_usage_error():
    done = subprocess.run(["bash", str(LAUNCH)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "usage:" in done.stderr
