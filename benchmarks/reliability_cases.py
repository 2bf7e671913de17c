"""The inputs of the reliability sweep (``reliability_sweep.py``), grouped by issue 15's classes.

Each case writes what it needs into its own folder: a tiny MVTec-style image folder
(``tests/fixtures.make_mvtec_folder``: 32 px images, a ``widget`` category with 10 training
images, 3 good and 2 + 2 defective test images with masks), teacher files, workdirs. Cases that
need a trained workdir copy the one the first case trains (``configs/folder.py:runlocal``, a
random teacher, 2 steps); if that run failed they are reported as not run.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.reliability_sweep import ROOT, Case, Invocation, Outcome

sys.path.insert(0, str(ROOT / "tests"))
from fixtures import make_mvtec_folder  # noqa: E402

FOLDER_CONFIG = f"{ROOT}/configs/folder.py:runlocal"
# Speed settings added before every case's own overrides: they skip two device-memory analyses
# (~10 s a run on 2 busy cores) and change no number. A case that sets them wins (later flag).
FAST = ("--config.parallel_splits=1", "--config.train.teacher_cache=off")
CATEGORY = "widget"
SHARED: dict[str, Path] = {}  # what earlier cases made for later ones (trained workdirs, data)
_MOUNTS: list[Path] = []  # tmpfs mounts made by cases, unmounted by cleanup()
_ORIGINAL_EXCEPTHOOK = sys.excepthook


def shared_dir() -> Path:
    if "dir" not in SHARED:
        SHARED["dir"] = Path(tempfile.mkdtemp(prefix="fcd_sweep_shared_"))
    return SHARED["dir"]


def cleanup() -> None:
    """Unmounts the cases' tmpfs mounts and removes the shared folder."""
    for mount in reversed(_MOUNTS):
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
    _MOUNTS.clear()
    if "dir" in SHARED:
        shutil.rmtree(SHARED.pop("dir"), ignore_errors=True)


def make_folder(path: Path, **overrides) -> Path:
    """An MVTec-style root holding one category ``widget``; returns the root."""
    kwargs = dict(categories=(CATEGORY,), n_train=10, defects=("dent", "scratch"), seed=1)
    return make_mvtec_folder(path, **{**kwargs, **overrides})


def shared_data() -> Path:
    """The pristine data root that cases only read (every case hashes it before and after)."""
    if "data" not in SHARED:
        SHARED["data"] = make_folder(shared_dir() / "parts")
    return SHARED["data"]


def cli(cwd: Path, root: Path | str | None, workdir: Path | str, *overrides: str,
        mode: str = "", random_teacher: bool = True, config: str = FOLDER_CONFIG,
        expect: str = "") -> Invocation:  # fmt: skip
    """``python -m fcd_jax.main --config=folder.py:runlocal --config.data.root=ROOT ...``."""
    args = [f"--config={config}"]
    if root is not None:
        args.append(f"--config.data.root={root}")
    if random_teacher:
        args.append("--config.teacher.init=random")
    args.append(f"--workdir={workdir}")
    if mode:
        args.append(f"--mode={mode}")
    return Invocation([*args, *overrides], cwd, expect=expect)


def trained(key: str = "trained") -> Path:
    """The workdir a training case left in ``SHARED`` (KeyError: that case failed)."""
    if key not in SHARED:
        raise RuntimeError(f"no {key} workdir: its training case failed")
    return SHARED[key]


def copy_trained(folder: Path, key: str = "trained") -> Path:
    return Path(shutil.copytree(trained(key), folder / "wd", symlinks=True))


def kept_results(workdir: Path) -> list[Path]:
    """What a rerun must never lose: the trained models, checkpoints and the training record."""
    return [workdir / "runs", workdir / "checkpoints", workdir / "training_config.json"]


def trained_models(workdir: Path) -> list[Path]:
    """What eval and predict must never touch (they rewrite the reports and scores)."""
    return [*sorted(workdir.glob("runs/*/model")), workdir / "checkpoints"]


def results(workdir: Path) -> dict:
    return json.loads((workdir / "results.json").read_text())


def check_results(expected_runs: Sequence[str] = (CATEGORY,), **run_fields) -> Callable:
    """A check: ``<folder>/wd/results.json`` lists ``expected_runs``, whose first run has
    ``run_fields`` (``n_test=7``...)."""

    def check(folder: Path, outcomes: list[Outcome]) -> str | None:
        path = folder / "wd" / "results.json"
        if not path.is_file():
            return "no results.json"
        runs = results(folder / "wd")["runs"]
        names = [run["name"] for run in runs]
        if names != list(expected_runs):
            return f"runs named {names}, not {list(expected_runs)}"
        for field, value in run_fields.items():
            if runs[0].get(field) != value:
                return f"{field}={runs[0].get(field)!r}, not {value!r}"
        return None

    return check


# --- Case builders ------------------------------------------------------------------------------


def config_case(kind: str, *overrides: str, name: str = "", forbid: str = "",
                require: str = "") -> Case:  # fmt: skip
    """A config value that cannot work, on the shared good folder: an error before training."""

    def build(folder: Path):
        return [cli(folder, shared_data(), folder / "wd", *overrides)], [shared_data()]

    return Case(kind, name or " ".join(overrides), "error", build, forbid=forbid, require=require)


def folder_case(kind: str, name: str, change: Callable[[Path], None], expect: str = "error",
                overrides: Sequence[str] = (), check: Callable | None = None,
                forbid: str = "", exclusive: bool = False, **folder_kwargs) -> Case:  # fmt: skip
    """A folder of the user's, changed by ``change(category_dir)``; trained (legit) or refused."""

    def build(folder: Path):
        root = make_folder(folder / "parts", **folder_kwargs)
        change(root / CATEGORY)
        return [cli(folder, root, folder / "wd", *overrides)], [root]

    return Case(kind, name, expect, build, check=check, forbid=forbid, exclusive=exclusive)


