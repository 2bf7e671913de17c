"""``Detector.load(workdir, run=None)`` refuses what is not a trained workdir, or an ambiguous or
unknown run, in one line each, before loading anything (no training: hand-made workdirs)."""

from __future__ import annotations

import json

import pytest

from fcd_jax.detector import Detector
from fcd_jax.errors import FcdError


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
