"""CNN backbones (METHOD.md "The paper's ablations") through the production networks, train
state, stacked step, teacher cache, checkpoints, scoring, predict and reports: no second trainer.

The networks are 16 times narrower than torchvision's (``model.cnn_width_divisor``, random
teachers only) at 32 px, so that every program compiles and runs in seconds.
"""

import csv
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fixtures import make_mvtec_folder

from configs import default, folder
from fcd_jax import (
    convert,
    convert_torchvision,
    mkdad,
    networks,
    parallel,
    sizing,
    teacher,
    teacher_cache,
    train_state,
    train_step,
)
from fcd_jax import main as fcd_main
from fcd_jax.datasets.split import ArraySource
from fcd_jax.errors import CheckpointError, ConfigError, FcdError

IMAGE = 32


def cnn_config(backbone: str, reconciled: bool = True, **method):
    config = default.base_config()
    config.data.update(name="digits", image_size=IMAGE, batch_size=4)
    config.model.update(backbone=backbone, cnn_width_divisor=16)
    config.method.update(dict(gram_weight=0.0, **method))
    config.optim.update(name="adam", lr=1e-3, warmup_steps=1)
    config.teacher.init = "random"
    return teacher.reconcile(config, None) if reconciled else config


def one_line_error(error_type, call, match):
    with pytest.raises(error_type, match=match) as error:
        call()
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("overrides, message", [
    (dict(model=dict(backbone="vgg19")), r"model.backbone='vgg19' is unknown"),
    (dict(method=dict(gram_weight=1.0)), r"gram_weight=1.0 asks for L_Gram.*gram_weight=0"),
    (dict(model=dict(cloner="tiny")), r"model.cloner='tiny' is unknown"),
    (dict(model=dict(cnn_width_divisor=0)), r"cnn_width_divisor=0 must be an integer >= 1"),
    (dict(teacher=dict(init="pretrained")), r"cnn_width_divisor=16 narrows the networks"),
    (dict(method=dict(lambda_mse=-1.0)), r"lambda_mse=-1.0 must be a number >= 0"),
    (dict(data=dict(image_size=8)), r"image_size=8 is too small for vgg16: use 16"),
    (dict(method=dict(loss_taps=(3, 13))), r"loss_taps \(3, 13\) has tap indices \[13\] outside"),
    (dict(model=dict(cloner="small"), method=dict(score_taps=(5, 6))),
     r"score_taps reads taps \[5\], where the small cloner's widths differ"),
])
def test_a_bad_backbone_option_is_one_clear_line(overrides, message):
    config = cnn_config("vgg16", reconciled=False)
    for section, values in overrides.items():
        config[section].update(values)
    one_line_error(ConfigError, lambda: networks.check_backbone(config), message)


def test_a_vit_config_passes_and_the_default_taps_are_methods():
    networks.check_backbone(default.base_config())
    vgg_plan = networks.build_networks(cnn_config("vgg16")).plan
    assert (vgg_plan.loss_taps, vgg_plan.score_taps) == ((3, 6, 9, 12), (6, 9, 12))
    resnet_plan = networks.build_networks(cnn_config("resnet18")).plan
    assert resnet_plan.loss_taps == resnet_plan.score_taps == (0, 1, 2, 3)
    plan = networks.TapPlan.from_method(
        cnn_config("vgg16", loss_taps=(3, -4), score_taps=(6,)).method, "vgg16", 13)
    assert plan.loss_taps == (3, 9) and plan.read == (3, 6, 9, 12)  # the anchor's last tap too
    assert plan.on_read() == networks.TapPlan(4, (0, 2), (1,))


def test_teacher_checkpoint_of_another_family_is_one_line_and_its_spec_is_imagenets(tmp_path):
    arch = dict(family="resnet18", format="torchvision",
                **convert_torchvision.IMAGENET_NORMALISATION)
    shapes = convert_torchvision.variable_shapes(arch)
    variables = jax.tree.map(lambda leaf: np.zeros(leaf.shape, np.float32), shapes)
    convert.save_converted(tmp_path / "resnet18", variables, arch)

    def load(backbone):
        config = cnn_config(backbone, reconciled=False)
        config.model.cnn_width_divisor = 1
        config.teacher.update(init="pretrained", checkpoint=str(tmp_path / "resnet18"))
        return teacher.load_teacher(config, str(tmp_path / "workdir"))

    loaded = load("resnet18")
    assert not loaded.is_random and set(loaded.params) == {"params", "batch_stats"}
    assert loaded.config.data.mean == (0.485, 0.456, 0.406)
    assert loaded.config.data.std == (0.229, 0.224, 0.225)
    one_line_error(CheckpointError, lambda: load("vgg16"),
                   r"is a resnet18 but config.model.backbone='vgg16'")
    one_line_error(CheckpointError, lambda: load("vit"),
                   r"is a resnet18 but config.model.backbone='vit'")
    missing = cnn_config("vgg16", reconciled=False)
    missing.teacher.init = "pretrained"
    one_line_error(FcdError, lambda: teacher.load_teacher(missing, str(tmp_path)),
                   r"model.backbone='vgg16' needs torchvision's ImageNet vgg16 weights")
    assert teacher.reconcile(cnn_config("vgg16", reconciled=False), None).data.mean == (
        0.485, 0.456, 0.406)  # a random CNN teacher: torchvision's normalisation too


