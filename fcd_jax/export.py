"""Export a trained run as one artifact: uint8 ``[B, S, S, 3]`` -> score, map, verdict
(normalisation, truncated teacher, student, anchor, METHOD.md eqs. 7-10, threshold), dynamic batch.

``jax``: a ``.npz`` holding ``jax.export``'s serialized program and a JSON header (read with
``allow_pickle=False``). ``onnx``: ``jax2onnx`` on the closed jaxpr, header in ``metadata_props``.
Reading and resizing files of any size stays outside, in the functions ``Detector.predict`` uses:
``fcd_jax.detector.read_for_model`` (EXIF upright, RGB, PIL bilinear to ``S x S``),
``resize_for_model`` (arrays) and ``map_at_size`` (a map back at the input's upright size).

    python -m fcd_jax.export --workdir W [--run NAME] --format onnx|jax --output FILE \
        [--config C]   # optional: scoring settings other than the recorded ones
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import zipfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import fcd_jax
from fcd_jax.errors import FcdError
from fcd_jax.workdir import TRAINING_CONFIG

FORMATS = ("onnx", "jax")
HEADER_KEY = "fcd_jax"
PREPROCESSING = (
    "files: EXIF orientation applied, RGB (gray replicated, alpha dropped), PIL bilinear resize "
    "to S x S (fcd_jax.detector.read_for_model); maps back to the upright input size with PIL "
    "bilinear (fcd_jax.detector.map_at_size)"
)


def metadata(detector) -> dict[str, Any]:
    """What an artifact records of its run."""
    config = detector.saved.config
    path = os.path.join(detector.saved.directory, TRAINING_CONFIG)
    if not os.path.isfile(path):
        raise FcdError(f"{path} is missing: export a workdir that training wrote")
    with open(path, "rb") as file:
        config_hash = hashlib.sha256(file.read()).hexdigest()
    return {
        "format_version": 1, "fcd_jax_version": fcd_jax.__version__, "run": detector.run,
        "threshold": detector.threshold, "image_size": detector.image_size,
        "mean": np.asarray(config.data.mean, np.float64).tolist(),
        "std": np.asarray(config.data.std, np.float64).tolist(),
        "training_config_sha256": config_hash,
        "inputs": "uint8 [B, S, S, 3]", "outputs": ["score", "map", "anomalous"],
        "preprocessing": PREPROCESSING,
    }


def _input_spec(size: int, batch: str) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((*jax.export.symbolic_shape(batch), size, size, 3), jnp.uint8)


def export_detector(detector, path: str, format: str = "onnx") -> str:
    """Writes ``detector``'s artifact to ``path`` in ``format``; returns ``path``."""
    if format not in FORMATS:
        raise FcdError(f"unknown export format {format!r}: use one of {', '.join(FORMATS)}")
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.isdir(folder):
        raise FcdError(f"cannot write the artifact to {path}: give a file name in an existing "
                       "folder (--output=FOLDER/detector.onnx)")
    header = dict(metadata(detector), format=format)
    program = detector.program()
    if format == "jax":
        exported = jax.export.export(jax.jit(program))(_input_spec(detector.image_size, "b"))
        with open(path, "wb") as file:
            np.savez(file, program=np.frombuffer(exported.serialize(), np.uint8),
                     header=np.array(json.dumps(header)))
        return path
    import jax2onnx
    import onnx

    spec = _input_spec(detector.image_size, "B")
    closed = jax.make_jaxpr(program)(spec)
    model = jax2onnx.to_onnx(
        jax.extend.core.jaxpr_as_fun(closed), [spec], input_names=["images"],
        output_names=["score", "map", "anomalous"],
    )
    onnx.helper.set_model_props(model, {HEADER_KEY: json.dumps(header)})
    onnx.save(model, path)
    return path