def trained_case(kind: str, name: str, expect: str, mode: str, overrides: Sequence[str] = (),
                 prepare: Callable[[Path, Path], list[Path]] | None = None,
                 check: Callable | None = None, forbid: str = "", key: str = "trained",
                 root: Callable[[Path], Path | str | None] = lambda folder: shared_data(),
                 random_teacher: bool = True) -> Case:  # fmt: skip
    """eval / predict / a rerun on a copy of a trained workdir; ``prepare(folder, workdir)``
    changes things first and returns more user files to protect."""

    def build(folder: Path):
        workdir = copy_trained(folder, key)
        extra = prepare(folder, workdir) if prepare else []
        protected = [*trained_models(workdir), *extra]
        data = root(folder)
        if isinstance(data, Path) and data.exists():
            protected.append(data)
        invocation = cli(folder, data, workdir, *overrides, mode=mode,
                         random_teacher=random_teacher)  # fmt: skip
        return [invocation], protected

    return Case(kind, name, expect, build, check=check, forbid=forbid)


def remember(key: str, check: Callable) -> Callable:
    """``check``, and on success keeps ``<folder>/wd`` (and its log) for later cases."""

    def checked(folder: Path, outcomes: list[Outcome]) -> str | None:
        problem = check(folder, outcomes)
        if problem is None:
            SHARED[key], SHARED[f"{key}_root"] = folder / "wd", folder / "parts"
            SHARED[f"{key}_stderr"] = outcomes[-1].stderr
        return problem

    return checked


def check_predictions(output: str = "wd/predict", rows: int | None = None) -> Callable:
    """A check: ``<folder>/<output>/predictions.csv`` exists (with ``rows`` images)."""

    def check(folder: Path, outcomes: list[Outcome]) -> str | None:
        csv = folder / output / "predictions.csv"
        if not csv.is_file():
            return f"no {output}/predictions.csv"
        found = len(csv.read_text(errors="replace").strip().splitlines()) - 1
        return None if rows is None or found == rows else f"{found} predictions, not {rows}"

    return check


# --- Files a user may have ---------------------------------------------------------------------


def garbage(path: Path, data: bytes = b"this is not an image\n") -> None:
    path.write_bytes(data)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-40])


def huge_png(path: Path, side: int = 40000) -> None:
    """A valid PNG header claiming ``side`` x ``side`` pixels (PIL's decompression-bomb limit)."""
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = side.to_bytes(4, "big") * 2
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    path.write_bytes(bytes(data))


def with_orientation(path: Path, array: np.ndarray, orientation: int = 6) -> None:
    """Saves ``array`` with an EXIF orientation tag (6: a viewer turns it 90 degrees)."""
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(path, exif=exif)


def exif_rotated(category: Path) -> None:
    """Non-square training and defect images, and their masks, stored sideways with EXIF tags."""
    rng = np.random.default_rng(0)
    for path in sorted((category / "train/good").glob("*.png"))[:3]:
        with_orientation(path, rng.integers(0, 180, (24, 40, 3), dtype=np.uint8))
    image = rng.integers(0, 180, (24, 40, 3), dtype=np.uint8)
    mask = np.zeros((24, 40), np.uint8)
    image[4:12, 4:12], mask[4:12, 4:12] = 255, 255
    with_orientation(category / "test/dent/000.png", image)
    with_orientation(category / "ground_truth/dent/000_mask.png", mask)


def rename_bytes(path: Path, new_name: bytes) -> None:
    os.rename(os.fsencode(path), os.fsencode(path.parent) + b"/" + new_name)


def non_utf8_names(category: Path) -> None:
    rename_bytes(category / "train/good/000.png", b"caf\xe9.png")
    rename_bytes(category / "test/dent/000.png", b"\xff\xfe.png")
    rename_bytes(category / "ground_truth/dent/000_mask.png", b"\xff\xfe_mask.png")


def recolour_masks(category: Path, mode: str) -> None:
    """Every mask as RGB (red defects) or RGBA (opaque red defects on a transparent ground)."""
    for path in category.glob("ground_truth/*/*_mask.png"):
        defect = np.asarray(Image.open(path)) > 0
        rgba = np.zeros((*defect.shape, 4), np.uint8)
        rgba[defect] = (200, 0, 0, 255)
        Image.fromarray(rgba if mode == "RGBA" else rgba[..., :3], mode).save(path)


def mixed_formats(category: Path) -> None:
    """Training images as gray BMP, 16-bit TIFF, palette PNG, CMYK JPEG, RGBA PNG, JPEG."""
    train = category / "train/good"
    rgb = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(train.glob("*.png"))]
    writers = {
        "gray.bmp": lambda a: Image.fromarray(a).convert("L"),
        "deep.tif": lambda a: Image.fromarray(a[..., 0].astype(np.uint16) * 257),
        "palette.png": lambda a: Image.fromarray(a).convert("P"),
        "cmyk.jpg": lambda a: Image.fromarray(a).convert("CMYK"),
        "alpha.png": lambda a: Image.fromarray(np.dstack([a, np.full(a.shape[:2], 128, np.uint8)])),
        "photo.JPEG": Image.fromarray,
    }
    for (name, write), array, old in zip(writers.items(), rgb, sorted(train.glob("*.png")),
                                         strict=False):  # fmt: skip
        old.unlink()
        write(array).save(train / name)