@pytest.fixture(scope="module", params=["vgg16", "resnet18"])
def trained_step(request):
    """One production step of one split: the teacher in the step and from the cache."""
    config = cnn_config(request.param)
    loaded = teacher.load_teacher(config, "")
    nets = networks.build_networks(loaded.config)
    teacher_params = nets.teacher_params(loaded.params)
    mesh = parallel.make_mesh(1, 4, (1, 1), jax.devices()[:1])

    def fresh():
        return train_state.init_stacked_states(loaded.config, teacher_params, nets,
                                               np.array([0]), np.array([5]), mesh)

    source = ArraySource(np.random.default_rng(0).integers(0, 255, (8, IMAGE, IMAGE, 3),
                                                           dtype=np.uint8))
    images = source.get_batch(np.arange(4, 8))[None]
    step = train_step.stacked_train_step(loaded.config, nets, mesh)
    after, metrics = step(fresh(), teacher_params, images)
    cache = teacher_cache.fill_teacher_cache(loaded.config, nets, teacher_params, [source], mesh,
                                             1)
    cached_step = train_step.stacked_train_step(loaded.config, nets, mesh, cached_teacher=True)
    cached, cached_metrics = cached_step(fresh(), cache, (images, np.arange(4, 8)[None]))
    return dict(config=loaded.config, networks=nets, teacher_params=teacher_params, fresh=fresh(),
                after=after, metrics=metrics, cache=cache, cached=cached,
                cached_metrics=cached_metrics, images=images)


def test_the_step_trains_params_updates_batch_stats_and_folds_gap_into_the_anchor(trained_step):
    before, after = trained_step["fresh"], trained_step["after"]
    assert set(after.params) == {"params", "batch_stats"} and int(after.step[0]) == 1
    moved = jax.tree.map(lambda new, old: float(jnp.abs(new - old).max()), after.params,
                         before.params)
    assert min(jax.tree.leaves(moved["params"])) > 0
    assert min(jax.tree.leaves(moved["batch_stats"])) > 0  # the running update, not the optimiser
    metrics = {key: float(value[0]) for key, value in trained_step["metrics"].items()}
    assert set(metrics) == {"loss", "distill", "anchor", "lr", "grad_norm"}
    assert metrics["loss"] == pytest.approx(metrics["distill"] + metrics["anchor"], rel=1e-6)
    # The anchor after the first batch: the mean of the teacher's GAP'd last tap (eq. 1).
    config, nets = trained_step["config"], trained_step["networks"]
    images = train_step.preprocess(trained_step["images"][0], config.data)
    taps = train_step.teacher_features(trained_step["teacher_params"], images, nets)
    np.testing.assert_allclose(after.anchor[0], mkdad.gap_features(taps).mean(axis=1),
                               rtol=1e-5, atol=1e-6)


def test_the_teacher_cache_holds_the_taps_and_gives_the_same_step(trained_step):
    """The same step to float32 rounding: the cache's teacher forward is compiled in another
    program than the step's (measured: VGG16 bit-identical, ResNet18 1 ulp in one of 4 entries
    of a batch-norm statistic, its frozen batch norm fused otherwise)."""
    nets, cache = trained_step["networks"], trained_step["cache"]
    assert isinstance(cache, tuple) and len(cache) == len(nets.plan.read)
    assert all(rows.shape[:2] == (1, 8) for rows in cache)
    jax.tree.map(lambda ours, theirs: np.testing.assert_allclose(ours, theirs, rtol=1e-5,
                                                                 atol=1e-7),
                 trained_step["cached"], trained_step["after"])
    per_image = teacher_cache.image_features(trained_step["config"], nets,
                                             trained_step["teacher_params"], (IMAGE, IMAGE, 3))
    assert teacher_cache.cache_bytes(per_image, 1, 8) == sum(rows.nbytes for rows in cache)


def test_parallel_splits_auto_measures_the_cnn_step():
    config = cnn_config("resnet18")
    one, two = sizing.step_memory_bytes(config, 1), sizing.step_memory_bytes(config, 2)
    assert 0 < one < two


def run_config(data_root, backbone, **overrides):
    config = folder.get_config("runlocal")
    config.data.root = str(data_root)
    config.data.image_size = IMAGE
    config.model.update(backbone=backbone, cnn_width_divisor=16)
    config.method.gram_weight = 0.0
    config.teacher.init = "random"
    config.parallel_splits = "1"
    config.train.update(steps=3, checkpoint_every=2)
    config.eval.max_heatmaps = 2
    for section, values in overrides.items():
        config[section].update(values)
    return config


@pytest.mark.parametrize("backbone, cache", [("vgg16", "on"), ("resnet18", "off")])
def test_main_trains_evaluates_and_predicts_a_cnn_run(tmp_path, backbone, cache):
    data_root = make_mvtec_folder(tmp_path / "data", size=IMAGE)
    workdir = tmp_path / "run"
    config = run_config(data_root, backbone, train=dict(teacher_cache=cache))
    fcd_main.run(config, str(workdir), "train_and_eval")
    results = json.loads((workdir / "results.json").read_text())
    (run,) = results["runs"]
    assert 0.0 <= run["image_auroc"] <= 1.0 and run["pixel_auroc"] is not None
    assert (workdir / "runs" / run["name"] / "heatmaps.png").is_file()
    assert "teacher is random" in (workdir / "results.md").read_text()
    with np.load(workdir / "runs" / run["name"] / "scores.npz", allow_pickle=False) as saved:
        trained_scores = saved["scores"]
    # --mode=eval from the saved model (params and batch_stats) gives the very same scores.
    fcd_main.run(config, str(workdir), "eval")
    with np.load(workdir / "runs" / run["name"] / "scores.npz", allow_pickle=False) as saved:
        np.testing.assert_array_equal(saved["scores"], trained_scores)
    inputs = data_root / "bottle" / "test" / "broken"
    fcd_main.run(run_config(data_root, backbone, predict=dict(inputs=str(inputs))), str(workdir),
                 "predict")
    with open(workdir / "predict" / "predictions.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 2 and all(np.isfinite(float(row["score"])) for row in rows)
