"""Times fcd-jax's production train and score steps beside the same steps in PyTorch
(``torch_reference.py``): the stacked train step of one split (``train_step.stacked_train_step``)
and the score step (``evaluate.make_score_step``, anomaly map included).

Run from the repository root (BENCHMARKS.md lists the commands behind every number)::

    python -m benchmarks.bench --variant=B/16 --image_size=224 --batch=8 --score_batch=32

One invocation builds one random teacher and student, loads the very same weights into fcd-jax
and into PyTorch (eager and ``torch.compile``), asserts that every implementation gives the same
losses and scores (``--rtol``), then times them. Timed steps are interleaved (one step of each
implementation per round) so that the drift of a shared machine hits all of them alike; only the
ratios of one run are meaningful. The last line printed is::

    speedup vs torch eager: X.XX, vs torch.compile: Y.YY, flop utilisation: Z%

where the utilisation is the analytic model FLOP/s of fcd-jax's train step over the float32 (or
``--dtype``) matmul peak measured by a ``jnp.dot`` in the same run.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported, see torch_reference

import argparse  # noqa: E402
import ast  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from configs import default  # noqa: E402
from fcd_jax import evaluate, parallel, teacher_cache  # noqa: E402
from fcd_jax.datasets.split import ArraySource  # noqa: E402
from fcd_jax.models import init_params  # noqa: E402
from fcd_jax.models.vit import parse_variant  # noqa: E402
from fcd_jax.networks import build_networks  # noqa: E402
from fcd_jax.teacher import reconcile  # noqa: E402
from fcd_jax.train_state import FROZEN_POS_EMBEDDING, init_stacked_states  # noqa: E402
from fcd_jax.train_step import stacked_train_step  # noqa: E402

PAPER_DEPTH = 12  # groupc {3, 6, 9, 11} is given for ViT-B's 12 blocks
CPU_REFERENCE = "jax_cpu_f32"  # fcd-jax in float32 on the host CPU, the reference of a GPU run


# ---------------------------------------------------------------- configuration


def scaled_layers(layers: Sequence[int], depth: int) -> tuple[int, ...]:
    """groupc of a 12-block ViT mapped onto ``depth`` blocks (``(3, 6, 9, 11)`` at depth 4:
    ``(0, 1, 2, 3)``); block c ends the fraction (c + 1) / 12 of the network."""
    scaled = [max(0, round((c + 1) * depth / PAPER_DEPTH) - 1) for c in layers]
    return tuple(sorted(set(scaled)))


def bench_config(variant: str, image_size: int, batch: int, dtype: str = "float32",
                 overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """The default config (METHOD.md defaults) at this size, with ``key=value`` overrides
    (``model.scan_layers=False``, ``model.width=32``, ...) applied last, reconciled with a random
    teacher (``teacher.reconcile``)."""
    config = default.get_config()
    config.model.variant = variant
    config.model.dtype = dtype
    config.data.image_size = image_size
    config.data.batch_size = batch
    config.teacher.init = "random"
    for override in overrides:
        apply_override(config, override)
    depth = int(config.model.get("depth") or parse_variant(config.model.variant)["depth"])
    if depth != PAPER_DEPTH:
        config.method.layers = scaled_layers(config.method.layers, depth)
        config.method.anchor_layers = scaled_layers(config.method.anchor_layers, depth)
    return reconcile(config, None)


def apply_override(config: ml_collections.ConfigDict, override: str) -> None:
    """``"model.scan_layers=False"`` -> ``config.model.scan_layers = False`` (typed as before)."""
    key, _, text = override.partition("=")
    *parents, name = key.strip().split(".")
    node = config
    for parent in parents:
        node = node[parent]
    if name not in node:
        raise SystemExit(f"unknown config field {key!r} in override {override!r}")
    old = node[name]
    if isinstance(old, bool):
        value: Any = text.strip().lower() in ("1", "true", "yes")
    elif isinstance(old, tuple):
        value = tuple(int(v) for v in text.strip("()").split(",") if v.strip())
    elif old is None:  # unset until the teacher's spec fills it: a Python literal
        value = ast.literal_eval(text.strip())
    else:
        value = type(old)(text)
    with config.unlocked():
        node[name] = value


def architecture(config: ml_collections.ConfigDict) -> dict[str, int]:
    """patch_size, width, depth, num_heads, mlp_dim of ``config.model``."""
    arch = parse_variant(config.model.variant)
    for name in arch:
        if config.model.get(name):
            arch[name] = int(config.model[name])
    return arch


# ---------------------------------------------------------------- analytic FLOPs


def vit_forward_flops(arch: dict[str, int], image_size: int, depth: int) -> float:
    """Matmul FLOPs (2 per multiply-add) of one image through the patch embedding and ``depth``
    encoder blocks: qkv, q k^T, attention-weighted values, output projection, the two MLP layers.
    LayerNorm, softmax, GELU and the residual adds are not counted."""
    patch, width, mlp_dim = arch["patch_size"], arch["width"], arch["mlp_dim"]
    patches = (image_size // patch) ** 2
    tokens = patches + 1
    embedding = 2 * patches * (patch * patch * 3) * width
    attention = 2 * tokens * width * 3 * width + 2 * 2 * tokens * tokens * width
    attention += 2 * tokens * width * width
    mlp = 2 * 2 * tokens * width * mlp_dim
    return float(embedding + depth * (attention + mlp))


def reads_teacher_cache(config: ml_collections.ConfigDict) -> bool:
    """``train.teacher_cache=on``: the contestant times the step that reads the teacher's features
    from the teacher cache, as training with the cache runs it."""
    return config.train.teacher_cache == "on"


def train_step_flops(config: ml_collections.ConfigDict) -> float:
    """Model FLOPs of one train step (whole batch): teacher forward to the last block used (none
    when it reads the teacher cache), student forward + backward (3x forward; the patch embedding
    needs no input gradient, so 2x for it), and the Gram matrices (2 N D^2 each for T and S, and
    twice that for S's backward)."""
    arch, size = architecture(config), config.data.image_size
    plan = build_networks(config).plan
    teacher = vit_forward_flops(arch, size, plan.teacher_depth)
    if reads_teacher_cache(config):
        teacher = 0.0
    student = 3 * vit_forward_flops(arch, size, arch["depth"])
    student -= vit_forward_flops(arch, size, 0)  # no gradient w.r.t. the images
    tokens = (size // arch["patch_size"]) ** 2 + 1
    gram = len(plan.gram_pairs) * 8 * tokens * arch["width"] ** 2
    return config.data.batch_size * (teacher + student + gram)


def score_step_flops(config: ml_collections.ConfigDict, batch: int, splits: int = 1) -> float:
    """Model FLOPs of scoring ``batch`` shared images with ``splits`` students: one teacher
    forward and ``splits`` student forward passes per image."""
    arch, size = architecture(config), config.data.image_size
    teacher = vit_forward_flops(arch, size, build_networks(config).plan.teacher_depth)
    return batch * (teacher + splits * vit_forward_flops(arch, size, arch["depth"]))


# ---------------------------------------------------------------- machine measurements


def best_seconds(run: Callable[[], Any], repeats: int) -> float:
    """Fastest of ``repeats`` calls of ``run`` (which must block until its work is done)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def jax_matmul_peak(size: int, dtype: str, repeats: int = 5) -> float:
    """FLOP/s of the best of ``repeats`` ``size``^3 ``jnp.dot``s in ``dtype`` (default device)."""
    keys = jax.random.split(jax.random.key(0))
    a, b = (jax.random.normal(k, (size, size), jnp.dtype(dtype)) for k in keys)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    return 2 * size**3 / best_seconds(lambda: dot(a, b).block_until_ready(), repeats)


def torch_matmul_peak(size: int, repeats: int = 5) -> float:
    """FLOP/s of the best of ``repeats`` float32 ``size``^3 ``torch.mm``s (MKL on this CPU)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    return 2 * size**3 / best_seconds(lambda: torch.mm(a, b), repeats)


class HostMemory:
    """Peak resident memory of this process over a phase (Linux: VmHWM, reset via clear_refs)."""

    def __init__(self):
        self.start_rss = 0

    @staticmethod
    def _status(field_name: str) -> int:
        try:
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith(field_name + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def reset(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")  # resets VmHWM to the current RSS
        except OSError:
            pass
        self.start_rss = self._status("VmRSS")

    def peak_increase(self) -> int:
        """Bytes by which the peak RSS since :meth:`reset` exceeded the RSS at the reset."""
        return max(0, self._status("VmHWM") - self.start_rss)


def device_peak_bytes() -> int | None:
    """Peak bytes in use on the default device since start, where the backend reports it."""
    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


# ---------------------------------------------------------------- implementations


@dataclass
class Implementation:
    """One contestant: ``train_step(images)`` -> loss (float), ``score(images)`` -> scores."""

    name: str
    train_step: Callable[[Any], float]
    score: Callable[[Any], np.ndarray]
    to_input: Callable[[np.ndarray], Any]  # host uint8 images -> what the train step takes
    to_score_input: Callable[[np.ndarray], Any] | None = None  # ... the score step (to_input)
    block: Callable[[], None] = lambda: None  # waits until dispatched work is done
    compile_seconds: dict[str, float] = field(default_factory=dict)
    host_peak_bytes: int = 0  # peak RSS increase over building and warming up
    step_peak_bytes: int = 0  # ... over the warm-up steps alone: the step's own memory
    flops: float = 0.0  # of one train step, for the utilisation of this implementation
    splits: int = 1  # splits a train or score call steps: images per call = splits * batch


class JaxFcd:
    """fcd-jax's production programs for ``num_splits`` splits on ``device`` (default: JAX's
    default device), every split starting from the same student: the stacked train step
    (``train_step.stacked_train_step``) and the group score step of ``evaluate.evaluate_splits``
    on a test batch the splits share, without maps, as for test sets without masks
    (``evaluate.make_group_score_step``: one teacher forward, every student). With
    ``train.teacher_cache=on`` the train step is the one that reads the teacher cache, filled
    (``teacher_cache.fill_teacher_cache``) with the benchmark batch before timing, as in training
    with the teacher cache."""

    def __init__(self, config: ml_collections.ConfigDict, teacher_params: dict,
                 student_params: dict, images: np.ndarray, score_images: np.ndarray,
                 device: jax.Device | None = None, num_splits: int = 1):
        device = device or jax.devices()[0]
        self.num_splits = num_splits
        with jax.default_device(device):
            self._build(config, teacher_params, student_params, images, score_images, device)

    def _build(self, config: ml_collections.ConfigDict, teacher_params: dict,
               student_params: dict, images: np.ndarray, score_images: np.ndarray,
               device: jax.Device) -> None:
        networks = build_networks(config)
        num_splits = self.num_splits
        self.mesh = mesh = parallel.make_mesh(1, config.data.batch_size, (1, 1), [device])
        self.cached = reads_teacher_cache(config)
        # device_put copies: the host arrays are shared by every contestant, the state is donated.
        self.teacher_params = jax.device_put(
            networks.teacher_params(teacher_params), parallel.replicated(mesh)
        )
        states = init_stacked_states(
            config, self.teacher_params["pos_embedding"], networks, np.arange(num_splits),
            np.full(num_splits, 10**6), mesh,
        )
        self.states = states.replace(params=jax.device_put(
            jax.tree.map(lambda leaf: np.repeat(np.asarray(leaf)[None], num_splits, 0),
                         student_params),
            parallel.stacked_sharding(mesh),
        ))
        self.compile_seconds: dict[str, float] = {}
        start = time.perf_counter()
        self.teacher_source = self.teacher_params
        if self.cached:
            self.teacher_source = teacher_cache.fill_teacher_cache(
                config, networks, self.teacher_params, [ArraySource(images)] * num_splits, mesh,
                num_splits,
            )
        self._train = stacked_train_step(config, networks, mesh, self.cached).lower(
            self.states, self.teacher_source, self.to_input(images)
        ).compile()
        self.compile_seconds["train"] = time.perf_counter() - start
        self.memory = self._train.memory_analysis()
        start = time.perf_counter()
        self._score = evaluate.make_group_score_step(config, networks).lower(
            self.teacher_params, self.states.params, self.states.anchor, None,
            self.to_score_input(score_images), with_maps=False,
        ).compile()
        self.compile_seconds["score"] = time.perf_counter() - start

    def to_input(self, images: np.ndarray) -> Any:
        """Every split's batch ``[S, B, ...]``, the same images (with the cache: and their indices
        into it)."""
        stacked = np.repeat(images[None], self.num_splits, 0)
        batch = jax.device_put(stacked, parallel.batch_sharding(self.mesh))
        if not self.cached:
            return batch
        indices = np.repeat(np.arange(len(images), dtype=np.int32)[None], self.num_splits, 0)
        return batch, jax.device_put(indices, parallel.batch_sharding(self.mesh))

    def to_score_input(self, images: np.ndarray) -> jax.Array:
        return jax.device_put(images[None], parallel.all_devices_sharding(self.mesh))

    def train_step(self, batch: Any) -> jax.Array:
        """One step of every split; the first split's loss (all splits see the same batch)."""
        self.states, metrics = self._train(self.states, self.teacher_source, batch)
        return metrics["loss"][0]

    def score(self, images: jax.Array) -> jax.Array:
        """Every split's student on one shared batch (one teacher forward); the first split's
        scores (all students are equal)."""
        scores = self._score(self.teacher_params, self.states.params, self.states.anchor, None,
                             images)["score"]
        return scores[0]

    def block(self) -> None:
        jax.block_until_ready(self.states)


def jax_implementation(name: str, config: ml_collections.ConfigDict, teacher_params: dict,
                       student_params: dict, images: np.ndarray, score_images: np.ndarray,
                       memory: HostMemory, device: jax.Device | None = None,
                       num_splits: int = 1) -> Implementation:
    memory.reset()
    device = device or jax.devices()[0]
    fcd = JaxFcd(config, teacher_params, student_params, images, score_images, device,
                 num_splits)
    impl = Implementation(
        name, fcd.train_step, fcd.score, block=fcd.block,
        to_input=fcd.to_input, to_score_input=fcd.to_score_input,
        compile_seconds=fcd.compile_seconds, flops=num_splits * train_step_flops(config),
        splits=num_splits,
    )
    impl.host_peak_bytes = memory.peak_increase()
    return impl


def time_evaluation(config: ml_collections.ConfigDict, directory: Path, teacher_params: dict,
                    student_params: dict) -> dict[str, float]:
    """Wall seconds of scoring every split of ``config`` (one student each, the same weights)
    split by split (``evaluate.evaluate_split``, the teacher on every split's test set) and as
    one group (``evaluate.evaluate_splits``), each after an untimed run that compiles it."""
    from fcd_jax.input_pipeline import load_split, select_splits

    networks = build_networks(config)
    splits = [load_split(config.data, name) for name in select_splits(config)]
    mesh = parallel.data_mesh()
    teacher = jax.device_put(networks.teacher_params(teacher_params), parallel.replicated(mesh))
    model = jax.device_put({"params": student_params, "anchor": np.zeros(
        (len(config.method.anchor_layers), architecture(config)["width"]), np.float32)},
        parallel.replicated(mesh))
    score_step = evaluate.make_score_step(config, networks)
    run_dirs = [str(directory / split.name) for split in splits]

    def split_by_split():
        for split, run_dir in zip(splits, run_dirs, strict=True):
            evaluate.evaluate_split(config, split, model, teacher, score_step, mesh, run_dir)

    def group():
        evaluate.evaluate_splits(config, splits, [model] * len(splits), teacher, networks, mesh,
                                 run_dirs)

    seconds = {}
    for name, run in (("split_by_split_s", split_by_split), ("group_s", group)):
        run()
        start = time.perf_counter()
        run()
        seconds[name] = time.perf_counter() - start
    return seconds


def torch_fcd(config: ml_collections.ConfigDict, teacher_params: dict, student_params: dict,
              compile_mode: str | None) -> Any:
    """``torch_reference.TorchFcd`` holding these weights, with ``config``'s method and SGD
    (``compile_mode`` None: eager)."""
    from benchmarks import torch_reference

    optim, method = config.optim, config.method
    if optim.name != "sgd" or optim.schedule != "constant" or optim.weight_decay:
        raise SystemExit("the PyTorch peer implements SGD with warmup then a constant lr only")
    if (method.distill_form, method.gram_form, method.anchor_update, method.image_score) != (
        "default", "default", "mean", "paper"
    ) or tuple(method.gram_pairs):
        raise SystemExit("the PyTorch peer implements METHOD.md's default forms only")
    arch = architecture(config)
    return torch_reference.TorchFcd(
        teacher_params, student_params, num_heads=arch["num_heads"], layers=method.layers,
        anchor_layers=method.anchor_layers, lam=method.lam, top_k=method.top_k,
        image_size=config.data.image_size, mean=config.data.mean, std=config.data.std,
        eps=config.model.layernorm_eps, gelu_approximate=config.model.gelu_approximate,
        lr_schedule=torch_reference.warmup_constant_lr(optim.lr, optim.warmup_steps),
        momentum=optim.momentum, clip_norm=optim.clip_norm,
        freeze_pos_embedding=method.pos_embedding == FROZEN_POS_EMBEDDING,
        compile=compile_mode is not None, compile_mode=compile_mode or None,
    )


def torch_implementation(name: str, config: ml_collections.ConfigDict, teacher_params: dict,
                         student_params: dict, compile_mode: str | None) -> Implementation:
    import torch

    fcd = torch_fcd(config, teacher_params, student_params, compile_mode)
    return Implementation(
        name, train_step=fcd.train_step, score=fcd.score, to_input=torch.from_numpy,
        flops=train_step_flops(config),
    )


# ---------------------------------------------------------------- the run


def random_weights(config: ml_collections.ConfigDict, seed: int) -> tuple[dict, dict]:
    """Host copies of a random teacher of the student's full depth (as a converted checkpoint
    would be) and a random student (with the teacher's frozen position embedding)."""
    student_model = build_networks(config).student
    size = config.data.image_size
    teacher_key, student_key = jax.random.split(jax.random.key(seed))
    teacher_params = jax.device_get(init_params(student_model, size, teacher_key))
    student_params = jax.device_get(init_params(student_model, size, student_key))
    if config.method.pos_embedding == FROZEN_POS_EMBEDDING:
        student_params = dict(student_params, pos_embedding=teacher_params["pos_embedding"])
    return teacher_params, student_params


def relative_error(value: np.ndarray, reference: np.ndarray) -> float:
    value, reference = np.asarray(value, np.float64), np.asarray(reference, np.float64)
    return float(np.max(np.abs(value - reference)) / max(np.max(np.abs(reference)), 1e-12))


def check_agreement(name: str, what: str, values: list[np.ndarray], references: list[np.ndarray],
                    rtol: float) -> float:
    """Largest relative error of ``values`` against ``references``; exits if above ``rtol``."""
    error = max(relative_error(v, r) for v, r in zip(values, references, strict=True))
    print(f"  {name:24s} {what}: max relative difference to the reference {error:.1e}")
    if not error <= rtol:
        raise SystemExit(f"{name} disagrees with the reference on the {what}: {error:.2e} > {rtol}")
    return error


def median_or_nan(values: list[float]) -> float:
    """The median, or NaN when nothing was timed (``--steps=0`` or ``--score_steps=0``)."""
    return statistics.median(values) if values else float("nan")


def timed_rounds(impls: list[Implementation], run: Callable[[Implementation, Any], Any],
                 inputs: dict[str, Any], steps: int, after_round: Callable[[], Any] = lambda: None,
                 settle: int = 1) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """``steps`` rounds, each timing one blocking call of every implementation in turn, then
    calling ``after_round`` (which re-measures the matmul peak in the same conditions).

    Before its timed call, each implementation makes ``settle`` untimed calls: a step that runs
    right after another framework's step was measured up to 24% slower than the same step run
    after itself (fcd-jax after PyTorch, ViT-S/16 batch 8: 5.3-5.5 s against 4.4 s; after
    fcd-jax: 4.4 s either way), which would bias the first contestant of every round.

    Round r starts with contestant r (mod their number): even after the settle calls the first
    contestant of a round, right after ``after_round``, was the slowest (ViT-B/16 batch 8: 7-10%
    in two runs with its role swapped), so every contestant takes every place in turn; give
    ``steps`` a multiple of the contestants for the same number of rounds in each place.

    Returns wall-clock and process CPU seconds per call; on a shared machine the CPU seconds (all
    threads together) are the steadier measure of work, the wall-clock the one that counts.
    """
    wall: dict[str, list[float]] = {impl.name: [] for impl in impls}
    cpu: dict[str, list[float]] = {impl.name: [] for impl in impls}
    for round_index in range(steps):
        first = round_index % len(impls)
        for impl in impls[first:] + impls[:first]:
            for _ in range(settle):
                jax.block_until_ready(run(impl, inputs[impl.name]))
                impl.block()
            start, start_cpu = time.perf_counter(), time.process_time()
            jax.block_until_ready(run(impl, inputs[impl.name]))
            impl.block()
            wall[impl.name].append(time.perf_counter() - start)
            cpu[impl.name].append(time.process_time() - start_cpu)
        after_round()
    return wall, cpu


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Builds, checks and times every implementation; returns everything measured."""
    uses_torch = bool({"torch", "torch_compile"} & set(args.impls)) or args.reference == "torch"
    if uses_torch:
        import torch

        torch.set_num_threads(args.torch_threads or os.cpu_count() or 1)
    config = bench_config(args.variant, args.image_size, args.batch, args.dtype, args.override)
    arch = architecture(config)
    result: dict[str, Any] = dict(
        args=vars(args), arch=arch, layers=config.method.layers,
        machine=dict(platform=platform.platform(), processor=platform.processor(),
                     cpu_count=os.cpu_count(), load_average=os.getloadavg()),
        environment={name: os.environ.get(name, "") for name in
                     ("GLIBC_TUNABLES", "OMP_WAIT_POLICY", "XLA_FLAGS", "OMP_NUM_THREADS")},
        versions=dict(python=sys.version.split()[0], jax=jax.__version__,
                      torch=torch.__version__ if uses_torch else None,
                      backend=jax.default_backend(), device=str(jax.devices()[0])),
    )
    print(f"fcd-jax benchmark: ViT-{config.model.variant} {arch}, image {args.image_size}, "
          f"batch {args.batch}, score batch {args.score_batch}, dtype {args.dtype}, "
          f"layers {config.method.layers}, on {jax.devices()[0]} ({os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.2f})")

    peak = {"jax": jax_matmul_peak(args.peak_size, args.dtype)}
    if uses_torch:
        peak["torch"] = torch_matmul_peak(args.peak_size)
    result["matmul_peak_flops"] = peak
    print("matmul peak, " + ", ".join(f"{k}: {v / 1e9:.1f} GFLOP/s" for k, v in peak.items())
          + f" (best {args.peak_size}^3 matmul: {args.dtype} for jax, float32 for torch)")

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch, args.image_size, args.image_size, 3), np.uint8)
    score_images = rng.integers(
        0, 256, (args.score_batch, args.image_size, args.image_size, 3), np.uint8
    )
    teacher_params, student_params = random_weights(config, args.seed)

    memory = HostMemory()
    impls = [jax_implementation("jax", config, teacher_params, student_params, images,
                                score_images, memory)]
    def config_with(extra: list[str]) -> ml_collections.ConfigDict:
        return bench_config(args.variant, args.image_size, args.batch, args.dtype,
                            [*args.override, *extra])

    for override in args.jax_variant:
        impls.append(jax_implementation(f"jax[{override}]", config_with(override.split(",")),
                                        teacher_params, student_params, images, score_images,
                                        memory))
    if args.splits > 1:  # the production programs of a group of splits
        for stack_mode in args.stack_mode or [None]:  # None: as the config runs them
            name, stack_config = f"jax[S={args.splits}]", config
            if stack_mode:
                name = f"jax[S={args.splits},{stack_mode}]"
                stack_config = config_with([f"stack_mode={stack_mode}"])
            impls.append(jax_implementation(name, stack_config, teacher_params, student_params,
                                            images, score_images, memory,
                                            num_splits=args.splits))
    if args.reference == CPU_REFERENCE:
        cpu_config = bench_config(args.variant, args.image_size, args.batch, "float32",
                                  args.override)
        impls.append(jax_implementation(CPU_REFERENCE, cpu_config, teacher_params,
                                        student_params, images, score_images, memory,
                                        jax.devices("cpu")[0]))
    torch_modes = {"torch": None, "torch_compile": args.torch_compile_mode}
    for name in ("torch", "torch_compile"):
        if name in args.impls or name == args.reference:
            memory.reset()
            impls.append(torch_implementation(name, config, teacher_params, student_params,
                                              torch_modes[name]))
            impls[-1].host_peak_bytes = memory.peak_increase()

    # Warm-up steps, which double as the agreement check (and torch.compile's compilation).
    inputs = {impl.name: impl.to_input(images) for impl in impls}
    score_inputs = {impl.name: (impl.to_score_input or impl.to_input)(score_images)
                    for impl in impls}
    losses: dict[str, list[np.ndarray]] = {}
    scores: dict[str, list[np.ndarray]] = {}
    print(f"warm-up and agreement ({args.warmup} train steps, then the scores):")
    for impl in impls:
        memory.reset()
        start = time.perf_counter()
        losses[impl.name] = [np.asarray(impl.train_step(inputs[impl.name])).reshape(())
                             for _ in range(args.warmup)]
        scores[impl.name] = [np.asarray(impl.score(score_inputs[impl.name]))]
        impl.step_peak_bytes = memory.peak_increase()
        impl.host_peak_bytes = max(impl.host_peak_bytes, impl.step_peak_bytes)
        if impl.name == "torch_compile":  # compiles in its first calls: report warm-up + compile
            impl.compile_seconds["first calls"] = time.perf_counter() - start
    reference = args.reference
    agreement = {}
    for impl in impls if reference in losses else []:
        if impl.name != reference:
            rtol = args.rtol if args.dtype == "float32" else args.low_precision_rtol
            agreement[impl.name] = {
                what: check_agreement(impl.name, what, values[impl.name], values[reference], rtol)
                for what, values in (("loss", losses), ("scores", scores))
            }
    result["agreement"] = dict(reference=reference, relative_errors=agreement,
                               losses={k: [float(x) for x in v] for k, v in losses.items()})

    impls = [impl for impl in impls if impl.name in args.impls or impl.name.startswith("jax[")]
    print(f"timing: {args.steps} interleaved rounds of train steps, then of score steps "
          f"({args.settle} untimed call(s) of each contestant before each timed one)")
    def remeasure_peak() -> None:  # the best of the run: a shared machine drifts by 2x
        peak["jax"] = max(peak["jax"], jax_matmul_peak(args.peak_size, args.dtype, repeats=2))
        if "torch" in peak:
            peak["torch"] = max(peak["torch"], torch_matmul_peak(args.peak_size, repeats=2))

    train_seconds, train_cpu = timed_rounds(
        impls, lambda impl, x: impl.train_step(x), inputs, args.steps, remeasure_peak,
        args.settle,
    )
    score_seconds, score_cpu = timed_rounds(
        impls, lambda impl, x: impl.score(x), score_inputs, args.score_steps, remeasure_peak,
        args.settle,
    )
    print("matmul peak, best of the run: "
          + ", ".join(f"{k}: {v / 1e9:.1f} GFLOP/s" for k, v in peak.items()))
    score_flops = score_step_flops(config, args.score_batch)
    rows = {}
    for impl in impls:
        train_median = median_or_nan(train_seconds[impl.name])
        score_median = median_or_nan(score_seconds[impl.name])
        rows[impl.name] = dict(
            train_images_per_s=impl.splits * args.batch / train_median,
            train_step_s=train_median,
            train_step_s_all=train_seconds[impl.name],
            train_cpu_s=median_or_nan(train_cpu[impl.name]),
            train_cpu_s_all=train_cpu[impl.name],
            score_cpu_s=median_or_nan(score_cpu[impl.name]),
            train_gflop=impl.flops / 1e9,
            train_gflop_per_s=impl.flops / train_median / 1e9,
            train_utilisation=impl.flops / train_median / peak["jax"],
            score_images_per_s=impl.splits * args.score_batch / score_median,
            score_step_s=score_median,
            score_gflop_per_s=(score_step_flops(config, args.score_batch, impl.splits)
                               / score_median / 1e9),
            compile_seconds=impl.compile_seconds,
            host_peak_increase_mb=impl.host_peak_bytes / 2**20,
            step_peak_increase_mb=impl.step_peak_bytes / 2**20,
        )
    result["train_flops"], result["score_flops"] = impls[0].flops, score_flops
    result["device_peak_bytes"] = device_peak_bytes()
    result["results"] = rows
    print_table(rows, result)

    jax_row = rows["jax"]
    ratios = {
        other: jax_row["train_images_per_s"] / rows[other]["train_images_per_s"]
        for other in ("torch", "torch_compile") if other in rows
    }
    result["speedup"] = ratios
    result["summary"] = (
        f"speedup vs torch eager: {ratios.get('torch', float('nan')):.2f}, "
        f"vs torch.compile: {ratios.get('torch_compile', float('nan')):.2f}, "
        f"flop utilisation: {100 * jax_row['train_utilisation']:.0f}%"
    )
    return result


# ---------------------------------------------------------------- the whole-job protocols


PROTOCOL_MODEL = ["model.width=64", "model.depth=4", "model.num_heads=2", "model.mlp_dim=128",
                  "method.top_k=4", "data.eval_batch_size=16"]


def idle_split_steps(config: ml_collections.ConfigDict, train_sizes: Sequence[int]) -> float:
    """The share of the production plan's split-steps spent on finished or padding splits: the
    plan ``group_trainer.GroupTrainer`` runs (``fcd_jax.schedule``: ``group_size_for`` slots,
    refilled and re-stacked, stacks multiples of the mesh's split axis)."""
    from fcd_jax import schedule
    from fcd_jax.sizing import group_size_for

    slots = min(group_size_for(config, len(train_sizes)), len(train_sizes))
    mesh = parallel.make_mesh(slots, config.data.batch_size, config.mesh_shape)
    plan = schedule.plan_for(config, train_sizes, slots, mesh.shape[parallel.SPLIT])
    return schedule.idle_fraction(plan)


def run_protocol(args: argparse.Namespace) -> dict[str, Any]:
    """``--protocol``: the whole job, fcd-jax's ``train_and_evaluate`` against the PyTorch loop
    of the anchors (``benchmarks/protocol.py``), on one generated dataset; the losses and scores
    of both are checked to agree first. fcd-jax runs in new processes (``protocol.
    fcd_jax_jobs_process``): cold (compiling every program, an empty compilation cache), warm
    (the same job again in that process), cached (a new process reading the cache the cold job
    wrote); the speedup of the last line is the cold one."""
    import torch

    from benchmarks import protocol
    from fcd_jax.datasets.split import holdout_count
    from fcd_jax.sizing import group_size_for

    torch.set_num_threads(args.torch_threads or os.cpu_count() or 1)
    base = bench_config(args.variant, args.image_size, args.batch, "float32",
                        [*PROTOCOL_MODEL, *args.override])
    scratch = Path(protocol.scratch_dir())
    try:
        sizes = protocol.write_dataset(scratch / "data", args.protocol, args.scale,
                                       args.image_size, args.num_test, args.protocol_splits)
        config = protocol.protocol_config(base, scratch / "data", args.epochs)
        train_sizes = [n - holdout_count(n, config.data.holdout_fraction) for n in sizes.values()]
        group = group_size_for(config, len(sizes))
        print(f"protocol {args.protocol}: {len(sizes)} splits, training sets {min(sizes.values())}"
              f"-{max(sizes.values())} images ({sum(sizes.values())} in all), {args.epochs} "
              f"epochs, batch {args.batch}, {group} splits per group, ViT {architecture(config)} "
              f"at {args.image_size} px, on {jax.devices()[0]} ({os.cpu_count()} CPUs)")

        rng = np.random.default_rng(args.seed)
        images = rng.integers(0, 256, (args.batch, args.image_size, args.image_size, 3), np.uint8)
        teacher_params, student_params = random_weights(config, args.seed)

        # Agreement, then the production step (S = the group) against one eager torch step.
        memory = HostMemory()
        single = jax_implementation("jax", config, teacher_params, student_params, images,
                                    images, memory)
        eager = torch_implementation("torch", config, teacher_params, student_params, None)
        losses = {impl.name: [np.asarray(impl.train_step(impl.to_input(images))).reshape(())
                              for _ in range(args.warmup)] for impl in (single, eager)}
        scores = {impl.name: [np.asarray(impl.score((impl.to_score_input or impl.to_input)(
            images)))] for impl in (single, eager)}
        for what, values in (("loss", losses), ("scores", scores)):
            check_agreement("jax", what, values["jax"], values["torch"], args.rtol)
        stacked = JaxFcd(config, teacher_params, student_params, images, images,
                         num_splits=group)
        stacked_impl = Implementation(f"jax[S={group}]", stacked.train_step, stacked.score,
                                      stacked.to_input, stacked.to_score_input, stacked.block)
        inputs = {impl.name: impl.to_input(images) for impl in (stacked_impl, eager)}
        for impl in (stacked_impl, eager):
            jax.block_until_ready(impl.train_step(inputs[impl.name]))
        wall, _ = timed_rounds([stacked_impl, eager], lambda impl, x: impl.train_step(x), inputs,
                               args.steps, settle=args.settle)
        step_speedup = (group * statistics.median(wall["torch"])
                        / statistics.median(wall[stacked_impl.name]))
        print(f"production step at S = {group}: {statistics.median(wall[stacked_impl.name]):.3f} "
              f"s for {group} split-steps; torch eager {statistics.median(wall['torch']):.3f} s "
              f"per split-step: step speedup {step_speedup:.2f}")
        del single, eager, stacked, stacked_impl, inputs

        torch_run = protocol.torch_loop_process(
            config, scratch / "data", teacher_params, student_params, args.workers,
            args.torch_threads or os.cpu_count() or 1,
        )
        print(f"torch loop ({args.workers} DataLoader workers, eager): "
              f"{torch_run['seconds']:.1f} s, {torch_run['split_steps']} split-steps")
        # Cold: a new process and an empty persistent compilation cache (fcd_jax.main's first
        # job), then warm: the same job again in that process; cached: a new process reading
        # the cache the cold job wrote.
        cache = str(scratch / "xla")
        cold, warm = protocol.fcd_jax_jobs_process(
            config, [str(scratch / "cold"), str(scratch / "warm")], cache)
        print(f"fcd-jax train_and_evaluate, cold (new process, compiling): "
              f"{cold['seconds']:.1f} s")
        print(f"fcd-jax train_and_evaluate, warm (programs compiled): {warm['seconds']:.1f} s")
        (cached,) = protocol.fcd_jax_jobs_process(config, [str(scratch / "cached")], cache)
        print(f"fcd-jax train_and_evaluate, a new process reading the compilation cache: "
              f"{cached['seconds']:.1f} s")
        for run in (warm, cached):
            if run["image_auroc"] != cold["image_auroc"]:
                raise SystemExit("two fcd-jax runs of the job differ: it is not deterministic")
        evaluation = time_evaluation(config, scratch / "eval", teacher_params, student_params)
        print(f"evaluation of the {len(sizes)} splits, warm: split by split (evaluate_split) "
              f"{evaluation['split_by_split_s']:.2f} s, one group (evaluate_splits) "
              f"{evaluation['group_s']:.2f} s")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    idle = idle_split_steps(config, train_sizes)
    result = dict(
        args=vars(args), protocol=args.protocol, train_sizes=sizes, group_size=group,
        machine=dict(platform=platform.platform(), cpu_count=os.cpu_count(),
                     load_average=os.getloadavg()),
        agreement={k: [float(x) for x in v] for k, v in losses.items()},
        step_seconds={k: v for k, v in wall.items()}, step_speedup=step_speedup,
        torch_loop=torch_run, fcd_jax_cold=cold, fcd_jax_warm=warm, fcd_jax_cached=cached,
        speedup_cold=torch_run["seconds"] / cold["seconds"],
        speedup_warm=torch_run["seconds"] / warm["seconds"],
        speedup_cached=torch_run["seconds"] / cached["seconds"], idle_split_steps=idle,
        evaluation=evaluation,
    )
    print(f"speedup vs torch loop, warm: {result['speedup_warm']:.2f}, new process with the "
          f"compilation cache: {result['speedup_cached']:.2f}")
    result["summary"] = (
        f"protocol {args.protocol}: speedup vs torch loop {result['speedup_cold']:.2f}, "
        f"idle split-steps {100 * idle:.1f}%, step speedup vs torch eager {step_speedup:.2f}"
    )
    return result


def print_table(rows: dict[str, dict[str, Any]], result: dict[str, Any]) -> None:
    print(f"train step: {result['train_flops'] / 1e9:.1f} GFLOP; score step: "
          f"{result['score_flops'] / 1e9:.1f} GFLOP (analytic matmul FLOPs)")
    header = (f"{'implementation':34s} {'train img/s':>11s} {'step s':>7s} {'cpu s':>6s} "
              f"{'GFLOP/s':>8s} {'util':>5s} {'score img/s':>11s} {'cpu s':>6s} "
              f"{'compile s':>10s} {'host MB':>8s} {'step MB':>8s}")
    print(header)
    for name, row in rows.items():
        compile_s = "+".join(f"{v:.1f}" for v in row["compile_seconds"].values()) or "-"
        print(f"{name:34s} {row['train_images_per_s']:11.2f} {row['train_step_s']:7.2f} "
              f"{row['train_cpu_s']:6.2f} {row['train_gflop_per_s']:8.1f} "
              f"{100 * row['train_utilisation']:4.0f}% {row['score_images_per_s']:11.2f} "
              f"{row['score_cpu_s']:6.2f} {compile_s:>10s} {row['host_peak_increase_mb']:8.0f} "
              f"{row['step_peak_increase_mb']:8.0f}")
    if result["device_peak_bytes"] is not None:
        print(f"device peak memory: {result['device_peak_bytes'] / 2**20:.0f} MB")
    jax_scores = rows["jax"]["score_images_per_s"]
    score_ratios = [f"vs {name}: {jax_scores / rows[name]['score_images_per_s']:.2f}"
                    for name in ("torch", "torch_compile") if name in rows]
    if score_ratios:
        print("score speedup " + ", ".join(score_ratios))
    for name, row in rows.items():  # the other fcd-jax contestants (--jax_variant), train step
        train_ratios = [
            f"vs {other}: {row['train_images_per_s'] / rows[other]['train_images_per_s']:.2f}"
            for other in ("torch", "torch_compile") if other in rows
        ]
        if name.startswith("jax[") and train_ratios:
            print(f"{name} train speedup " + ", ".join(train_ratios))


PROTOCOL_DEFAULTS = [("variant", "B/16", "S/8"), ("image_size", 224, 32), ("batch", 8, 4)]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default=None,
                        help="ViT variant, e.g. S/16 or B/16 (default B/16; protocol: S/8)")
    parser.add_argument("--image_size", type=int, default=None, help="default 224; protocol: 32")
    parser.add_argument("--batch", type=int, default=None, help="train batch (8; protocol: 4)")
    parser.add_argument("--score_batch", type=int, default=32)
    parser.add_argument("--dtype", default="float32", help="fcd-jax compute dtype; params: f32")
    parser.add_argument("--steps", type=int, default=10, help="timed rounds of train steps")
    parser.add_argument("--score_steps", type=int, default=5, help="timed rounds of score steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed, checked train steps")
    parser.add_argument("--settle", type=int, default=1,
                        help="untimed calls of a contestant right before each of its timed ones")
    parser.add_argument("--impls", default="jax,torch,torch_compile",
                        help="comma-separated subset of jax,torch,torch_compile")
    parser.add_argument("--override", action="append", default=[],
                        help="config override for every fcd-jax run, e.g. model.width=32")
    parser.add_argument("--splits", type=int, default=1,
                        help="> 1: also time the production programs of this many splits at once "
                             "(the stacked train step, the group score step on a shared batch); "
                             "img/s counts every split's images")
    parser.add_argument("--stack_mode", action="append", default=[],
                        help="with --splits: a stacked contestant run with this config.stack_mode "
                             "('map', 'vmap'; repeat for several); default one, the config's")
    parser.add_argument("--jax_variant", action="append", default=[],
                        help="an extra fcd-jax contestant: comma-separated overrides, e.g. "
                             "model.scan_layers=False")
    parser.add_argument("--torch_compile_mode", default="default",
                        help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    parser.add_argument("--torch_threads", type=int, default=0, help="0 = one per CPU")
    parser.add_argument("--peak_size", type=int, default=2048, help="side of the peak matmul")
    parser.add_argument("--reference", default="torch", choices=["torch", CPU_REFERENCE, "none"],
                        help="what the losses and scores are checked against (not timed unless "
                             "also in --impls); jax_cpu_f32: fcd-jax in float32 on the CPU")
    parser.add_argument("--rtol", type=float, default=1e-3)
    parser.add_argument("--low_precision_rtol", type=float, default=3e-2,
                        help="agreement tolerance when --dtype is not float32")
    parser.add_argument("--no_huge_pages", action="store_true",
                        help="do not restart with GLIBC_TUNABLES=glibc.malloc.hugetlb=1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="", help="write every measurement to this file")
    parser.add_argument("--protocol", default="", choices=["", "mvtec_like", "cifar_like"],
                        help="run the whole job end to end against the PyTorch loop instead "
                             "(benchmarks/protocol.py); --variant, --image_size, --batch and "
                             "--override set the model, a small ViT by default")
    parser.add_argument("--scale", type=float, default=None,
                        help="protocol: training-set sizes relative to MVTec AD's / CIFAR-10's "
                             "(default mvtec_like 0.05, cifar_like 0.02)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="protocol: epochs per split (default: the paper config's, "
                             "configs/mvtec.py 100, configs/cifar10.py 20)")
    parser.add_argument("--num_test", type=int, default=None,
                        help="protocol: test images a split (default mvtec_like 16, cifar_like "
                             "200, shared by its 10 splits)")
    parser.add_argument("--protocol_splits", type=int, default=0,
                        help="protocol: only the first N categories (0 = all; the tests' form)")
    parser.add_argument("--workers", type=int, default=2,
                        help="protocol: the PyTorch loop's DataLoader workers")
    args = parser.parse_args(argv)
    for name, step_default, protocol_default in PROTOCOL_DEFAULTS:
        if getattr(args, name) is None:
            setattr(args, name, protocol_default if args.protocol else step_default)
    if args.protocol:
        from benchmarks import protocol

        defaults = protocol.DEFAULTS[args.protocol]
        args.scale = defaults["scale"] if args.scale is None else args.scale
        args.num_test = defaults["num_test"] if args.num_test is None else args.num_test
        args.epochs = protocol.paper_epochs(args.protocol) if args.epochs is None else args.epochs
    args.impls = [name.strip() for name in args.impls.split(",") if name.strip()]
    return args


def reexec_with_huge_pages(argv: Sequence[str], module: str = "benchmarks.bench") -> None:
    """Restarts this process (``python -m module argv``) with glibc's malloc using transparent
    huge pages.

    Both XLA's per-step temporary buffers and PyTorch's tensors are large ``malloc``s that glibc
    maps fresh on every step: ~90k page faults per ViT-S train step at batch 2 without huge pages,
    under 1k with them. glibc reads the tunable only at start-up, hence the re-exec; it helps
    every contestant of the run alike. ``--no_huge_pages`` keeps the plain allocator.
    """
    tunable = "glibc.malloc.hugetlb=1"
    current = os.environ.get("GLIBC_TUNABLES", "")
    if tunable in current or not sys.platform.startswith("linux"):
        return
    env = dict(os.environ, GLIBC_TUNABLES=":".join(filter(None, [current, tunable])))
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if not args.no_huge_pages and __name__ == "__main__":
        reexec_with_huge_pages(sys.argv[1:] if argv is None else argv)
    result = run_protocol(args) if args.protocol else run_benchmark(args)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=1, default=str)
    print(result["summary"])
    return result


if __name__ == "__main__":
    main()
