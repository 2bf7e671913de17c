"""fcd_jax.models.vgg / resnet and fcd_jax.convert_torchvision against plain torch.nn references.

The references (tests/torchvision_reference.py) rebuild torchvision's VGG16 and ResNet18 with
its state-dict keys and parameter counts. With random weights (batch-norm statistics too), saved
as ``.pth`` and ``.safetensors`` and converted, every tap must equal the reference's intermediate
output (forward hooks) on random images.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torchvision_reference as reference  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from fcd_jax import convert_torchvision as ct  # noqa: E402
from fcd_jax.convert import check_params  # noqa: E402
from fcd_jax.errors import CheckpointError, ConfigError  # noqa: E402
from fcd_jax.models import resnet, vgg  # noqa: E402

IMAGE = 64
TOLERANCE = 1e-4  # max |ours - reference| / max |reference| per tap, float32
BUILDERS = {"vgg16": reference.VGG16, "resnet18": reference.ResNet18}
FAMILIES = list(BUILDERS)
PARAMETERS = {"vgg16": reference.VGG16_PARAMETERS, "resnet18": reference.RESNET18_PARAMETERS}
SUFFIXES = (".pth", ".safetensors")


def relative_error(ours, expected) -> float:
    ours, expected = np.asarray(ours, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(ours - expected).max() / np.abs(expected).max())


def one_line_error(call, match: str) -> str:
    with pytest.raises(CheckpointError, match=match) as error:
        call()
    assert "\n" not in str(error.value)
    return str(error.value)


@functools.cache
def jitted_apply(model):
    return jax.jit(model.apply, static_argnames=("train", "mutable", "capture_intermediates"))


def build_reference(family: str, directory) -> dict:
    """A randomised reference saved as ``.pth`` and ``.safetensors``, its taps on random images,
    and the converted ``.safetensors`` file."""
    model = reference.randomise(BUILDERS[family](), seed=0)
    torch.save(model.state_dict(), directory / f"{family}.pth")
    save_file(reference.state_arrays(model), directory / f"{family}.safetensors")
    images = np.random.default_rng(1).standard_normal((2, IMAGE, IMAGE, 3)).astype(np.float32)
    return dict(family=family, model=model, directory=directory, images=images,
                taps=reference.taps(model, images), parameters=reference.count_parameters(model),
                converted=ct.convert_file(directory / f"{family}.safetensors"))


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """``references(family)``: each family's reference, built once per module (VGG16 has 138M
    parameters)."""
    return functools.cache(lambda family: build_reference(family, tmp_path_factory.mktemp(family)))


@pytest.mark.parametrize("family", FAMILIES)
def test_references_have_torchvisions_parameter_counts(references, family):
    torch_reference = references(family)
    assert torch_reference["parameters"] == PARAMETERS[family]
    # Ours holds the same weights less the classifier (VGG16: 3 Linear, ResNet18: fc).
    classifier = sum(p.numel() for name, p in torch_reference["model"].named_parameters()
                     if name.startswith(ct.CLASSIFIER_PREFIXES[family]))
    ours = sum(leaf.size for leaf in jax.tree.leaves(ct.variable_shapes({"family": family})
                                                    ["params"]))
    assert ours == PARAMETERS[family] - classifier
    assert ours == {"vgg16": 14_714_688, "resnet18": 11_176_512}[family]


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_tap_equals_the_torch_reference(references, family, suffix):
    torch_reference = references(family)
    variables, arch = ct.convert_file(torch_reference["directory"] / f"{family}{suffix}")
    assert {k: arch[k] for k in ("family", "format", "image_mean", "image_std")} == dict(
        family=family, format="torchvision", image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225])
    assert len(arch["source_sha256"]) == 64
    # .pth == .safetensors
    jax.tree.map(np.testing.assert_array_equal, variables, torch_reference["converted"][0])
    model = ct.teacher_model(arch)
    taps = jitted_apply(model)(variables, torch_reference["images"])["taps"]
    expected = torch_reference["taps"]
    assert len(taps) == len(expected) == {"vgg16": 13, "resnet18": 4}[family]
    errors = []
    for ours, theirs in zip(taps, expected, strict=True):
        assert ours.shape == theirs.shape
        errors.append(relative_error(ours, theirs))
    print(f"\n{family}{suffix}: max relative error per tap {[f'{e:.1e}' for e in errors]}")
    assert max(errors) <= TOLERANCE, errors
    if family == "vgg16":  # the comparison can fail: neighbouring taps are far apart
        assert relative_error(taps[1], expected[0]) > 0.1


def test_resnet_teacher_uses_its_running_statistics(references):
    """The converted running statistics matter: batch statistics give other taps."""
    torch_reference = references("resnet18")
    variables, arch = torch_reference["converted"]
    model = ct.teacher_model(arch)
    in_training_mode, _ = jitted_apply(model)(variables, torch_reference["images"], train=True,
                                              mutable="batch_stats")
    assert relative_error(in_training_mode["taps"][-1], torch_reference["taps"][-1]) > 0.1


# ------------------------------------------------------------------------------------------------
# Bad files and other networks: one clear line.


def resnet_state(seed: int = 0) -> dict:
    return reference.state_arrays(reference.randomise(reference.ResNet18(), seed))


def vgg_like_state() -> dict:
    """VGG16's keys with tiny tensors: enough for detect, which never reads the values."""
    state = {f"features.{i}.weight": np.zeros((1, 1, 1, 1), np.float32)
             for i in ct.VGG16_FEATURE_INDEX.values()}
    return state | {f"features.{i}.bias": np.zeros(1, np.float32)
                    for i in ct.VGG16_FEATURE_INDEX.values()}


