"""The benchmark (benchmarks/bench.py) runs on a tiny model, and its PyTorch peer
(benchmarks/torch_reference.py) computes what fcd-jax computes. Nothing here is timed."""

import math
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ sits beside fcd_jax/ and is not installed
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from benchmarks import attention, bench, gemm_shapes, profile_step, torch_reference  # noqa: E402
from fcd_jax import train_state  # noqa: E402
from fcd_jax.models import build_vit  # noqa: E402
from fcd_jax.models.vit import heads_first_attention  # noqa: E402
from fcd_jax.networks import build_networks  # noqa: E402
from fcd_jax.train_step import make_stacked_step  # noqa: E402

TINY = ["model.width=32", "model.depth=4", "model.num_heads=2", "model.mlp_dim=64",
        "method.top_k=2"]
TINY_ARGS = ["--variant=S/8", "--image_size=16", *(f"--override={o}" for o in TINY)]


def bench_tiny_config(batch: int = 2) -> ml_collections.ConfigDict:
    return bench.bench_config("S/8", 16, batch, "float32", TINY)


# ---------------------------------------------------------------- the benchmark runs


def test_benchmark_runs_on_a_tiny_model_and_implementations_agree(capsys):
    result = bench.main([
        *TINY_ARGS, "--batch=2", "--score_batch=3", "--steps=2", "--score_steps=1",
        "--warmup=2", "--impls=jax,torch", "--peak_size=64",
        "--jax_variant=train.teacher_cache=on", "--splits=2", "--stack_mode=map",
        "--stack_mode=vmap",
    ])
    assert result["agreement"]["reference"] == "torch"
    for name in ("jax", "jax[train.teacher_cache=on]"):
        errors = result["agreement"]["relative_errors"][name]
        assert errors["loss"] < 1e-5 and errors["scores"] < 1e-5, name
    for stack_mode in ("map", "vmap"):  # the production programs of two splits, both ways
        stacked = result["results"][f"jax[S=2,{stack_mode}]"]
        assert stacked["train_gflop"] == pytest.approx(
            2 * result["results"]["jax"]["train_gflop"])
        assert stacked["train_images_per_s"] > 0 and stacked["score_images_per_s"] > 0
    cached = result["results"]["jax[train.teacher_cache=on]"]
    assert cached["train_gflop"] < result["results"]["jax"]["train_gflop"]  # no teacher forward
    losses = result["agreement"]["losses"]
    assert len(losses["jax"]) == 2 and losses["jax"][0] > 0
    for name in ("jax", "torch"):
        row = result["results"][name]
        assert len(row["train_step_s_all"]) == 2
        assert row["train_images_per_s"] > 0 and row["score_images_per_s"] > 0
    assert result["results"]["jax"]["compile_seconds"]["train"] > 0
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(
        r"speedup vs torch eager: \d+\.\d\d, vs torch\.compile: nan, flop utilisation: \d+%",
        last_line,
    ), last_line


def test_timed_rounds_give_every_contestant_every_place():
    """Round r starts with contestant r: the first place of a round is the slow one."""
    calls = []
    impls = [bench.Implementation(name, train_step=calls.append, score=None, to_input=None)
             for name in "abc"]
    wall, cpu = bench.timed_rounds(impls, lambda impl, _: impl.train_step(impl.name),
                                   dict.fromkeys("abc"), steps=3, settle=0)
    assert "".join(calls) == "abc" "bca" "cab"
    assert all(len(wall[name]) == len(cpu[name]) == 3 for name in "abc")


def test_disagreement_stops_the_benchmark():
    same = [np.array([1.0, 2.0])]
    assert bench.check_agreement("x", "loss", same, same, 1e-3) == 0.0
    with pytest.raises(SystemExit, match="disagrees"):
        bench.check_agreement("x", "loss", [np.array([1.0, 2.01])], same, 1e-3)


# ---------------------------------------------------------------- the PyTorch peer


