"""The whole job of a ``--protocol`` from any source tree: for before/after timings across commits.

    python -m benchmarks.job_in_tree write mvtec_like DIR    # DIR/data + DIR/config.json
    git worktree add --detach /tmp/before 3c555a4
    python benchmarks/job_in_tree.py run /tmp/before DIR     # cold then warm, that tree's code
    python benchmarks/job_in_tree.py run . DIR

``write`` uses this tree's ``benchmarks.protocol`` (the protocol's default scale, epochs and test
images, the bench's small ViT); ``run`` imports ``fcd_jax`` and ``configs`` from TREE only, fills
that tree's default config with the recorded values (fields the tree does not know are named and
left out), and runs ``fcd_jax.experiment.train_and_evaluate`` twice in one fresh process: cold
(nothing compiled, no persistent cache) and warm. It prints both times and the AUROCs as JSON.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def write(protocol_name: str, directory: Path) -> None:
    from benchmarks import bench, protocol

    defaults = protocol.DEFAULTS[protocol_name]
    base = bench.bench_config("S/8", 32, 4, "float32", bench.PROTOCOL_MODEL)
    sizes = protocol.write_dataset(directory / "data", protocol_name, defaults["scale"], 32,
                                   defaults["num_test"])
    config = protocol.protocol_config(base, directory / "data",
                                      protocol.paper_epochs(protocol_name))
    (directory / "config.json").write_text(config.to_json())
    print(json.dumps(sizes))


def merged(node, values: dict, path: str = "") -> None:
    """``values`` written into the ConfigDict ``node``, recursively; unknown fields named."""
    import ml_collections

    for key, value in values.items():
        if key not in node:
            print(f"not in this tree's config: {path}{key}", file=sys.stderr)
        elif isinstance(value, dict) and isinstance(node[key], ml_collections.ConfigDict):
            merged(node[key], value, f"{path}{key}.")
        else:
            with node.ignore_type():
                node[key] = value


def run(tree: Path, directory: Path) -> None:
    sys.path.insert(0, str(tree.resolve()))
    from configs import default
    from fcd_jax import experiment

    config = default.get_config()
    merged(config, json.loads((directory / "config.json").read_text()))
    result = {}
    for name in ("cold", "warm"):
        start = time.perf_counter()
        runs = experiment.train_and_evaluate(config, str(directory / f"job_{name}"))["runs"]
        result[name] = time.perf_counter() - start
        result[f"{name}_auroc"] = {run["name"]: run["image_auroc"] for run in runs}
        print(f"{name}: {result[name]:.1f} s", file=sys.stderr, flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "write":
        write(args[0], Path(args[1]))
    elif command == "run":
        run(Path(args[0]), Path(args[1]))
    else:
        raise SystemExit(__doc__)