def test_detect_names_the_family_and_rejects_other_networks():
    assert ct.detect(resnet_state())["family"] == "resnet18"
    assert ct.detect(vgg_like_state())["family"] == "vgg16"
    assert ct.detect({"patch_embed.proj.weight": np.zeros((8, 3, 4, 4))}) is None  # a timm ViT
    with_bn = vgg_like_state() | {"features.1.running_mean": np.zeros(1, np.float32)}
    one_line_error(lambda: ct.detect(with_bn), r"VGG with batch norm \(vgg\*_bn\)")
    vgg19 = vgg_like_state() | {"features.30.weight": np.zeros((1, 1, 1, 1), np.float32)}
    one_line_error(lambda: ct.detect(vgg19), "has 14 convolutions")
    state = resnet_state()
    resnet34_like = state | {"layer3.2.conv1.weight": state["layer3.1.conv1.weight"]}
    one_line_error(lambda: ct.detect(resnet34_like), r"\(2, 2, 3, 2\) basic blocks")
    bottleneck = state | {"layer1.0.conv3.weight": state["layer1.0.conv2.weight"]}
    one_line_error(lambda: ct.detect(bottleneck), "bottleneck blocks")


def test_convert_rejects_missing_misshapen_and_extra_weights():
    arch = {"family": "resnet18"}
    state = resnet_state()
    missing = {k: v for k, v in state.items() if k != "layer2.0.downsample.1.running_var"}
    one_line_error(lambda: ct.convert(missing, arch),
                   "no 'layer2.0.downsample.1.running_var': not a complete torchvision resnet18")
    wide = state | {"layer1.0.conv1.weight": np.zeros((128, 64, 3, 3), np.float32)}
    one_line_error(lambda: ct.convert(wide, arch), r"layer1.0.conv1.weight has shape "
                                                   r"\(128, 64, 3, 3\), which does not fit")
    extra = state | {"layer1.0.se.fc.weight": np.zeros((4, 64), np.float32)}
    one_line_error(lambda: ct.convert(extra, arch), "no place for: layer1.0.se.fc.weight")
    ct.convert(state, arch)  # the classifier and num_batches_tracked are dropped silently