def test_torch_vit_holds_the_flax_vits_weights():
    config = bench_tiny_config()
    model = build_vit(config.model)
    images = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
    params = jax.jit(model.init)(jax.random.key(0), images)["params"]
    params = jax.tree.map(  # non-zero biases and cls, so that a misplaced one shows
        lambda p: p + 0.1 * np.random.default_rng(1).normal(size=p.shape), params
    )
    expected = np.asarray(jax.jit(model.apply)({"params": params}, images)["blocks"])
    with torch.no_grad():
        blocks = torch_reference.vit_from_params(params, num_heads=2)(
            torch.from_numpy(images).permute(0, 3, 1, 2)
        )
    np.testing.assert_allclose(np.stack([b.numpy() for b in blocks]), expected,
                               rtol=1e-4, atol=1e-4)


def numpy_diff(teacher, student):
    """Eq. 8 on [..., width] arrays."""
    dot = np.sum(teacher * student, -1)
    norms = np.linalg.norm(teacher, axis=-1) * np.linalg.norm(student, axis=-1)
    return np.linalg.norm(teacher - student, axis=-1) + 1 - dot / np.maximum(norms, 1e-8)


def numpy_fcd_loss(teacher, student, anchor, layers, anchor_layer, lam):
    """Eq. 6 with the default forms, one image at a time."""
    total = 0.0
    for t, s in zip(np.moveaxis(teacher, 1, 0), np.moveaxis(student, 1, 0), strict=True):
        distill = sum(numpy_diff(t[c], s[c]).mean() for c in layers)
        anchor_term = np.linalg.norm(s[anchor_layer][0] - anchor)
        gram = 0.0
        for a, b in zip(layers[:-1], layers[1:], strict=True):
            tokens, width = t[a].shape
            g_t, g_s = t[a].T @ t[b] / tokens, s[a].T @ s[b] / tokens
            gram += np.sqrt(np.sum((g_t - g_s) ** 2)) / width
        total += distill + lam * (anchor_term + gram)
    return total / teacher.shape[1]


def numpy_scores(teacher, student, anchor, layers, anchor_layer, k):
    """Eqs. 7-10, one image at a time."""
    scores = []
    for t, s in zip(np.moveaxis(teacher, 1, 0), np.moveaxis(student, 1, 0), strict=True):
        s_d = 0.0
        for c in layers:
            diff = numpy_diff(t[c], s[c])
            s_d += diff[0] + np.sort(diff[1:])[-k:].mean()
        s_a = np.linalg.norm(t[anchor_layer][0] - anchor)
        s_a += np.linalg.norm(s[anchor_layer][0] - anchor)
        scores.append(s_d + s_a)
    return np.array(scores)


def test_torch_loss_and_scores_match_numpy_references():
    rng = np.random.default_rng(0)
    depth, batch, tokens, width, layers, anchor_layer = 4, 3, 9, 8, (0, 2, 3), 3
    teacher = rng.normal(size=(depth, batch, tokens, width))
    student = teacher + 0.5 * rng.normal(size=teacher.shape)
    anchor = rng.normal(size=width)
    as_list = lambda blocks: [torch.from_numpy(b) for b in blocks]
    loss = torch_reference.fcd_loss(as_list(teacher), as_list(student),
                                    torch.from_numpy(anchor)[None], layers, (anchor_layer,), 0.7)
    np.testing.assert_allclose(
        loss.item(), numpy_fcd_loss(teacher, student, anchor, layers, anchor_layer, 0.7), rtol=1e-10
    )
    scores = torch_reference.anomaly_scores(as_list(teacher), as_list(student),
                                            torch.from_numpy(anchor)[None], layers,
                                            (anchor_layer,), 3)
    np.testing.assert_allclose(
        scores.numpy(), numpy_scores(teacher, student, anchor, layers, anchor_layer, 3), rtol=1e-10
    )


