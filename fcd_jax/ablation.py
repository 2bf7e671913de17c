"""One command per ablation of the paper (METHOD.md "The paper's ablations"):

    python -m fcd_jax.ablation --config configs/ablations/loss_terms.py[:runlocal] --workdir W

Every arm of ``config.ablation`` (see ``configs/ablations``) is the config with that arm's
overrides, run through the normal job (``fcd_jax.experiment.train_and_evaluate``) in ``W/<arm>``,
so each arm has its own checkpoints, reports and resume. Then ``W/ablation.json`` and
``W/ablation.md`` compare them: arms as columns, runs as rows, the means, and the paper's
statement beside them (its figures' bar values are not printed in the text).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from fcd_jax import compilation_cache, experiment
from fcd_jax.errors import ConfigError, FcdError
from fcd_jax.log_filter import quiet_library_logs
from fcd_jax.reports import RANDOM_TEACHER_WARNING, write_atomically

ABLATION_JSON, ABLATION_MD = "ablation.json", "ablation.md"
METRICS = ("image_auroc", "pixel_auroc", "pro", "f1")  # each a table where any run has it


def arm_configs(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
    """Arm name -> the config of that arm (without the ``ablation`` field), in table order."""
    ablation = config.get("ablation")
    if ablation is None or not ablation.arms:
        raise ConfigError("this config has no ablation arms: use a configs/ablations/*.py file")
    missing = [arm for arm in ablation.arms if arm not in ablation.overrides]
    if missing:
        raise ConfigError(f"ablation arms {missing} have no overrides in ablation.overrides")
    arms = {}
    for arm in ablation.arms:
        arm_config = config.copy_and_resolve_references()
        with arm_config.unlocked():
            del arm_config["ablation"]
            arm_config.update(ablation.overrides[arm].to_dict())
        arms[arm] = arm_config
    return arms


def _mean(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return sum(present) / len(present) if present else None


def comparison(arm_results: Mapping[str, Mapping[str, Any]], statement: str) -> dict[str, Any]:
    """``ablation.json``: per metric, ``{"rows": {run: {arm: value}}, "mean": {arm: value}}``
    (values in [0, 1], None where a run lacks the metric or an arm the run: arms on other
    datasets have other runs; each arm's mean is over its own runs), the arms, the runs (every
    arm's, in order of first appearance), the statement, and whether the teacher was random."""
    arms = list(arm_results)
    by_arm = {arm: {run["name"]: run for run in result["runs"]} for arm, result in
              arm_results.items()}
    runs = list(dict.fromkeys(run for arm in arms for run in by_arm[arm]))
    tables = {}
    for metric in METRICS:
        rows = {run: {arm: by_arm[arm].get(run, {}).get(metric) for arm in arms} for run in runs}
        if any(value is not None for row in rows.values() for value in row.values()):
            mean = {arm: _mean([rows[run][arm] for run in by_arm[arm]]) for arm in arms}
            tables[metric] = {"rows": rows, "mean": mean}
    random = any(result["teacher_is_random"] for result in arm_results.values())
    return dict(arms=arms, runs=runs, statement=statement, teacher_is_random=random,
                metrics=tables, arm_runs={arm: list(by_arm[arm]) for arm in arms})


def arm_groups(result: Mapping[str, Any]) -> list[list[str]]:
    """The arms in groups that share their runs (one dataset each), in table order."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for arm in result["arms"]:
        groups.setdefault(tuple(result["arm_runs"][arm]), []).append(arm)
    return list(groups.values())


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def comparison_markdown(result: Mapping[str, Any]) -> str:
    """``ablation.md``: one table per metric (in %) and group of arms that share their runs
    (:func:`arm_groups`: one per dataset), arms as columns, runs as rows, the mean."""
    lines = ["# Ablation", ""]
    if result["teacher_is_random"]:
        lines += [f"**{RANDOM_TEACHER_WARNING}**", ""]
    lines += [result["statement"], "", "Each arm's own reports: `<arm>/results.md`.", ""]
    for metric, table in result["metrics"].items():
        lines += [f"## {metric.replace('_', ' ')} (%)", ""]
        for arms in arm_groups(result):
            runs = result["arm_runs"][arms[0]]
            lines += ["| run | " + " | ".join(arms) + " |", "| --- |" + " ---: |" * len(arms)]
            for run in runs:
                row = table["rows"][run]
                lines.append(f"| {run} | " + " | ".join(_percent(row[arm]) for arm in arms) + " |")
            lines += [f"| **mean of {len(runs)}** | "
                      + " | ".join(_percent(table["mean"][arm]) for arm in arms) + " |", ""]
    return "\n".join(lines)


def run_ablation(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
    """Runs every arm into ``workdir/<arm>`` (finished runs are skipped, as in the main job),
    then writes ``ablation.json`` and ``ablation.md``; returns the former's content."""
    arms = arm_configs(config)  # checked before anything runs
    workdir = Path(workdir)
    arm_results = {arm: experiment.train_and_evaluate(arm_config, str(workdir / arm))
                   for arm, arm_config in arms.items()}
    result = comparison(arm_results, config.ablation.statement)
    workdir.mkdir(parents=True, exist_ok=True)
    write_atomically(workdir / ABLATION_JSON, json.dumps(result, indent=2) + "\n")
    write_atomically(workdir / ABLATION_MD, comparison_markdown(result))
    return result


FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags, defined only when it runs (importing this module beside
    ``fcd_jax.main``, which defines its own --config, must not clash)."""
    config_flags.DEFINE_config_file(
        "config", None, "A configs/ablations/*.py file, optionally with ':runlocal'.",
        lock_config=True)
    flags.DEFINE_string("workdir", None, "Where the arms' workdirs and the comparison go.")
    compilation_cache.define_flag()


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    quiet_library_logs()
    compilation_cache.enable(FLAGS.compilation_cache)
    try:
        result = run_ablation(FLAGS.config, FLAGS.workdir)
    except FcdError as error:
        print(f"fcd_jax.ablation: error: {error}", file=sys.stderr)
        sys.exit(2)
    print(comparison_markdown(result))


if __name__ == "__main__":
    define_flags()
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
