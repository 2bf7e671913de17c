"""``Detector.load(workdir, run=None)`` refuses what is not a trained workdir, or an ambiguous or
unknown run, in one line each, before loading anything (no training: hand-made workdirs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fcd_jax.detector import Detector
from fcd_jax.errors import FcdError

REPO = Path(__file__).resolve().parents[1]


def fake_workdir(root, runs=("a", "b"), results: str | None = '{"config": {"seed": 0}}'):
    """A workdir's files as training leaves them, without any model inside."""
    if results is not None:
        (root / "results.json").write_text(results)
    for name in runs:
        (root / "runs" / name / "model").mkdir(parents=True)
        (root / "runs" / name / "result.json").write_text(json.dumps({"name": name,
                                                                      "threshold": 1.0}))
    return str(root)


@pytest.mark.parametrize(
    ("make", "run", "message"),
    [
        (lambda root: str(root / "absent"), None, "no workdir at"),
        (lambda root: fake_workdir(root, results=None), None, "has no results.json"),
        (lambda root: fake_workdir(root, results="{not json"), None, "cannot read"),
        (lambda root: fake_workdir(root, results='{"runs": []}'), None, "records no config"),
        (lambda root: fake_workdir(root, runs=()), None, "no trained run in"),
        (lambda root: fake_workdir(root), None, "holds 2 trained runs \\(a, b\\): pick one"),
        (lambda root: fake_workdir(root), "c", "has no trained run 'c': use one of a, b"),
    ],
    ids=["missing", "no_results", "broken_results", "no_config", "no_runs", "ambiguous",
         "unknown_run"],
)
def test_load_refuses_in_one_line(tmp_path, make, run, message):
    with pytest.raises(FcdError, match=message) as error:
        Detector.load(make(tmp_path), run)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--output=x.onnx"], "--workdir missing"),
        (["--workdir=/no/such/workdir", "--output=x.onnx"], "no workdir at /no/such/workdir"),
        (["--workdir=/tmp", "--output=x.onnx", "--format=tflite"], "--format"),
    ],
    ids=["no_workdir_flag", "missing_workdir", "bad_format"],
)
def test_export_cli_error_is_one_line_exit_2(arguments, message):
    process = subprocess.run(
        [sys.executable, "-m", "fcd_jax.export", *arguments], cwd=REPO, capture_output=True,
        text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert process.returncode == 2, process.stderr[-2000:]
    errors = [line for line in process.stderr.splitlines() if line.startswith("fcd_jax: error:")]
    assert len(errors) == 1 and message in errors[0], process.stderr[-2000:]
    assert "Traceback" not in process.stderr