def test_bad_files_are_one_line(tmp_path):
    save_file({"patch_embed.proj.weight": np.zeros((8, 3, 4, 4), np.float32)},
              tmp_path / "vit.safetensors")
    one_line_error(lambda: ct.convert_file(tmp_path / "vit.safetensors"),
                   "vit.safetensors: not a torchvision VGG16 or ResNet18")
    state = resnet_state()
    for suffix in SUFFIXES:
        path = tmp_path / f"resnet18{suffix}"
        if suffix == ".pth":
            torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
        else:
            save_file(state, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        message = one_line_error(lambda path=path: ct.convert_file(path), "corrupt or truncated")
        assert str(path) in message
    torch.save(reference.ResNet18(), tmp_path / "whole_model.pth")  # a pickled module
    one_line_error(lambda: ct.convert_file(tmp_path / "whole_model.pth"),
                   "Python objects besides tensors.*save model.state_dict")


def test_ddp_prefix_and_training_checkpoint_wrapper(tmp_path, references):
    torch_reference = references("resnet18")
    state = {f"module.{k}": v for k, v in torch_reference["model"].state_dict().items()}
    torch.save({"state_dict": state, "epoch": 90}, tmp_path / "checkpoint.pth")
    variables, _ = ct.convert_file(tmp_path / "checkpoint.pth")
    jax.tree.map(np.testing.assert_array_equal, variables, torch_reference["converted"][0])


def test_written_in_the_vit_converted_form(tmp_path, references):
    """orbax ``params/`` (holding the variables) + ``arch.json``, readable back exactly."""
    import orbax.checkpoint as ocp

    torch_reference = references("resnet18")
    converted = torch_reference["converted"]
    source = torch_reference["directory"] / "resnet18.safetensors"
    directory = ct.convert_and_save(source, tmp_path / "teacher")
    arch = json.loads((directory / "arch.json").read_text())
    assert arch == json.loads(json.dumps(converted[1]))
    checkpointer = ocp.StandardCheckpointer()
    restored = checkpointer.restore(directory / "params")
    checkpointer.close()
    jax.tree.map(np.testing.assert_array_equal, restored, converted[0])
    check_params(restored, ct.variable_shapes(arch))


# ------------------------------------------------------------------------------------------------
# The students.


def images(batch=2, size=IMAGE, seed=0):
    return jax.random.normal(jax.random.key(seed), (batch, size, size, 3))


def test_cloner_layout_widths_and_taps():
    teacher_shapes = [t.shape for t in jax.eval_shape(
        lambda x: vgg.vgg16_teacher().init_with_output(jax.random.key(0), x)[0], images())["taps"]]
    assert len(vgg.TAP_NAMES) == 13 and vgg.TAP_NAMES[3::3] == (
        "relu2_2", "relu3_3", "relu4_3", "relu5_3")
    for size in ("equal", "small"):
        cloner = vgg.mkdad_cloner(size)
        variables = cloner.init(jax.random.key(0), images())
        params, stats = variables["params"], variables["batch_stats"]
        assert all(set(params[name]) == {"kernel"} for name in vgg.conv_names(cloner.widths))
        # Batch norm after every conv but the last of each block (MKDAD's cloner).
        assert sorted(stats) == ["bn1_1", "bn2_1", "bn3_1", "bn3_2", "bn4_1", "bn4_2", "bn5_1",
                                 "bn5_2"]
        shapes = [t.shape for t in cloner.apply(variables, images())["taps"]]
        same = [c for c, (ours, theirs) in enumerate(zip(shapes, teacher_shapes, strict=True))
                if ours == theirs]
        assert same == (list(range(13)) if size == "equal" else [3, 6, 9, 12])
    widths = [params[name]["kernel"].shape[-1] for name in vgg.conv_names(cloner.widths)]
    assert widths == [16, 16, 16, 128, 16, 16, 256, 16, 16, 512, 16, 16, 512]
    with pytest.raises(ConfigError, match="unknown cloner size 'tiny'"):
        vgg.mkdad_cloner("tiny")


def test_resnet_taps_have_strides_4_to_32():
    shapes = jax.eval_shape(lambda x: resnet.ResNet18().init_with_output(
        jax.random.key(0), x)[0], images())["taps"]
    assert [t.shape for t in shapes] == [(2, 16, 16, 64), (2, 8, 8, 128), (2, 4, 4, 256),
                                         (2, 2, 2, 512)]


@pytest.mark.parametrize("student", [resnet.ResNet18(), vgg.mkdad_cloner("small")],
                         ids=["resnet18", "cloner"])
def test_student_batch_stats_update_in_training_mode_only(student):
    init = jax.jit(student.init)
    variables = init(jax.random.key(0), images())
    jax.tree.map(np.testing.assert_array_equal, variables, init(jax.random.key(0), images()))
    batch = images(seed=1) * 2 + 0.5
    train_taps, updates = jitted_apply(student)(variables, batch, train=True,
                                                capture_intermediates=True,
                                                mutable=("batch_stats", "intermediates"))
    moved = jax.tree.map(lambda new, old: float(jnp.abs(new - old).max()),
                         updates["batch_stats"], variables["batch_stats"])
    assert min(jax.tree.leaves(moved)) > 0  # every running mean and var moved
    # One momentum-0.9 step from mean 0: running mean = 0.1 * the batch mean (torch's 0.1).
    first = "1" if isinstance(student, resnet.ResNet18) else "1_1"
    conv_out = updates["intermediates"][f"conv{first}"]["__call__"][0]
    np.testing.assert_allclose(updates["batch_stats"][f"bn{first}"]["mean"],
                               0.1 * conv_out.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-7)
    # Inference mode (the teacher's, and the student's when scoring) changes nothing.
    eval_taps, same = jitted_apply(student)(variables, batch, train=False,
                                            mutable="batch_stats")
    jax.tree.map(np.testing.assert_array_equal, same["batch_stats"], variables["batch_stats"])
    assert relative_error(eval_taps["taps"][-1], train_taps["taps"][-1]) > 0.01