def google_npz(path: Path, seed: int = 0) -> Path:
    """A random teacher in Google's ViT .npz layout, of the runlocal model's shape (8 px patches,
    width 32, 12 blocks, 2 heads, MLP 64, 32 px images)."""
    rng = np.random.default_rng(seed)
    width, heads, mlp, depth, tokens = 32, 2, 64, 12, 17
    normal = lambda *shape: (0.02 * rng.standard_normal(shape)).astype(np.float32)
    ones, zeros = (lambda n: np.ones(n, np.float32)), (lambda n: np.zeros(n, np.float32))
    state = {
        "embedding/kernel": normal(8, 8, 3, width), "embedding/bias": zeros(width),
        "cls": normal(1, 1, width),
        "Transformer/posembed_input/pos_embedding": normal(1, tokens, width),
        "Transformer/encoder_norm/scale": ones(width),
        "Transformer/encoder_norm/bias": zeros(width),
    }  # fmt: skip
    for i in range(depth):
        block = f"Transformer/encoderblock_{i}/"
        for norm in ("LayerNorm_0", "LayerNorm_2"):
            state[f"{block}{norm}/scale"], state[f"{block}{norm}/bias"] = ones(width), zeros(width)
        for name in ("query", "key", "value"):
            attn = f"{block}MultiHeadDotProductAttention_1/{name}/"
            state[attn + "kernel"] = normal(width, heads, width // heads)
            state[attn + "bias"] = np.zeros((heads, width // heads), np.float32)
        out = f"{block}MultiHeadDotProductAttention_1/out/"
        state[out + "kernel"] = normal(heads, width // heads, width)
        state[out + "bias"] = zeros(width)
        state[f"{block}MlpBlock_3/Dense_0/kernel"] = normal(width, mlp)
        state[f"{block}MlpBlock_3/Dense_0/bias"] = zeros(mlp)
        state[f"{block}MlpBlock_3/Dense_1/kernel"] = normal(mlp, width)
        state[f"{block}MlpBlock_3/Dense_1/bias"] = zeros(width)
    np.savez(path, **state)
    return path


def shared_teacher() -> Path:
    if "teacher" not in SHARED:
        SHARED["teacher"] = google_npz(shared_dir() / "ViT-tiny.npz")
    return SHARED["teacher"]


class RunsCode:
    """Unpickling this runs ``touch <marker>``: what a hostile ``.pth`` does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def mount_tmpfs(path: Path, size: str = "4m", read_only: bool = False) -> Path:
    """A small tmpfs at ``path`` (a full disk, or read-only); cleanup() unmounts it."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True,
                   capture_output=True)  # fmt: skip
    _MOUNTS.append(path)
    return path


def remount_read_only(path: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True, capture_output=True)


def unmount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)
    if path in _MOUNTS:
        _MOUNTS.remove(path)


def new_images(folder: Path, count: int = 3) -> Path:
    """A folder of images to predict on: copies of the shared test images."""
    inputs = folder / "new_images"
    inputs.mkdir()
    for path in sorted(shared_data().glob(f"{CATEGORY}/test/*/*.png"))[:count]:
        shutil.copy(path, inputs / f"{path.parent.name}_{path.name}")
    return inputs


def predict_case(name: str, expect: str, inputs: Callable[[Path], str | Path],
                 overrides: Callable[[Path], Sequence[str]] = lambda folder: (),
                 check: Callable | None = None, key: str = "trained", forbid: str = "",
                 kind: str = "2 predict", with_root: bool = True) -> Case:  # fmt: skip
    """``--mode=predict`` on a copy of a trained workdir; ``inputs(folder)`` makes the inputs."""

    def build(folder: Path):
        workdir = copy_trained(folder, key)
        given = inputs(folder)
        root = shared_data() if with_root else None
        invocation = cli(folder, root, workdir, f"--config.predict.inputs={given}",
                         *overrides(folder), mode="predict")  # fmt: skip
        return [invocation], [*trained_models(workdir), folder / "new_images", shared_data()]

    return Case(kind, name, expect, build, check=check, forbid=forbid)


def unfinished(workdir: Path) -> None:
    """The run as a kill before its end leaves it: checkpoints, no trained model or result."""
    shutil.rmtree(workdir / "runs")
    for report in ("results.json", "results.md", "roc_curves.png", "score_histograms.png"):
        (workdir / report).unlink(missing_ok=True)


def corrupt_tree(directory: Path) -> list[Path]:
    """Overwrites every file under ``directory`` with garbage of the same size."""
    for path in (p for p in directory.rglob("*") if p.is_file()):
        path.write_bytes(b"\x00garbage" * max(1, path.stat().st_size // 8))
    return []


def sequence_case(kind: str, name: str, steps: Callable[[Path], list[Invocation]],
                  protect: Callable[[Path], list[Path]] = lambda folder: [shared_data()],
                  check: Callable | None = None, concurrent: bool = False,
                  expect: str = "success") -> Case:  # fmt: skip
    """Several commands on one workdir, one after the other (or at once)."""

    def build(folder: Path):
        return steps(folder), protect(folder)

    return Case(kind, name, expect, build, check=check, concurrent=concurrent, timeout=400)


def convert_case(name: str, source: Callable[[Path], Path], destination: Callable[[Path], Path],
                 expect: str = "error") -> Case:  # fmt: skip
    def build(folder: Path):
        src, dst = source(folder), destination(folder)
        return [Invocation([str(src), str(dst)], folder, module="fcd_jax.convert")], [src, dst]

    return Case("5 tracebacks", name, expect, build)


def teacher_case(kind: str, name: str, teacher: Callable[[Path], Path | str], forbid: str = "",
                 require: str = "", check: Callable | None = None) -> Case:  # fmt: skip
    """Training with ``--config.teacher.checkpoint=<teacher(folder)>`` that cannot work."""

    def build(folder: Path):
        checkpoint = teacher(folder)
        invocation = cli(folder, shared_data(), folder / "wd",
                         f"--config.teacher.checkpoint={checkpoint}", random_teacher=False)
        return [invocation], [shared_data(), Path(checkpoint)]

    return Case(kind, name, "error", build, forbid=forbid, require=require, check=check)




def _baseline(folder: Path):
    return [cli(folder, shared_data(), folder / "wd")], [shared_data()]


def _baseline_npz(folder: Path):
    invocation = cli(folder, shared_data(), folder / "wd",
                     f"--config.teacher.checkpoint={shared_teacher()}", random_teacher=False)
    return [invocation], [shared_data(), shared_teacher()]


def _log_flood(folder: Path, outcomes: list[Outcome]) -> str | None:
    lines = SHARED.get("trained_stderr", "")
    orbax = [line for line in lines.splitlines()
             if line.startswith("I") and ("checkpoint" in line or "orbax" in line
                                          or "array_metadata" in line)]  # fmt: skip
    return f"{len(orbax)} orbax INFO lines in a 2-step run's log" if orbax else None


def _no_marker(folder: Path, outcomes: list[Outcome]) -> str | None:
    return "the .pth ran code" if (folder / "pwned").exists() else None


def _evil_pth(folder: Path) -> Path:
    path = folder / "teacher.pth"
    path.write_bytes(pickle.dumps({"model": RunsCode(folder / "pwned")}))
    return path


def _timm_width_32(folder: Path) -> Path:
    from safetensors.numpy import save_file

    path = folder / "vit_tiny_custom.safetensors"
    save_file({"patch_embed.proj.weight": np.zeros((32, 3, 8, 8), np.float32),
               "cls_token": np.zeros((1, 1, 32), np.float32)}, str(path))  # fmt: skip
    return path


def _bad_arch(folder: Path) -> Path:
    cached = next((trained("trained_npz") / "teacher").iterdir())
    converted = Path(shutil.copytree(cached, folder / "converted"))
    arch = json.loads((converted / "arch.json").read_text())
    (converted / "arch.json").write_text(json.dumps(dict(arch, width="wide")))
    return converted


def _concurrent(folder: Path) -> list[Invocation]:
    return [cli(folder, shared_data(), folder / "wd", expect="either") for _ in range(2)]


def _rerun_after_error(folder: Path) -> list[Invocation]:
    return [cli(folder, shared_data(), folder / "wd", "--config.data.category=widgt",
                expect="error"), cli(folder, shared_data(), folder / "wd")]  # fmt: skip


def _only_train_good(category: Path) -> None:
    shutil.rmtree(category / "test")
    shutil.rmtree(category / "ground_truth")


def _only_good_tests(category: Path) -> None:
    for defect in ("dent", "scratch"):
        shutil.rmtree(category / "test" / defect)
    shutil.rmtree(category / "ground_truth")


def _empty_test(category: Path) -> None:
    shutil.rmtree(category / "test")
    shutil.rmtree(category / "ground_truth")
    (category / "test").mkdir()


def _hidden_folders(category: Path) -> None:
    for hidden in (category / "test/.ipynb_checkpoints",
                   category.parent / ".ipynb_checkpoints/train/good"):  # fmt: skip
        hidden.mkdir(parents=True)
        shutil.copy(category / "test/good/000.png", hidden / "000-checkpoint.png")


def _hidden_files(category: Path) -> None:
    for sub in ("train/good", "test/good", "test/dent"):
        garbage(category / sub / "._000.png", b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")
        garbage(category / sub / ".DS_Store", b"\x00\x00\x00\x01Bud1")


def _dangling(category: Path) -> None:
    (category / "train/good/zzz.png").symlink_to(category / "gone.png")


def _spaces_and_accents(category: Path) -> None:
    (category / "test/dent").rename(category / "test/bent edge é")
    (category / "ground_truth/dent").rename(category / "ground_truth/bent edge é")
    (category / "train/good/000.png").rename(category / "train/good/vue n° 1 ✓.png")


def _sizes_differ(category: Path) -> None:
    for number, path in enumerate(sorted((category / "train/good").glob("*.png"))[:4]):
        side = (16, 50, 64, 1)[number]
        Image.open(path).resize((side, side)).save(path)


def _mask_too_small(category: Path) -> None:
    Image.fromarray(np.zeros((16, 32), np.uint8)).save(category / "ground_truth/dent/000_mask.png")


def _cmyk_mask(category: Path) -> None:
    mask = category / "ground_truth/dent/000_mask.png"
    Image.open(mask).convert("CMYK").save(mask.with_suffix(".jpg"))
    mask.unlink()
    mask.with_suffix(".jpg").rename(mask.with_name("000.png"))  # masks are looked up as .png


def _images_in_train(category: Path) -> None:
    for path in (category / "train/good").iterdir():
        path.rename(category / "train" / path.name)
    (category / "train/good").rmdir()


def _webp_only(category: Path) -> None:
    for path in (category / "train/good").iterdir():
        Image.open(path).save(path.with_suffix(".webp"))
        path.unlink()


def _one_train_image(category: Path) -> None:
    for path in sorted((category / "train/good").iterdir())[1:]:
        path.unlink()


def _five_train_images(category: Path) -> None:
    for path in sorted((category / "train/good").iterdir())[5:]:
        path.unlink()


def _non_utf8_category(folder: Path):
    root = make_folder(folder / "parts")
    rename_bytes(root / CATEGORY, b"wid\xe9et")
    return [cli(folder, root, folder / "wd")], [root]


def _data_root(kind: str) -> Callable[[Path], tuple[list[Invocation], list[Path]]]:
    """data.root that is missing, a file, unset, or holds no category."""

    def build(folder: Path):
        root: Path | str = folder / "missing"
        if kind == "file":
            root = folder / "parts.zip"
            root.write_bytes(b"PK")
        elif kind == "unset":
            root = ""
        elif kind == "empty":
            root = folder / "empty"
            root.mkdir()
        return [cli(folder, str(root), folder / "wd")], [folder]

    return build


def _cwd_root(cwd_in_category: str, given: str) -> Callable:
    """``--config.data.root=<given>`` from a working directory inside the data folder."""

    def build(folder: Path):
        root = make_folder(folder / "parts")
        cwd = root / cwd_in_category if cwd_in_category else root
        return [cli(cwd, given, folder / "wd")], [root]

    return build


def _workdir_file(folder: Path):
    (folder / "wd").write_text("my notes")
    return [cli(folder, shared_data(), folder / "wd")], [folder / "wd", shared_data()]


def _read_only_workdir(folder: Path):
    workdir = mount_tmpfs(folder / "wd", read_only=True)
    return [cli(folder, shared_data(), workdir)], [shared_data()]


def _full_disk(folder: Path):
    workdir = mount_tmpfs(folder / "wd", size="48k")
    return [cli(folder, shared_data(), workdir)], [shared_data()]


def _read_only_predict(folder: Path):
    workdir = mount_tmpfs(folder / "wd")
    shutil.copytree(trained(), workdir, dirs_exist_ok=True, symlinks=True)
    remount_read_only(workdir)
    inputs = new_images(folder)
    invocation = cli(folder, shared_data(), workdir, f"--config.predict.inputs={inputs}",
                     mode="predict")  # fmt: skip
    return [invocation], [inputs, *trained_models(workdir)]


def _after_unmount(folder: Path) -> None:
    unmount(folder / "wd")


def _moved_data(folder: Path, workdir: Path) -> list[Path]:
    shared_data().rename(shared_data().with_name("parts-moved"))
    return []


def _restore_data(folder: Path) -> None:
    moved = shared_data().with_name("parts-moved")
    if moved.exists():
        moved.rename(shared_data())


def _predict_moved(folder: Path):
    invocations, protected = predict_case("", "", new_images).build(folder)
    _moved_data(folder, folder / "wd")
    return invocations, [path for path in protected if path != shared_data()]


def _bad_result_json(folder: Path, workdir: Path) -> list[Path]:
    (workdir / f"runs/{CATEGORY}/result.json").write_text("{")
    return []


def _no_checkpoints(folder: Path, workdir: Path) -> list[Path]:
    shutil.rmtree(workdir / "checkpoints")
    return []


def _corrupt_model(folder: Path, workdir: Path) -> list[Path]:
    return corrupt_tree(workdir / f"runs/{CATEGORY}/model")


def _corrupt_latest(folder: Path, workdir: Path) -> list[Path]:
    unfinished(workdir)
    return corrupt_tree(workdir / f"checkpoints/{CATEGORY}")


def _half_written(folder: Path, workdir: Path) -> list[Path]:
    unfinished(workdir)
    step = workdir / f"checkpoints/{CATEGORY}/2"
    step.rename(step.with_name("2.orbax-checkpoint-tmp-1234"))
    return []


def _output_is_inputs(folder: Path) -> list[str]:
    return [f"--config.predict.output_dir={folder / 'new_images'}"]


def _output_with_user_file(folder: Path) -> list[str]:
    output = folder / "reports"
    output.mkdir()
    shutil.copy(next((folder / "new_images").iterdir()), output)  # the user's own copy
    return [f"--config.predict.output_dir={output}"]


def _output_is_file(folder: Path) -> list[str]:
    (folder / "out.png").write_bytes(b"my picture")
    return [f"--config.predict.output_dir={folder / 'out.png'}"]


def _predict_odd(kind: str) -> Callable[[Path], Path]:
    """Inputs with one odd file: corrupt, AppleDouble, EXIF-rotated, non-UTF-8 named."""

    def inputs(folder: Path) -> Path:
        directory = new_images(folder)
        first = sorted(directory.iterdir())[0]
        if kind == "corrupt":
            garbage(directory / "broken.png")
        elif kind == "appledouble":
            garbage(directory / f"._{first.name}", b"\x00\x05\x16\x07Mac OS X")
        elif kind == "exif":
            with_orientation(directory / "turned.png", np.asarray(Image.open(first))[:, :20])
        elif kind == "non-utf8":
            rename_bytes(first, b"\xe9t\xe9.png")
        return directory

    return inputs


def _only_good_predict(folder: Path):
    workdir = copy_trained(folder, "only_good")
    inputs = new_images(folder)
    root = SHARED["only_good_root"]  # the training command's, as a user repeats it
    invocation = cli(folder, root, workdir, f"--config.predict.inputs={inputs}", mode="predict")
    return [invocation], [inputs, *trained_models(workdir)]


def _teacher_copy(folder: Path) -> Path:
    return Path(shutil.copy(shared_teacher(), folder))


def _existing_file(folder: Path) -> Path:
    (folder / "notes.txt").write_text("mine")
    return folder / "notes.txt"


def _garbage_file(path: Path) -> Path:
    garbage(path)
    return path


def _folder_of_the_user(folder: Path, empty: bool = False) -> Path:
    (folder / "d").mkdir()
    if not empty:
        (folder / "d/mine.txt").write_text("mine")
    return folder / "d"


def _own_config(text: str) -> Callable:
    def build(folder: Path):
        (folder / "mine.py").write_text(text)
        return [Invocation([f"--config={folder}/mine.py", f"--workdir={folder}/wd"], folder)], []

    return build


def _textures_into_user_folder(folder: Path):
    mine = _folder_of_the_user(folder)
    invocation = Invocation([f"--config={ROOT}/configs/demo.py:runlocal",
                             "--config.data.name=textures", f"--config.data.root={mine}",
                             f"--workdir={folder}/wd"], folder)  # fmt: skip
    return [invocation], [mine]


K1, K2, K3 = "1 recorded config", "2 predict", "3 no defect images"
K4, K5, K6 = "4 late checks", "5 tracebacks", "6 checkpoints"
K7, K8, K9 = "7 silent settings", "8 paths and folders", "9 what a user sees"
K10, K11 = "10 files and formats", "11 workdirs and disks"
DELETE_ADVICE = r"delete \S+ to train afresh|delete the workdir"

CASES: list[Case] = [
    # Trained once, reused below.
    Case(K10, "a clean folder trains (baseline)", "success", _baseline,
         check=remember("trained", check_results(n_test=7)), exclusive=True),
    Case(K10, "a Google .npz teacher trains (baseline for teacher cases)", "success",
         _baseline_npz, check=remember("trained_npz", check_results(n_test=7)), exclusive=True),
    Case(K9, "orbax INFO lines in the baseline's log", "success", lambda folder: ([], []),
         check=_log_flood),
    # 1. The workdir's recorded config.
    sequence_case(K1, "rerun the corrected command after a data.category typo", _rerun_after_error,
                  check=check_results()),
    trained_case(K1, "rerun the same command after success (skips the finished run)", "success",
                 "train_and_eval"),
    trained_case(K1, "rerun with another optim.lr", "error", "train_and_eval",
                 ("--config.optim.lr=0.5",)),
    trained_case(K1, "eval with a trailing slash on data.root", "success", "eval",
                 root=lambda folder: f"{shared_data()}/", forbid=DELETE_ADVICE),
    trained_case(K1, "eval with data.root relative to the working directory", "success", "eval",
                 root=lambda folder: os.path.relpath(shared_data(), folder), forbid=DELETE_ADVICE),
    trained_case(K1, "eval with skip_bad_images=True (as an error message advises)", "success",
                 "eval", ("--config.data.skip_bad_images=True",), forbid=DELETE_ADVICE),
    trained_case(K1, "eval with another eval_batch_size", "success", "eval",
                 ("--config.data.eval_batch_size=8",)),
    predict_case("predict with skip_bad_images=True", "success", new_images,
                 lambda folder: ["--config.data.skip_bad_images=True"], kind=K1,
                 forbid=DELETE_ADVICE),
    Case(K1, "predict after the training data was moved away", "success", _predict_moved,
         check=check_predictions(), after=_restore_data, forbid=DELETE_ADVICE, exclusive=True),
    Case(K1, "eval after the training data was moved away", "error",
         trained_case(K1, "", "", "eval", prepare=_moved_data).build, forbid=DELETE_ADVICE,
         after=_restore_data, exclusive=True),
    trained_case(K1, "predict as configs/folder.py's docstring says (no teacher.checkpoint)",
                 "success", "predict", (f"--config.predict.inputs={shared_data()}/{CATEGORY}/"
                                        "test/dent",), key="trained_npz", random_teacher=False,
                 forbid=DELETE_ADVICE),
    predict_case("predict without data.root", "success", new_images, kind=K1,
                 forbid=DELETE_ADVICE, with_root=False),
    # 2. Predict.
    predict_case("predict.output_dir = the inputs' folder", "either", new_images,
                 _output_is_inputs),
    predict_case("predict.output_dir holds a file of the user's named like an output", "either",
                 new_images, _output_with_user_file),
    predict_case("predict.output_dir is an existing file", "error", new_images, _output_is_file),
    predict_case("predict.inputs = one image file", "success",
                 lambda folder: sorted(new_images(folder).iterdir())[0],
                 check=check_predictions(rows=1)),
    predict_case("predict.inputs = a glob", "success",
                 lambda folder: f"{new_images(folder)}/*.png", check=check_predictions(rows=3)),
    predict_case("predict.inputs = a glob matching nothing", "error",
                 lambda folder: f"{new_images(folder)}/*.jpeg"),
    predict_case("predict.inputs unset", "error", lambda folder: ""),
    predict_case("predict.inputs does not exist", "error", lambda folder: folder / "nowhere"),
    predict_case("predict inputs with a corrupt image", "error", _predict_odd("corrupt")),
    predict_case("predict inputs with a corrupt image, skip_bad_images=True", "success",
                 _predict_odd("corrupt"), lambda folder: ["--config.data.skip_bad_images=True"],
                 check=check_predictions(rows=3)),
    predict_case("predict inputs with an AppleDouble ._ file", "success",
                 _predict_odd("appledouble"), check=check_predictions(rows=3)),
    predict_case("predict an EXIF-rotated image", "success", _predict_odd("exif"),
                 check=check_predictions(rows=4)),
    predict_case("predict an image with a non-UTF-8 name", "success", _predict_odd("non-utf8"),
                 check=check_predictions(rows=3)),
    Case(K2, "predict on a workdir that was never trained", "error",
         lambda folder: ([cli(folder, shared_data(), folder / "wd",
                              f"--config.predict.inputs={new_images(folder)}", mode="predict")],
                         [folder / "new_images"])),  # fmt: skip
    # 3. Users with no defect images.
    folder_case(K3, "only train/good, no test/ folder: trains and reports its threshold",
                _only_train_good, "success",
                check=remember("only_good", check_results(n_test=0)), exclusive=True),
    Case(K3, "predict with the train/good-only run", "success", _only_good_predict,
         check=check_predictions(rows=3)),
    folder_case(K3, "test/ with good images only", _only_good_tests, "success",
                check=check_results(n_test=3)),
    folder_case(K3, "an empty test/ folder", _empty_test, "success",
                check=check_results(n_test=0)),
    folder_case(K3, "only train/good and holdout_fraction=0", _only_train_good, "error",
                ("--config.data.holdout_fraction=0.0",)),
    # 4. Checks that ran only after training.
    config_case(K4, "--config.method.top_k=1000"),
    config_case(K4, "--config.method.map_sigma=-1"),
    folder_case(K4, "holdout_fraction=0.1 of 5 training images (rounds to 0)",
                _five_train_images, "error", forbid=r"above 0"),
    Case(K4, "--config.method.layers=(3,6,9,-1) (-1: the last block) trains and scores",
         "success", lambda folder: ([cli(folder, shared_data(), folder / "wd",
                                         "--config.method.layers=(3,6,9,-1)")], [shared_data()]),
         check=check_results(n_test=7)),  # fmt: skip
    config_case(K4, "--config.method.layers=(3,6,9,12)"),
    config_case(K4, "--config.method.anchor_layers=(12,)"),
    config_case(K4, "--config.method.gram_pairs=((3,40),)"),
    config_case(K4, "--config.eval.threshold_quantile=1.5"),
    config_case(K4, "--config.eval.threshold_quantile=-0.1"),
    config_case(K4, "--config.data.eval_batch_size=0"),
    config_case(K4, "--config.method.image_score=maxx"),
    config_case(K4, "--config.method.anchor_update=median"),
    config_case(K4, "--config.method.distill_form=l2"),
    config_case(K4, "--config.method.gram_form=cosine"),
    config_case(K4, "--config.eval.max_heatmaps=-1"),
    # 5. Tracebacks instead of one line.
    config_case(K5, "--config.data.batch_size=0"),
    config_case(K5, "--config.data.batch_size=-4"),
    config_case(K5, "--config.data.holdout_fraction=1.0"),
    config_case(K5, "--config.data.holdout_fraction=-0.1"),
    config_case(K5, "--config.train.checkpoint_every=0"),
    config_case(K5, "--config.train.log_every=0"),
    config_case(K5, "--config.data.image_size=0"),
    config_case(K5, "--config.data.image_size=30", forbid=r"config\.model\.image_size"),
    config_case(K5, "--config.model.dtype=float8"),
    config_case(K5, "--config.model.dtype=floa32"),
    config_case(K5, "--config.optim.learnig_rate=1", require=r"optim\.lr\b"),
    config_case(K5, "--config.optimm.lr=1"),
    config_case(K5, "--config.data.batch_size=abc"),
    config_case(K5, "--config.method.layers=abc"),
    config_case(K5, "--config.model.num_heads=3"),
    config_case(K5, "--config.model.variant=X/16"),
    config_case(K5, "--config.mesh_shape=(2,2)"),
    config_case(K5, "--config.mesh_shape=(3,)"),
    config_case(K5, "--config.parallel_splits=0"),
    config_case(K5, "--config.parallel_splits=two"),
    config_case(K5, "--config.train.teacher_cache=maybe"),
    config_case(K5, "--config.optim.name=sgdd"),
    config_case(K5, "--config.optim.schedule=linear"),
    config_case(K5, "--config.method.pos_embedding=sinusoidal"),
    config_case(K5, "--config.teacher.init=imagenet"),
    config_case(K5, "--config.data.name=cifar11"),
    config_case(K5, "--config.data.std=0.0"),
    config_case(K5, "--config.optim.momentum=1.5"),
    config_case(K5, "--config.optim.warmup_steps=-1"),
    config_case(K5, "--config.model.attention_implementation=flash"),
    config_case(K5, "--config.splits=gadget"),
    config_case(K5, "--mode=bogus"),
    config_case(K5, "extra", name="an extra positional argument"),
    Case(K5, "no --config flag", "error",
         lambda folder: ([Invocation(["--workdir", str(folder / "wd")], folder)], [])),
    Case(K5, "--config names a missing file", "error",
         lambda folder: ([Invocation([f"--config={folder}/nope.py"], folder)], [])),
    Case(K5, "--config file with a syntax error", "error", _own_config("def get_config(:\n")),
    Case(K5, "--config file without get_config", "error", _own_config("x = 1\n")),
    convert_case("convert onto an existing file", _teacher_copy, _existing_file),
    convert_case("convert to a read-only destination", _teacher_copy,
                 lambda folder: mount_tmpfs(folder / "ro", read_only=True) / "converted"),
    convert_case("convert a missing source", lambda folder: folder / "missing.npz",
                 lambda folder: folder / "converted"),
    convert_case("convert a garbage .npz", lambda folder: _garbage_file(folder / "x.npz"),
                 lambda folder: folder / "converted"),
    convert_case("convert into a non-empty folder", _teacher_copy, _folder_of_the_user),
    teacher_case(K5, "a converted teacher whose arch.json has width='wide'", _bad_arch),
    # 6. Checkpoints.
    # Its only checkpoint damaged: nothing restores, and training afresh would replace it (the
    # fallback to an older good step: tests/test_reliability.py).
    Case(K6, "every checkpoint of an unfinished run corrupt, rerun", "error",
         trained_case(K6, "", "", "train_and_eval", prepare=_corrupt_latest).build,
         require="no older one restores"),
    trained_case(K6, "half-written (orbax tmp) checkpoint of an unfinished run, rerun", "success",
                 "train_and_eval", (), prepare=_half_written, check=check_results()),
    trained_case(K6, "corrupt trained model, eval", "error", "eval", prepare=_corrupt_model),
    trained_case(K6, "corrupt trained model, predict", "error", "predict",
                 (f"--config.predict.inputs={shared_data()}/{CATEGORY}/test/dent",),
                 prepare=_corrupt_model),
    trained_case(K6, "a run's result.json is not JSON, rerun", "either", "train_and_eval", (),
                 prepare=_bad_result_json),
    trained_case(K6, "checkpoints/ deleted after training, rerun (finished: skipped)", "success",
                 "train_and_eval", (), prepare=_no_checkpoints),
    # 7. Settings no user means.
    config_case(K7, "--config.optim.lr=-0.1"),
    config_case(K7, "--config.optim.lr=0.0"),
    config_case(K7, "--config.train.steps=0", "--config.train.epochs=0"),
    config_case(K7, "--config.train.steps=-1"),
    config_case(K7, "--config.train.epochs=-1"),
    config_case(K7, "--config.method.lam=-1.0"),
    config_case(K7, "--config.optim.weight_decay=-0.1"),
    config_case(K7, "--config.optim.clip_norm=-1.0"),
    config_case(K7, "--config.method.anchor_update=ema", "--config.method.anchor_momentum=1.0"),
    config_case(K7, "--config.model.depth=-1"),
    # 8. Paths and folders.
    Case(K8, "data.root=. inside the category folder", "success", _cwd_root(CATEGORY, "."),
         check=check_results()),
    Case(K8, "data.root=.. inside category/train", "success", _cwd_root(f"{CATEGORY}/train", ".."),
         check=check_results()),
    folder_case(K8, ".ipynb_checkpoints in test/ and beside the category", _hidden_folders,
                "success", check=check_results(n_test=7)),
    folder_case(K8, "AppleDouble ._* files and .DS_Store beside the images", _hidden_files,
                "success", check=check_results(n_test=7)),
    folder_case(K8, "a dangling symlink in train/good", _dangling),
    folder_case(K8, "a dangling symlink in train/good, skip_bad_images=True", _dangling,
                "success", ("--config.data.skip_bad_images=True",),
                check=check_results(skipped_images=1)),
    teacher_case(K8, "a .pth teacher holding code", _evil_pth, forbid="download it again",
                 require="code|objects", check=_no_marker),
    teacher_case(K8, "a timm .safetensors of non-standard width", _timm_width_32,
                 forbid=r"\(--num_heads\)"),
    teacher_case(K8, "teacher.checkpoint does not exist", lambda folder: folder / "ViT-B_16.npz"),
    teacher_case(K8, "teacher.checkpoint is a garbage .npz",
                 lambda folder: _garbage_file(folder / "t.npz")),
    teacher_case(K8, "teacher.checkpoint is an empty folder",
                 lambda folder: _folder_of_the_user(folder, empty=True)),
    Case(K8, "teacher.init=pretrained without a checkpoint", "error",
         lambda folder: ([cli(folder, shared_data(), folder / "wd", random_teacher=False)],
                         [shared_data()])),  # fmt: skip
    Case(K8, "data.root does not exist", "error", _data_root("missing")),
    Case(K8, "data.root is a file", "error", _data_root("file")),
    Case(K8, "data.root unset", "error", _data_root("unset")),
    Case(K8, "data.root holds no category", "error", _data_root("empty")),
    config_case(K8, "--config.data.category=gadget"),
    Case(K8, "a category folder named with non-UTF-8 bytes", "error", _non_utf8_category),
    # 10. Files and formats.
    folder_case(K10, "a corrupt PNG in train/good",
                lambda d: garbage(d / "train/good/003.png")),
    folder_case(K10, "a truncated PNG in test/dent", lambda d: truncate(d / "test/dent/001.png")),
    folder_case(K10, "a zero-byte PNG in test/good",
                lambda d: garbage(d / "test/good/000.png", b"")),
    folder_case(K10, "a text file named .png", lambda d: garbage(d / "train/good/notes.png")),
    folder_case(K10, "a corrupt PNG, skip_bad_images=True",
                lambda d: garbage(d / "train/good/003.png"), "success",
                ("--config.data.skip_bad_images=True",),
                check=check_results(skipped_images=1)),
    folder_case(K10, "a PNG header claiming 40000 x 40000 pixels",
                lambda d: huge_png(d / "train/good/huge.png")),
    folder_case(K10, "gray BMP, 16-bit TIFF, palette, CMYK JPEG, RGBA images", mixed_formats,
                "success", check=check_results(n_test=7)),
    folder_case(K10, "EXIF-rotated non-square images and masks", exif_rotated, "success",
                check=check_results(n_test=7)),
    folder_case(K10, "non-UTF-8 file names (images and a mask)", non_utf8_names, "success",
                check=check_results(n_test=7)),
    folder_case(K10, "spaces, accents and symbols in names", _spaces_and_accents, "success",
                check=check_results(n_test=7)),
    folder_case(K10, "RGB masks", lambda d: recolour_masks(d, "RGB"), "success",
                check=check_results(n_test=7)),
    folder_case(K10, "RGBA masks (transparent ground)", lambda d: recolour_masks(d, "RGBA"),
                "success", check=check_results(n_test=7)),
    folder_case(K10, "a CMYK mask", _cmyk_mask),
    folder_case(K10, "a mask whose size differs from its image", _mask_too_small),
    folder_case(K10, "a missing mask",
                lambda d: (d / "ground_truth/dent/001_mask.png").unlink()),
    folder_case(K10, "ground_truth/ without a defect's folder",
                lambda d: shutil.rmtree(d / "ground_truth/scratch")),
    folder_case(K10, "training images directly in train/ (no train/good)", _images_in_train),
    folder_case(K10, "test images directly in test/",
                lambda d: shutil.copy(d / "test/good/000.png", d / "test/stray.png")),
    folder_case(K10, "an empty train/good", lambda d: shutil.rmtree(d / "train/good") or
                (d / "train/good").mkdir()),  # fmt: skip
    folder_case(K10, "train/good holds .webp files only", _webp_only),
    folder_case(K10, "one training image", _one_train_image),
    folder_case(K10, "training images of different sizes (1 px to 64 px)", _sizes_differ,
                "success", check=check_results(n_test=7)),
    Case(K10, "tfds dataset not prepared, data.download=False", "error",
         lambda folder: ([Invocation([f"--config={ROOT}/configs/cifar10.py:runlocal",
                                      f"--config.data.data_dir={folder}/tfds",
                                      "--config.data.download=False",
                                      "--config.teacher.init=random",
                                      f"--workdir={folder}/wd"], folder)], [])),  # fmt: skip
    Case(K10, "textures with data.textures.crop=400", "error",
         lambda folder: ([Invocation([f"--config={ROOT}/configs/demo.py:runlocal",
                                      "--config.data.name=textures",
                                      f"--config.data.root={folder}/tex",
                                      "--config.data.textures.crop=400",
                                      f"--workdir={folder}/wd"], folder)], [])),  # fmt: skip
    Case(K10, "textures into a folder of the user's", "error", _textures_into_user_folder),
    Case(K10, "--config.data.textures.crops=32 (mistyped field)", "error",
         lambda folder: ([Invocation([f"--config={ROOT}/configs/demo.py:runlocal",
                                      "--config.data.textures.crops=32",
                                      f"--workdir={folder}/wd"], folder)], [])),  # fmt: skip
    # 11. Workdirs and disks.
    sequence_case(K11, "two runs on one workdir at once", _concurrent, concurrent=True,
                  expect="either"),
    Case(K11, "--workdir is an existing file", "error", _workdir_file),
    Case(K11, "read-only workdir, train", "error", _read_only_workdir, after=_after_unmount),
    Case(K11, "read-only workdir, predict (output in the workdir)", "error", _read_only_predict,
         after=_after_unmount),
    Case(K11, "full disk (48 KiB workdir)", "error", _full_disk, late=True,
         after=_after_unmount),
]