def test_torch_anchor_is_the_running_mean_of_every_cls_seen():
    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(n, 1, 5)) for n in (3, 1, 4)]
    anchor, seen = torch.zeros(1, 5, dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    for cls in batches:
        anchor = torch_reference.update_anchor(anchor, seen, torch.from_numpy(cls))
        seen = seen + len(cls)
    np.testing.assert_allclose(anchor.numpy(), np.concatenate(batches).mean(0), rtol=1e-12)


def test_torch_learning_rate_is_fcd_jaxs():
    optim = ml_collections.ConfigDict(dict(lr=0.2, warmup_steps=5, schedule="constant"))
    schedule = torch_reference.warmup_constant_lr(optim.lr, optim.warmup_steps)
    for step in (0, 1, 4, 5, 50):
        expected = float(train_state.learning_rate(jnp.asarray(step), jnp.asarray(100), optim))
        assert schedule(step) == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------- FLOPs and config


def jaxpr_matmul_flops(jaxpr) -> float:
    """2 * M * N * K of every dot_general in a (closed) jaxpr, scan bodies times their length."""
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs_shape = eqn.invars[0].aval.shape
            contracted = math.prod(lhs_shape[d] for d in lhs_contract)
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * contracted
        for value in eqn.params.values():  # pjit, scan, remat, custom_vjp, ... bodies
            inner = getattr(value, "jaxpr", value)  # ClosedJaxpr -> Jaxpr
            if hasattr(inner, "eqns"):
                total += eqn.params.get("length", 1) * jaxpr_matmul_flops(inner)
    return total


def test_forward_flops_count_every_matmul_of_the_vit():
    config = bench_tiny_config()
    model = build_vit(config.model)
    images = jnp.zeros((1, 16, 16, 3))
    params = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
    jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, images))(params)
    arch = bench.architecture(config)
    assert bench.vit_forward_flops(arch, 16, arch["depth"]) == jaxpr_matmul_flops(jaxpr.jaxpr)


