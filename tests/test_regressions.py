"""Three silent misconfigurations (issue 11), each run through the production programs; each of
these tests failed before the block plan and the reconciled teacher spec:

1. the teacher was cut after the last block of ``layers``/``anchor_layers``, so a Gram pair
   beyond them read a clamped gather (teacher block 9 against student block 11), and negative
   indices trained but were rejected by scoring;
2. the image normalisation a checkpoint records (``arch.json``) was never applied;
3. the LayerNorm epsilon and GELU form were taken from the checkpoint after
   ``training_config.json`` was written, so what was recorded was not what ran.
"""

import json

import jax
import ml_collections
import numpy as np
from fixtures import make_mvtec_folder

from configs import folder
from fcd_jax import evaluate, losses, parallel
from fcd_jax import main as fcd_main
from fcd_jax.input_pipeline import load_split, train_batches
from fcd_jax.models import init_params
from fcd_jax.networks import build_networks, split_keys
from fcd_jax.preprocessing import preprocess
from fcd_jax.teacher import load_teacher

IMAGENET = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])


def first_batch(config):
    split = load_split(config.data, "0")
    return next(train_batches(split.train_images, config.data.batch_size, seed=0))


def expected_first_step(setup, images, normalisation):
    """Eq. 6 on the first batch by hand: every block of the full-depth networks, the images
    normalised with ``normalisation``, the anchor the batch mean of the teacher's cls."""
    data = ml_collections.ConfigDict(dict(image_size=setup.config.data.image_size,
                                          **normalisation))
    normalised = preprocess(images, data)
    full_teacher = setup.networks.student  # the same ViT, every block
    teacher_blocks = full_teacher.apply({"params": setup.full_teacher}, normalised)["blocks"]
    student_params = jax.tree.map(lambda leaf: leaf[0], setup.states.params)
    student_blocks = setup.networks.student.apply({"params": student_params}, normalised)["blocks"]
    plan = setup.networks.plan
    method = plan.method(setup.config.method)
    anchor = losses.cls_tokens(teacher_blocks, plan.anchor_layers).mean(axis=1)
    return losses.fcd_loss(teacher_blocks, student_blocks, anchor, method)[1]


def first_step(config, single_split, teacher_params):
    setup = single_split(config, teacher_params=teacher_params)
    setup.full_teacher = teacher_params
    images = first_batch(config)
    initial = jax.tree.map(np.array, setup.states)
    _, metrics = setup.step(setup.states, setup.teacher_params, images[None])
    setup.states = initial
    return setup, images, jax.tree.map(lambda value: float(value[0]), metrics)


def random_teacher(config):
    """A random teacher of every block of the student."""
    networks = build_networks(config)
    return init_params(networks.student, config.data.image_size, split_keys(config.seed)[0])


def test_bug1_a_gram_pair_beyond_the_other_blocks_reads_the_teachers_own_block(
    tiny_config, single_split
):
    teacher = random_teacher(tiny_config())
    config = tiny_config(layers=(0, 1), anchor_layers=(1,), gram_pairs=((1, 3),))
    setup, images, metrics = first_step(config, single_split, teacher)
    assert setup.networks.teacher.depth == 4  # block 3 of the Gram pair is computed
    want = expected_first_step(setup, images, dict(mean=0.5, std=0.5))
    for term in ("loss", "distill", "gram", "anchor"):
        np.testing.assert_allclose(metrics[term], want[term], rtol=1e-5, err_msg=term)


def test_bug1_negative_block_indices_train_and_score_as_their_positive_twins(
    tiny_config, single_split
):
    teacher = random_teacher(tiny_config())
    outcomes = []
    for layers in ((-1, 1), (3, 1)):
        config = tiny_config(layers=layers, anchor_layers=(-1,) if layers[0] < 0 else (3,))
        setup = single_split(config, teacher_params=teacher)
        states, images = setup.states, first_batch(config)
        for _ in range(2):
            states, metrics = setup.step(states, setup.teacher_params, images[None])
        scored = evaluate.score_source(
            evaluate.make_score_step(config, setup.networks), setup.teacher_params,
            jax.tree.map(lambda leaf: leaf[0], states.params), states.anchor[0],
            load_split(config.data, "0").test_images.subset(np.arange(40)),
            parallel.data_mesh(jax.devices()[:1]), 20, keep_maps=0,
        )
        outcomes.append((jax.device_get(metrics), scored.scores))
    jax.tree.map(np.testing.assert_array_equal, outcomes[0], outcomes[1])


def test_bug2_the_checkpoints_image_normalisation_is_applied(
    tiny_config, single_split, converted_teacher, tmp_path
):
    config = tiny_config(reconciled=False)
    config.teacher.update(init="pretrained",
                          checkpoint=str(converted_teacher(config, **IMAGENET)))
    teacher = load_teacher(config, str(tmp_path))
    assert teacher.config.data.mean == (0.485, 0.456, 0.406)
    setup, images, metrics = first_step(teacher.config, single_split, teacher.params)
    imagenet = dict(mean=IMAGENET["image_mean"], std=IMAGENET["image_std"])
    want = expected_first_step(setup, images, imagenet)
    np.testing.assert_allclose(metrics["loss"], want["loss"], rtol=1e-5)
    google = expected_first_step(setup, images, dict(mean=0.5, std=0.5))
    assert abs(google["loss"] - want["loss"]) > 1e-3 * abs(want["loss"])  # it would show


def test_bug3_the_recorded_config_is_the_one_that_ran(converted_teacher, tmp_path):
    data_root = make_mvtec_folder(tmp_path / "data", categories=("widget",), n_train=4)
    config = folder.get_config("runlocal")
    config.data.root = str(data_root)
    config.train.steps = 1
    config.data.holdout_fraction = 0.5
    spec = dict(layernorm_eps=1e-12, gelu_approximate=True, **IMAGENET)
    config.teacher.checkpoint = str(converted_teacher(config, **spec))
    workdir = tmp_path / "run"
    fcd_main.run(config, str(workdir), "train_and_eval")
    recorded = json.loads((workdir / "training_config.json").read_text())
    assert recorded["model.layernorm_eps"] == 1e-12
    assert recorded["model.gelu_approximate"] is True
    assert recorded["data.mean"] == IMAGENET["image_mean"]
    assert recorded["data.std"] == IMAGENET["image_std"]
    trained = json.loads((workdir / "results.json").read_text())["runs"]
    fcd_main.run(config, str(workdir), "eval")  # the same command checks against what ran
    assert json.loads((workdir / "results.json").read_text())["runs"] == trained