class Artifact:
    """A loaded artifact: ``header`` (its metadata) and ``__call__(uint8 [B, S, S, 3])`` ->
    ``(score [B], map [B, S, S], anomalous [B])`` as NumPy arrays."""

    def __init__(self, header: dict, run):
        self.header, self._run = header, run

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        size = self.header["image_size"]
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.shape[1:] != (size, size, 3) or not len(images):
            raise FcdError(
                f"the artifact takes uint8 [B, {size}, {size}, 3], got {images.dtype} "
                f"{list(images.shape)}: read files with fcd_jax.detector.read_for_model"
            )
        return tuple(np.asarray(out) for out in self._run(images))


def _foreign(path: str, why: str) -> FcdError:
    return FcdError(f"{path} is not an fcd-jax artifact ({why}): export it again with "
                    "python -m fcd_jax.export")


def load_artifact(path: str) -> Artifact:
    """An exported ``.npz`` (JAX) or ``.onnx`` file, its header checked; one ``FcdError`` line for
    a missing, truncated or foreign file."""
    if not os.path.isfile(path):
        raise FcdError(f"no artifact at {path}: give the --output of python -m fcd_jax.export")
    with open(path, "rb") as file:
        magic = file.read(4)
    if magic.startswith(b"PK"):
        try:
            with np.load(path, allow_pickle=False) as arrays:
                header = json.loads(str(arrays["header"]))
                blob = arrays["program"].tobytes()
            exported = jax.export.deserialize(bytearray(blob))
        except (zipfile.BadZipFile, KeyError, ValueError, OSError, EOFError) as error:
            raise _foreign(path, f"unreadable JAX container: {error}") from None
        except Exception as error:  # a corrupt program makes the deserializer raise anything
            raise _foreign(path, f"corrupt JAX program: {type(error).__name__}") from None
        return Artifact(header, exported.call)
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise FcdError(
            "ONNX artifacts need the export extra: pip install 'fcd-jax[export]'"
        ) from None
    try:
        model = onnx.load(path)
        props = {p.key: p.value for p in model.metadata_props}
        header = json.loads(props[HEADER_KEY])
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        session = onnxruntime.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
    except KeyError:
        raise _foreign(path, "no fcd_jax metadata") from None
    except Exception as error:  # protobuf / onnxruntime raise their own types for bad bytes
        raise _foreign(path, f"unreadable ONNX: {type(error).__name__}") from None
    return Artifact(header, lambda images: session.run(None, {"images": images}))


def fail(message: str) -> None:
    """A user error: one line ``fcd_jax: error: ...``, exit status 2 (as ``fcd_jax.main``)."""
    print(f"fcd_jax: error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    from absl import app, flags
    from ml_collections import config_flags

    flags.DEFINE_string("workdir", None, "The workdir the run was trained in.")
    flags.DEFINE_string("run", None, "The run to export (needed when the workdir has several).")
    flags.DEFINE_enum("format", "onnx", list(FORMATS), "Artifact format.")
    flags.DEFINE_string("output", None, "The artifact file to write.")
    config_flags.DEFINE_config_file(
        "config", None, "Optional: the training config with other scoring settings (default: "
        "the workdir's recorded config).", lock_config=False)

    def parse(arguments):
        try:
            remaining = flags.FLAGS(arguments)
        except flags.Error as error:
            fail(" ".join(str(error).split()))
        missing = [f"--{name}" for name in ("workdir", "output") if not flags.FLAGS[name].value]
        if missing:
            fail(f"{' and '.join(missing)} missing: python -m fcd_jax.export --workdir=W "
                 "--format=onnx|jax --output=FILE")
        return remaining

    def run(_):
        from fcd_jax.detector import Detector

        try:
            detector = Detector.load(flags.FLAGS.workdir, flags.FLAGS.run, flags.FLAGS.config)
            path = export_detector(detector, flags.FLAGS.output, flags.FLAGS.format)
        except FcdError as error:
            fail(str(error))
        print(json.dumps({"run": detector.run, "format": flags.FLAGS.format, "output": path}))

    app.run(run, argv, flags_parser=parse)


if __name__ == "__main__":
    main()
