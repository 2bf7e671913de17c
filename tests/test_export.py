"""The detector leaves training: ``--mode=predict``'s CSV, ``Detector.predict`` (loaded from the
workdir alone), the deserialized JAX program and onnxruntime agree on a tiny trained folder run,
on inputs of several sizes and modes and a JPEG with an EXIF rotation; bad artifacts and inputs
are one line each; the README's Deploy snippets and the deployment benchmark run."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
from fixtures import make_mvtec_folder
from PIL import Image

from benchmarks import deploy_latency
from configs import folder
from fcd_jax import main as fcd_main
from fcd_jax.datasets.image_files import EXIF_ORIENTATION, load_images
from fcd_jax.detector import Detector, map_at_size, read_for_model
from fcd_jax.errors import FcdError
from fcd_jax.export import load_artifact

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SIZES = ((32, 32), (40, 56), (71, 29))  # (h, w) of the test PNGs: RGB, gray, RGBA
EXIF_STORED, EXIF_UPRIGHT = (24, 48), (48, 24)  # a JPEG stored 48 wide, shown turned by 90 deg


def tiny_config(data_root, **predict):
    config = folder.get_config("runlocal")
    config.data.root = str(data_root)
    config.teacher.init = "random"
    config.train.steps = 10
    config.train.checkpoint_every = 5
    config.eval.max_heatmaps = 2
    for key, value in predict.items():
        config.predict[key] = value
    return config


@pytest.fixture(scope="module")
def run(tmp_path_factory, shared_compilation_cache):
    data_root = make_mvtec_folder(tmp_path_factory.mktemp("data"), categories=("gadget",))
    workdir = tmp_path_factory.mktemp("workdir")
    fcd_main.run(tiny_config(data_root), str(workdir), "train_and_eval")
    images_dir = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(3)
    paths = []
    for i, (h, w) in enumerate(SIZES):
        modes = [(h, w, 3), (h, w), (h, w, 4)]
        array = rng.integers(0, 256, modes[i], dtype=np.uint8)
        paths.append(images_dir / f"{i}.png")
        Image.fromarray(array).save(paths[-1])
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # rotate 90 degrees clockwise to view
    paths.append(images_dir / "3.jpg")
    Image.fromarray(rng.integers(0, 256, (*EXIF_STORED, 3), dtype=np.uint8)).save(
        paths[-1], exif=exif, quality=95)
    detector = Detector.load(str(workdir))  # the workdir alone: no config, no training data
    exported = tmp_path_factory.mktemp("exported")
    jax_path, onnx_path = str(exported / "d.npz"), str(exported / "d.onnx")
    detector.export(jax_path, format="jax")
    detector.export(onnx_path, format="onnx")
    return dict(data_root=data_root, workdir=workdir, paths=paths, detector=detector,
                jax=jax_path, onnx=onnx_path, out=tmp_path_factory.mktemp("predict"))


def predict_csv(run):
    config = tiny_config(run["data_root"], inputs=str(run["paths"][0].parent),
                         output_dir=str(run["out"]))
    fcd_main.run(config, str(run["workdir"]), "predict")
    with open(run["out"] / "predictions.csv", newline="") as file:
        rows = {Path(row["path"]).name: row for row in csv.DictReader(file)}
    return [rows[p.name] for p in run["paths"]]


def test_predict_detector_jax_and_onnx_agree(run):
    detector = run["detector"]
    rows = predict_csv(run)
    csv_scores = np.array([float(row["score"]) for row in rows])
    csv_verdicts = np.array([row["verdict"] == "anomalous" for row in rows])
    out = detector.predict(run["paths"])
    np.testing.assert_allclose(out.scores, csv_scores, rtol=1e-4)
    np.testing.assert_array_equal(out.verdicts, csv_verdicts)
    assert [m.shape for m in out.maps] == [*SIZES, EXIF_UPRIGHT]
    batch, sizes = zip(*[read_for_model(p, detector.image_size) for p in run["paths"]],
                       strict=True)
    np.testing.assert_array_equal(np.stack(batch), load_images(run["paths"],
                                                               detector.image_size)[0])
    assert list(sizes) == [*SIZES, EXIF_UPRIGHT]
    batch = np.stack(batch)
    size = detector.image_size
    for path in (run["jax"], run["onnx"]):
        artifact = load_artifact(path)
        assert artifact.header["threshold"] == detector.threshold
        assert artifact.header["image_size"] == size and artifact.header["run"] == "gadget"
        for images in (batch, batch[:1]):  # any batch
            score, maps, anomalous = artifact(images)
            np.testing.assert_allclose(score, out.scores[: len(images)], rtol=1e-4)
            np.testing.assert_array_equal(anomalous, csv_verdicts[: len(images)])
            assert maps.shape == (len(images), size, size)
        resized = [map_at_size(m, size) for m, size in zip(artifact(batch)[1], sizes, strict=True)]
        for ours, theirs in zip(resized, out.maps, strict=True):
            np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())
    rgb, gray, rgba = (np.asarray(Image.open(p)) for p in run["paths"][:3])
    assert (rgb.ndim, gray.ndim, rgba.shape[-1]) == (3, 2, 4)
    for arrays, i in ((rgb[None], 0), (gray[None], 1), (gray[None, ..., None], 1),
                      (rgba[None], 2)):
        from_arrays = detector.predict(arrays)
        np.testing.assert_allclose(from_arrays.scores, out.scores[i: i + 1], rtol=1e-4)
        assert from_arrays.maps[0].shape == SIZES[i]


def test_config_override_gives_the_recorded_scores(run):
    """``config=`` (as ``--mode=predict`` takes it) names the run by ``splits`` and scores like
    the recorded config; a config with other training fields is refused in one line."""
    expected = run["detector"].predict(run["paths"]).scores
    config = tiny_config(run["data_root"])
    config.splits = "gadget"
    detector = Detector.load(str(run["workdir"]), config=config)
    assert detector.run == "gadget"
    np.testing.assert_allclose(detector.predict(run["paths"]).scores, expected, rtol=1e-6)
    config.optim.lr /= 2
    with pytest.raises(FcdError, match="trained with another config") as error:
        Detector.load(str(run["workdir"]), config=config)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("kind", ["truncated", "foreign", "missing"])
def test_bad_artifact_is_one_line(run, tmp_path, kind):
    for source in (run["jax"], run["onnx"]):
        bad = tmp_path / ("bad" + Path(source).suffix)
        if kind == "truncated":
            bad.write_bytes(Path(source).read_bytes()[:2000])
        elif kind == "foreign":
            bad.write_bytes(b"not an artifact at all" * 10)
        with pytest.raises(FcdError) as error:
            load_artifact(str(bad))
        assert "\n" not in str(error.value)


def test_bad_inputs_are_one_line(run, tmp_path):
    artifact = load_artifact(run["jax"])
    size = artifact.header["image_size"]
    bad_inputs = [np.zeros((1, size, size, 3), np.float32), np.zeros((1, size + 1, size, 3),
                  np.uint8), np.zeros((1, size, size, 4), np.uint8),
                  np.zeros((0, size, size, 3), np.uint8)]
    for images in bad_inputs:
        with pytest.raises(FcdError, match="takes uint8"):
            artifact(images)
    detector = run["detector"]
    unreadable = tmp_path / "x.png"
    unreadable.write_bytes(b"garbage")
    cases = {
        "dtype": (np.zeros((1, 8, 8, 3), np.float32), "must be uint8"),
        "channels": (np.zeros((1, 8, 8, 2), np.uint8), "give uint8 \\[N, H, W, 3\\]"),
        "rank": (np.zeros((8, 8), np.uint8), "give uint8"),
        "empty batch": (np.zeros((0, 8, 8, 3), np.uint8), "nothing to predict"),
        "empty list": ([], "nothing to predict"),
        "unreadable file": ([unreadable], "cannot read image"),
        "missing file": ([tmp_path / "absent.png"], "cannot read image"),
        "a folder": ([tmp_path], "cannot read image"),
    }
    for name, (images, message) in cases.items():
        with pytest.raises(FcdError, match=message) as error:
            detector.predict(images)
        assert "\n" not in str(error.value), name
    with pytest.raises(FcdError, match="cannot read image"):
        read_for_model(unreadable, size)
    with pytest.raises(FcdError, match="cannot write the artifact"):
        detector.export(str(tmp_path / "no" / "such" / "folder.npz"), format="jax")
    with pytest.raises(FcdError, match="unknown export format"):
        detector.export(str(tmp_path / "d.tflite"), format="tflite")


def test_readme_deploy_snippets_run(run):
    section = (REPO / "README.md").read_text().split("## Deploy")[1].split("\n## ")[0]
    snippets = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(snippets) == 4
    names = dict(W=str(run["workdir"]), IMAGES=run["paths"], OUT_JAX=run["jax"],
                 OUT_ONNX=run["onnx"])
    expected = run["detector"].predict(run["paths"])
    scope = dict(names)
    exec(snippets[0], scope)  # noqa: S102 -- the README's own code
    np.testing.assert_allclose(scope["out"].scores, expected.scores, rtol=1e-4)
    exec(snippets[1], scope)  # noqa: S102
    size = run["detector"].image_size
    for path in run["paths"]:  # the README's stand-alone reading is fcd_jax's
        ours, theirs = read_for_model(path, size), scope["read_for_model"](path, size)
        np.testing.assert_array_equal(ours[0], theirs[0])
        assert ours[1] == theirs[1]
    for snippet in snippets[2:]:
        scope.pop("maps", None)
        exec(snippet, scope)  # noqa: S102
        np.testing.assert_allclose(scope["score"], expected.scores, rtol=1e-4)
        for ours, theirs in zip(scope["maps"], expected.maps, strict=True):
            np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())


def test_export_cli_writes_a_loadable_artifact(run, tmp_path, shared_compilation_cache):
    import json
    import os
    import subprocess
    import sys

    output = tmp_path / "cli.npz"
    process = subprocess.run(
        [sys.executable, "-m", "fcd_jax.export", f"--workdir={run['workdir']}", "--run=gadget",
         "--format=jax", f"--output={output}"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, JAX_PLATFORMS="cpu", **shared_compilation_cache),
    )
    assert process.returncode == 0, process.stderr[-2000:]
    assert json.loads(process.stdout.splitlines()[-1])["run"] == "gadget"
    batch, _, _ = load_images(run["paths"], run["detector"].image_size)
    np.testing.assert_allclose(load_artifact(str(output))(batch)[0],
                               load_artifact(run["jax"])(batch)[0], rtol=1e-6)


def test_deploy_latency_benchmark_runs(run, tmp_path):
    """The benchmark on the tiny trained workdir (its training skipped): every contestant timed,
    agreeing with predict; its JSON written."""
    path = tmp_path / "latency.json"
    out = deploy_latency.main([f"--workdir={run['workdir']}", "--rounds=2", "--throughput_batch=3",
                               "--throughput_rounds=1", f"--json={path}"])
    (result,) = out["results"]
    assert json_keys(path) == {"args", "machine_before", "results", "load_average_after"}
    for name in deploy_latency.CONTESTANTS:
        assert len(result["latency_ms"][name]["samples"]) == 2
        assert result["latency_ms"][name]["median"] > 0
        assert result["throughput_images_s"][name]["median"] > 0
        assert result["max_rel_diff_vs_predict"][name] <= 1e-4
    assert result["latency_ratio_vs_onnx"]["onnx"] == 1.0
    assert result["run"] == "gadget" and result["image_size"] == run["detector"].image_size


def json_keys(path):
    import json

    return set(json.loads(Path(path).read_text()))