def test_train_step_flops_count_the_step_matmuls():
    """The production stacked step of one split: its jaxpr's matmuls are the analytic count
    (model FLOPs: without rematerialisation, whose recomputed products they omit) and the one
    product the attention's backward recomputes by design (q k^T, from the log-sum-exp)."""
    config = bench_tiny_config(batch=3)
    config.model.remat = False
    networks = build_networks(config)
    key = jax.random.key(0)
    teacher_params = jax.eval_shape(lambda: networks.teacher.init(
        key, jnp.zeros((1, 16, 16, 3)))["params"])
    state = lambda: train_state.create_train_state(
        config, jnp.zeros((1, 5, 32)), networks, key, 10
    )
    states = jax.eval_shape(lambda: jax.tree.map(lambda leaf: leaf[None], state()))
    images = jax.ShapeDtypeStruct((1, 3, 16, 16, 3), jnp.uint8)
    step = make_stacked_step(config, networks)
    counted = jaxpr_matmul_flops(jax.make_jaxpr(step)(states, teacher_params, images).jaxpr)
    analytic = bench.train_step_flops(config)
    arch = bench.architecture(config)
    tokens = (config.data.image_size // arch["patch_size"]) ** 2 + 1
    attention_recomputed = config.data.batch_size * arch["depth"] * 2 * tokens**2 * arch["width"]
    # The Gram backward may also differentiate the teacher's half of a stacked matmul.
    gram_teacher_backward = 3 * 3 * 4 * 5 * 32**2  # batch * pairs * 4 N D^2
    expected = analytic + attention_recomputed
    assert expected <= counted <= expected + gram_teacher_backward


def test_attention_benchmark_compares_the_same_attention(capsys):
    """benchmarks/attention.py's autodiff contestant computes fcd-jax's attention (values and
    gradients), and the benchmark runs at a tiny size with all three contestants."""
    rng = np.random.default_rng(0)
    query, key, value = (jnp.asarray(rng.standard_normal((2, 5, 2, 4)), jnp.float32)
                         for _ in range(3))
    np.testing.assert_allclose(attention.autodiff_attention(query, key, value),
                               heads_first_attention(query, key, value), rtol=1e-5, atol=1e-6)
    total = lambda function: lambda *qkv: jnp.sum(function(*qkv) ** 2)
    for ours, theirs in zip(jax.grad(total(heads_first_attention), (0, 1, 2))(query, key, value),
                            jax.grad(total(attention.autodiff_attention), (0, 1, 2))(
                                query, key, value), strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)
    seconds = attention.main(["--variant=Ti/8", "--image_size=16", "--batch=2", "--repeats=1"])
    assert len(seconds) == 3 and all(f > 0 and b > 0 for f, b in seconds.values())
    assert "scaled_dot_product_attention" in capsys.readouterr().out


def test_gemm_shapes_are_the_step_matmuls():
    """ViT-B/16 at batch 8: 8 x 197 tokens; the fused qkv, MLP and weight-gradient shapes."""
    shapes = gemm_shapes.gemm_shapes("B/16", 8)
    assert shapes["qkv"] == (1576, 768, 2304)
    assert shapes["mlp out"] == (1576, 3072, 768)
    assert shapes["weight grad, mlp in"] == (768, 1576, 3072)


def test_profile_sums_the_xla_ops_of_the_worker_threads_by_kind(tmp_path):
    """A Perfetto trace as jax.profiler writes it: only complete events on XLA's CPU worker
    threads count, wrapper events (``Thunk...::...``) and the Python thread do not."""
    import gzip
    import json

    events = [
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "tf_XLAEigen/1"}},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 8, "args": {"name": "python"}},
        {"ph": "X", "pid": 1, "tid": 7, "name": "ynn_fusion.3", "dur": 3e6},
        {"ph": "X", "pid": 1, "tid": 7, "name": "ynn_fusion", "dur": 1e6},
        {"ph": "X", "pid": 1, "tid": 7, "name": "copy_bitcast_fusion.2", "dur": 5e5},
        {"ph": "X", "pid": 1, "tid": 7, "name": "ThunkExecutor::Execute", "dur": 9e6},
        {"ph": "X", "pid": 1, "tid": 8, "name": "dot.1", "dur": 9e6},
    ]
    trace = tmp_path / "plugins" / "profile" / "run"
    trace.mkdir(parents=True)
    with gzip.open(trace / "perfetto_trace.json.gz", "wt") as file:
        json.dump({"traceEvents": events}, file)
    seconds = profile_step.op_seconds(tmp_path)
    assert seconds == {"ynn_fusion": 4.0, "copy_bitcast_fusion": 0.5}
    assert profile_step.kind_of("ynn_fusion") == "matmul"
    assert profile_step.kind_of("bitcast_dynamic-update-slice_fusion") == "scan slices and updates"
    assert profile_step.kind_of("copy_bitcast_fusion") == "copy/transpose/broadcast"
    assert profile_step.kind_of("wrapped_broadcast") == "copy/transpose/broadcast"
    assert profile_step.kind_of("negate_exponential_fusion") == "elementwise/reduce fusions"
    assert profile_step.kind_of("broadcast_divide_fusion") == "elementwise/reduce fusions"


def test_groupc_is_scaled_to_the_depth():
    assert bench.scaled_layers((3, 6, 9, 11), 12) == (3, 6, 9, 11)
    assert bench.scaled_layers((3, 6, 9, 11), 4) == (0, 1, 2, 3)
    assert bench.scaled_layers((3, 6, 9, 11), 2) == (0, 1)
    assert bench_tiny_config().method.anchor_layers == (3,)


# ---------------------------------------------------------------- the whole-job protocols


