"""The detector leaves training: ``--mode=predict``'s CSV, ``Detector.predict``, the deserialized
JAX program and onnxruntime agree on a tiny trained folder run; bad artifacts and inputs are one
line each; the README's Deploy snippets run."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
from fixtures import make_mvtec_folder
from PIL import Image

from configs import folder
from fcd_jax import main as fcd_main
from fcd_jax.datasets.image_files import load_images
from fcd_jax.detector import Detector
from fcd_jax.errors import FcdError
from fcd_jax.export import load_artifact

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SIZES = ((32, 32), (40, 56), (71, 29))  # (h, w) of the test images


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
    detector = Detector.load(str(workdir), tiny_config(data_root))
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
    assert [m.shape for m in out.maps] == list(SIZES)
    batch, _, _ = load_images(run["paths"], detector.image_size)
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
        resized = [np.asarray(Image.fromarray(m).resize((w, h), Image.BILINEAR))
                   for m, (h, w) in zip(artifact(batch)[1], SIZES, strict=True)]
        for ours, theirs in zip(resized, out.maps, strict=True):
            np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())
    arrays = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in run["paths"][:1]])
    np.testing.assert_allclose(detector.predict(arrays).scores, out.scores[:1], rtol=1e-4)


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
                  np.uint8), np.zeros((0, size, size, 3), np.uint8)]
    for images in bad_inputs:
        with pytest.raises(FcdError, match="takes uint8"):
            artifact(images)
    detector = run["detector"]
    unreadable = tmp_path / "x.png"
    unreadable.write_bytes(b"garbage")
    for images in (np.zeros((1, 8, 8, 3), np.float32), np.zeros((1, 8, 8, 2), np.uint8),
                   np.zeros((0, 8, 8, 3), np.uint8), [], [unreadable]):
        with pytest.raises(FcdError) as error:
            detector.predict(images)
        assert "\n" not in str(error.value)


def test_readme_deploy_snippets_run(run):
    section = (REPO / "README.md").read_text().split("## Deploy")[1].split("\n## ")[0]
    snippets = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(snippets) == 4
    names = dict(CONFIG=tiny_config(run["data_root"]), W=str(run["workdir"]), IMAGES=run["paths"],
                 OUT_JAX=run["jax"], OUT_ONNX=run["onnx"])
    expected = run["detector"].predict(run["paths"]).scores
    scope = dict(names)
    for snippet in snippets:
        exec(snippet, scope)  # noqa: S102 -- the README's own code
    np.testing.assert_allclose(scope["out"].scores, expected, rtol=1e-4)
    np.testing.assert_allclose(scope["score"], expected, rtol=1e-4)


def test_export_cli_writes_a_loadable_artifact(run, tmp_path, shared_compilation_cache):
    import json
    import os
    import subprocess
    import sys

    output = tmp_path / "cli.npz"
    flags = ["--config.teacher.init=random", "--config.train.steps=10",
             "--config.train.checkpoint_every=5", "--config.eval.max_heatmaps=2",
             f"--config.data.root={run['data_root']}"]
    process = subprocess.run(
        [sys.executable, "-m", "fcd_jax.export", f"--workdir={run['workdir']}",
         "--config=configs/folder.py:runlocal", *flags, "--format=jax", f"--output={output}"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, JAX_PLATFORMS="cpu", **shared_compilation_cache),
    )
    assert process.returncode == 0, process.stderr[-2000:]
    assert json.loads(process.stdout.splitlines()[-1])["run"] == "gadget"
    batch, _, _ = load_images(run["paths"], run["detector"].image_size)
    np.testing.assert_allclose(load_artifact(str(output))(batch)[0],
                               load_artifact(run["jax"])(batch)[0], rtol=1e-6)
