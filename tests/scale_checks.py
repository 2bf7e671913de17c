"""Checks that need 8 devices, run by ``tests/test_parallel.py`` in a subprocess.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/scale_checks.py OUT.json [CHECK]

The test process itself keeps its one CPU device; this script gets 8, runs every check in one
process (one import, shared compilations) and writes what it measured to ``OUT.json``: max
absolute differences, stacked sizes, run names. The tests assert on those numbers.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

# Cheap XLA compilation: these checks compare programs with each other, never with speed.
FAST_COMPILE_XLA_FLAGS = (
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
)

# A ViT small enough to compile in seconds; digits (8x8) upsampled to 16x16, 2 patches a side.
TINY_OVERRIDES = {
    "data.name": "digits",
    "data.image_size": 16,
    "data.batch_size": 8,
    "data.eval_batch_size": 256,
    "model.patch_size": 8,
    "model.width": 16,
    "model.depth": 2,
    "model.num_heads": 2,
    "model.mlp_dim": 32,
    "method.layers": (0, 1),
    "method.anchor_layers": (1,),
    "method.top_k": 2,
    "optim.warmup_steps": 1,
    "train.steps": 3,
    "train.log_every": 1,
    "train.checkpoint_every": 1000,
}


def tiny_flags(**overrides) -> list[str]:
    """``fcd_jax.main`` arguments for ``configs/demo.py`` with the tiny model."""
    values = {**TINY_OVERRIDES, **overrides}
    flags = ["--config=configs/demo.py"]
    for name, value in values.items():
        text = f"({','.join(map(str, value))},)" if isinstance(value, tuple) else str(value)
        flags.append(f"--config.{name}={text}")
    return flags


def tiny_config(base: str = "demo", arg: str | None = None, **overrides):
    """``configs/<base>.py`` with the tiny model (and any overrides, dotted names), reconciled
    with a random teacher."""
    import importlib

    from fcd_jax.teacher import reconcile

    config = importlib.import_module(f"configs.{base}").get_config(arg)
    for name, value in {**TINY_OVERRIDES, **overrides}.items():
        *parents, leaf = name.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return reconcile(config, None)


# --- The checks (run only in the 8-device subprocess) -------------------------------------------

# The paper's optimiser for the equality checks: Adam divides by the root of tiny squared
# gradients, which turns float32 summation-order noise (8 devices vs 1) into 1e-5 differences.
SGD = {"optim.name": "sgd", "optim.lr": 0.1}


def max_abs_diff(tree_a, tree_b) -> float:
    import jax
    import numpy as np

    diffs = jax.tree.map(
        lambda a, b: float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))),
        tree_a, tree_b,
    )
    return max(jax.tree.leaves(diffs))


_LOWERINGS = [0]


def count_lowerings() -> int:
    """Programs lowered for XLA so far in this process (each is a compilation or a cache read)."""
    if not _LOWERINGS[1:]:
        import jax

        def listen(event: str, *args, **kwargs) -> None:
            if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
                _LOWERINGS[0] += 1

        jax.monitoring.register_event_duration_secs_listener(listen)
        _LOWERINGS.append(True)
    return _LOWERINGS[0]


def teacher_for(config):
    """(a random teacher's parameters, cut to the networks' teacher; the networks)."""
    import jax

    from fcd_jax.models import init_params
    from fcd_jax.networks import build_networks

    networks = build_networks(config)
    init = jax.jit(lambda key: init_params(networks.teacher, config.data.image_size, key))
    return init(jax.random.key(1)), networks


def check_data_parallel(config) -> dict:
    """The production stacked step of one split on one device and data-parallel on 8: same
    states; compiled once per shape."""
    import jax
    import numpy as np

    from fcd_jax import parallel
    from fcd_jax.input_pipeline import load_split, train_batches
    from fcd_jax.train_state import init_stacked_states
    from fcd_jax.train_step import stacked_train_step

    teacher_params, networks = teacher_for(config)
    split = load_split(config.data, "0")
    batches = train_batches(split.train_images, config.data.batch_size, seed=0)
    batches = [next(batches)[None] for _ in range(3)]  # [1, B, h, w, c]
    out = {}
    for name, devices in (("one_device", jax.devices()[:1]), ("eight_devices", jax.devices())):
        mesh = parallel.make_mesh(1, config.data.batch_size, (1, len(devices)), devices)
        states = init_stacked_states(
            config, teacher_params["pos_embedding"], networks, np.array([0]), np.array([10]),
            mesh,
        )
        step_fn = stacked_train_step(config, networks, mesh)
        teacher = jax.device_put(teacher_params, parallel.replicated(mesh))
        layout = parallel.GlobalBatch(parallel.batch_sharding(mesh), batches[0].shape)
        losses = []
        for batch in batches:
            images = layout.assemble({0: batch[0]})
            states, metrics = step_fn(states, teacher, images)
            losses.append(float(metrics["loss"][0]))
        out[name] = {"states": jax.device_get(states), "losses": losses}
        out[name + "_param_sharding"] = str(jax.tree.leaves(states.params)[0].sharding.spec)
    compilations = step_fn._cache_size()
    wider = np.concatenate([batches[0], batches[0]], axis=1)  # another shape: a second program
    step_fn(states, teacher, jax.device_put(wider, parallel.batch_sharding(mesh)))
    one, eight = out["one_device"]["states"], out["eight_devices"]["states"]
    return {
        "max_state_diff": max_abs_diff(one, eight),
        "max_diff_by_field": {
            field: max_abs_diff(getattr(one, field), getattr(eight, field))
            for field in ("params", "anchor", "step")
        },
        "losses_one_device": out["one_device"]["losses"],
        "losses_eight_devices": out["eight_devices"]["losses"],
        "steps_taken": int(out["eight_devices"]["states"].step[0]),
        "param_sharding": out["eight_devices_param_sharding"],
        "compilations": [compilations, step_fn._cache_size()],
    }


def check_group_vs_sequential(config, workdir: Path) -> dict:
    """3 splits of different lengths (one epoch of 100%, 60%, 35% of each digit's training
    images) in one vmapped program vs one by one."""
    import dataclasses

    import numpy as np

    from fcd_jax.group_trainer import GroupTrainer
    from fcd_jax.input_pipeline import load_split

    teacher_params, networks = teacher_for(config)
    names = ["0", "1", "2"]
    splits = [load_split(config.data, name) for name in names]
    splits = [
        dataclasses.replace(split, train_images=split.train_images.subset(
            np.arange(int(len(split.train_images) * fraction))
        ))
        for split, fraction in zip(splits, (1.0, 0.6, 0.35), strict=True)
    ]

    def trained(group: list[int], directory: str):
        start, lowerings = time.perf_counter(), count_lowerings()
        with GroupTrainer(
            config, str(workdir / directory), [splits[i] for i in group], group,
            teacher_params, networks,
        ) as trainer:
            trainer.train()
            models = trainer.final_models()
        return trainer, models, time.perf_counter() - start, count_lowerings() - lowerings

    group, group_models, group_seconds, _ = trained([0, 1, 2], "group")
    sequential = [trained([i], f"alone_{i}") for i in range(3)]
    diffs = [max_abs_diff(group_models[i], sequential[i][1][0]) for i in range(3)]
    config.train.teacher_cache = "on"  # the teacher's features read from the cache instead
    cached, cached_models, *_ = trained([0, 1, 2], "group_cached")
    alone_steps = [int(np.asarray(trainer.states.step)[0]) for trainer, *_ in sequential]
    return {
        "max_model_diff": max(diffs),
        "cached_teacher": [group.cached_teacher, cached.cached_teacher],
        "max_cached_model_diff": max_abs_diff(group_models, cached_models),
        "mesh_shape": [int(size) for size in group.mesh.devices.shape],
        "num_stacked": group.num_stacked,
        "totals": [int(total) for total in group.totals],
        "group_steps": [group.steps_taken[split.name] for split in group.splits]
        + [0] * (group.num_stacked - len(group.splits)),
        "plan_sizes": list(group.plan.sizes),
        "alone_steps": alone_steps,
        "group_step_compilations": group.step_fn._cache_size(),
        "group_compiled_ahead": sorted(group.compiled),
        "alone_step_compilations": [trainer.step_fn._cache_size() for trainer, *_ in sequential],
        "alone_shares_one_step": len({id(trainer.step_fn) for trainer, *_ in sequential}) == 1,
        "alone_lowerings": [lowerings for *_, lowerings in sequential],
        "seconds_group": group_seconds,
        "seconds_alone": [seconds for _, _, seconds, _ in sequential],
    }


def check_twenty_splits(workdir: Path) -> dict:
    """CIFAR-100's 20 superclasses (tfds mock) on 8 devices: 24 stacked, 20 reported."""
    import numpy as np
    import tensorflow_datasets as tfds

    from fcd_jax import experiment
    from fcd_jax.group_trainer import GroupTrainer

    config = tiny_config(
        "cifar100_super", "runlocal",
        # The mock's 160 random labels give superclass 4 two images: one to train, one to hold out.
        **{"data.name": "cifar100", "train.steps": 2, "data.holdout_fraction": 0.5},
    )
    config.teacher.init = "random"
    config.parallel_splits = "20"
    trainers = []
    original_train = GroupTrainer.train

    def recording_train(self):
        trainers.append(self)
        original_train(self)

    GroupTrainer.train = recording_train
    try:
        with tfds.testing.mock_data(num_examples=160):
            result = experiment.train_and_evaluate(config, str(workdir))
    finally:
        GroupTrainer.train = original_train
    (trainer,) = trainers
    steps = np.asarray(trainer.states.step)
    results = json.loads((workdir / "results.json").read_text())
    return {
        "num_splits": len(trainer.splits),
        "num_stacked": trainer.num_stacked,
        "mesh_shape": [int(size) for size in trainer.mesh.devices.shape],
        "steps": [int(step) for step in steps],
        "returned_runs": [run["name"] for run in result["runs"]],
        "results_json_runs": [run["name"] for run in results["runs"]],
        "run_dirs": sorted(path.name for path in (workdir / "runs").iterdir()),
        "tensorboard_dirs": sorted(path.name for path in (workdir / "tensorboard").iterdir()),
        "step_compilations": trainer.step_fn._cache_size(),
    }


def main(out_path: str, only: list[str]) -> None:
    import jax

    jax.config.update("jax_threefry_partitionable", True)
    assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    checks = {
        "data_parallel": lambda tmp: check_data_parallel(tiny_config(**SGD)),
        "group_vs_sequential": lambda tmp: check_group_vs_sequential(
            tiny_config(**SGD, **{"train.steps": 0, "train.epochs": 1}), tmp / "three"
        ),
        "twenty_splits": lambda tmp: check_twenty_splits(tmp / "twenty"),
    }
    results, seconds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, check in checks.items():
            if not only or name in only:
                start = time.perf_counter()
                results[name] = check(Path(tmp))
                seconds[name] = time.perf_counter() - start
    results["seconds"] = seconds
    Path(out_path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # configs/
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main(sys.argv[1], sys.argv[2:])