@pytest.mark.parametrize("protocol", ["mvtec_like", "cifar_like"])
def test_protocol_runs_the_whole_job_on_a_tiny_config(protocol, capsys):
    """Two categories of 8 images, one epoch: fcd-jax's train_and_evaluate (cold and warm) and
    the PyTorch loop both train and score every split, after agreeing on the losses."""
    result = bench.main([
        f"--protocol={protocol}", *TINY_ARGS, "--batch=2", "--scale=0.001", "--epochs=1",
        "--num_test=4", "--protocol_splits=2", "--steps=1", "--warmup=1", "--workers=1",
        "--no_huge_pages",
    ])
    assert len(result["train_sizes"]) == 2 and set(result["train_sizes"].values()) == {8}
    losses = result["agreement"]
    np.testing.assert_allclose(losses["jax"], losses["torch"], rtol=1e-5)
    assert result["torch_loop"]["split_steps"] == 2 * 3  # 7 images after the holdout, batch 2
    assert result["fcd_jax_cold"]["image_auroc"] == result["fcd_jax_warm"]["image_auroc"]
    # a new process reading the compilation cache the cold run wrote: the same numbers
    assert result["fcd_jax_cached"]["image_auroc"] == result["fcd_jax_cold"]["image_auroc"]
    assert list(result["fcd_jax_cold"]["image_auroc"]) == list(result["torch_loop"]["image_auroc"])
    assert result["idle_split_steps"] == 0.0  # equal sizes in one group
    assert result["evaluation"]["group_s"] > 0 and result["evaluation"]["split_by_split_s"] > 0
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"protocol {protocol}: speedup vs torch loop \d+\.\d\d, idle split-steps \d+\.\d%, "
        r"step speedup vs torch eager \d+\.\d\d",
        last_line,
    ), last_line


def test_protocol_defaults_train_the_paper_configs_epochs():
    from configs import mvtec

    mvtec_like = bench.parse_args(["--protocol=mvtec_like"])
    cifar_like = bench.parse_args(["--protocol=cifar_like", "--epochs=3"])
    assert mvtec_like.epochs == mvtec.get_config().train.epochs == 100
    assert (cifar_like.epochs, cifar_like.scale, cifar_like.num_test) == (3, 0.02, 200)
    assert bench.parse_args([]).scale is None  # the step benchmark has no protocol sizes


def test_idle_split_steps_is_the_production_plans():
    """Two slots, training sets of 8, 16 and 40 images at batch 4 (2, 4 and 10 steps): fixed
    groups of two would compute 2 x 4 + 2 x 10 split-steps for 16 useful ones; the schedule puts
    the 8-image split in the slot the 16-image one frees and re-stacks the tail into one slot."""
    from fcd_jax import schedule

    config = bench_tiny_config(batch=4)
    config.train.update(epochs=1, steps=0)
    config.parallel_splits = "2"
    idle = bench.idle_split_steps(config, [8, 16, 40])
    assert idle == schedule.idle_fraction(schedule.plan_for(config, [8, 16, 40], 2))
    assert schedule.fixed_groups_idle_fraction([2, 4, 10], 2, 1) == pytest.approx(1 - 16 / 28)
    assert idle < 1 - 16 / 28


def test_job_in_tree_writes_the_protocol_and_fills_an_older_config(tmp_path, capsys):
    """``benchmarks/job_in_tree.py``: the protocol's data and config for a run from another
    tree; recorded fields that tree's config lacks are named and left out."""
    import json

    from benchmarks import job_in_tree, protocol
    from configs import default

    job_in_tree.write("mvtec_like", tmp_path)
    recorded = json.loads((tmp_path / "config.json").read_text())
    assert recorded["train"]["epochs"] == protocol.paper_epochs("mvtec_like")
    assert len(list((tmp_path / "data").iterdir())) == len(protocol.MVTEC_TRAIN_SIZES)
    older = default.get_config()
    with older.unlocked():
        del older.model["remat_policy"]
    job_in_tree.merged(older, recorded)
    assert older.data.root == str(tmp_path / "data") and "remat_policy" not in older.model
    assert "not in this tree's config: model.remat_policy" in capsys.readouterr().err
