"""``python -m fcd_jax.convert`` on torchvision CNNs and ``fcd_jax.models.load_pretrained`` for
every backbone, against the plain torch.nn references of tests/torchvision_reference.py."""

import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torchvision_reference as reference  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from fcd_jax import convert  # noqa: E402
from fcd_jax.convert import cli  # noqa: E402
from fcd_jax.errors import CheckpointError  # noqa: E402
from fcd_jax.models import build_vit, init_params, load_pretrained  # noqa: E402

IMAGE = 32  # VGG16's five pools leave 1 x 1
TOLERANCE = 1e-4
BUILDERS = {"vgg16": reference.VGG16, "resnet18": reference.ResNet18}


def relative_error(ours, expected) -> float:
    ours, expected = np.asarray(ours, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(ours - expected).max() / np.abs(expected).max())


@pytest.fixture(scope="module", params=[("vgg16", ".safetensors"), ("resnet18", ".pth")],
                ids=lambda p: p[0])
def torch_reference(request, tmp_path_factory):
    family, suffix = request.param
    directory = tmp_path_factory.mktemp(family)
    model = reference.randomise(BUILDERS[family](), seed=3)
    source = directory / f"{family}{suffix}"
    if suffix == ".pth":
        torch.save(model.state_dict(), source)
    else:
        save_file(reference.state_arrays(model), source)
    images = np.random.default_rng(4).standard_normal((2, IMAGE, IMAGE, 3)).astype(np.float32)
    return dict(family=family, source=source, images=images, taps=reference.taps(model, images))


def assert_taps_match(model, variables, torch_reference):
    taps = jax.jit(model.apply)(variables, torch_reference["images"])
    assert set(taps) == {"taps"}
    errors = [relative_error(ours, theirs)
              for ours, theirs in zip(taps["taps"], torch_reference["taps"], strict=True)]
    assert len(errors) == {"vgg16": 13, "resnet18": 4}[torch_reference["family"]]
    assert max(errors) <= TOLERANCE, errors


def test_cli_converts_and_load_pretrained_gives_the_reference_taps(torch_reference, tmp_path,
                                                                   capsys):
    destination = tmp_path / "teacher"
    assert cli.main([str(torch_reference["source"]), str(destination)]) == 0
    printed = capsys.readouterr().out
    assert f'"family": "{torch_reference["family"]}"' in printed
    assert convert.is_converted(destination)
    model, variables = load_pretrained(destination)
    assert_taps_match(model, variables, torch_reference)
    # The unconverted file loads the same.
    model, direct = load_pretrained(torch_reference["source"])
    jax.tree.map(np.testing.assert_array_equal, direct, variables)


def test_a_converted_cnn_with_wrong_shapes_is_one_line(torch_reference, tmp_path):
    """load_converted checks a CNN folder against ``variable_shapes`` (not the ViT's)."""
    variables, arch = convert.convert_checkpoint(torch_reference["source"])
    other = "resnet18" if arch["family"] == "vgg16" else "vgg16"
    directory = convert.save_converted(tmp_path / "mislabelled", variables,
                                       arch | {"family": other})
    with pytest.raises(CheckpointError, match="does not fit the model") as error:
        load_pretrained(directory)
    assert "\n" not in str(error.value)


def test_the_module_entry_point_runs(tmp_path):
    model = reference.randomise(reference.ResNet18(), seed=5)
    source = tmp_path / "resnet18.safetensors"
    save_file(reference.state_arrays(model), source)
    done = subprocess.run([sys.executable, "-m", "fcd_jax.convert", str(source),
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "written to" in done.stdout


def test_a_wrong_architecture_file_is_one_line(tmp_path, capsys):
    """A ResNet that is not ResNet18 (a block missing in layer4): one line, nothing written."""
    state = reference.state_arrays(reference.randomise(reference.ResNet18(), seed=6))
    state = {k: v for k, v in state.items() if not k.startswith("layer4.1.")}
    source = tmp_path / "resnet_other.safetensors"
    save_file(state, source)
    assert cli.main([str(source), str(tmp_path / "out")]) == 1
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and "ResNet18 has" in message and str(source) in message
    assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError, match="use resnet18 weights"):
        load_pretrained(source)


def test_load_pretrained_gives_a_vits_blocks(tmp_path):
    """A converted ViT folder: ``model.apply(variables, images)`` gives the blocks of the ViT
    whose params were written."""
    model_config = dict(patch_size=8, width=32, depth=3, num_heads=2, mlp_dim=64)
    vit = build_vit(model_config)
    params = jax.tree.map(np.asarray, init_params(vit, IMAGE, jax.random.key(0)))
    arch = {field: getattr(vit, field) for field in convert.ARCH_FIELDS} | dict(
        family="vit", format="test", image_size=IMAGE)
    convert.save_converted(tmp_path / "vit", params, arch)
    model, variables = load_pretrained(tmp_path / "vit")
    images = np.random.default_rng(0).standard_normal((2, IMAGE, IMAGE, 3)).astype(np.float32)
    got = jax.jit(model.apply)(variables, images)
    want = jax.jit(vit.apply)({"params": params}, images)
    assert {"blocks", "encoded"} <= set(got)
    assert got["blocks"].shape == (3, 2, 1 + (IMAGE // 8) ** 2, 32)
    np.testing.assert_allclose(got["blocks"], want["blocks"], rtol=1e-5, atol=1e-5)
