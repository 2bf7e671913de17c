"""The whole job end to end, fcd-jax against the loop the anchors run (``bench.py --protocol``).

fcd-jax runs ``fcd_jax.experiment.train_and_evaluate`` on a generated folder dataset (train,
evaluate, reports); the PyTorch loop is that of MKDAD's official code and GeneralAD's KDAD: one
split after another, the teacher in every step, a ``DataLoader`` with workers reading the image
files, evaluation per split with the teacher (``torch_reference.TorchFcd``, eager unless
``--torch_compile``). Both train every split for the same steps at the same batch size.

- ``mvtec_like``: 15 categories with MVTec AD's relative training-set sizes (scaled by
  ``--scale``), test sets with masks, so pixel metrics and heat maps are computed;
- ``cifar_like``: 10 categories of one size sharing one test set (the same files in each), no
  masks.

Before timing, the two implementations' losses and scores are checked to agree on one batch.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from PIL import Image

from fcd_jax import experiment
from fcd_jax.datasets.split import holdout_indices
from fcd_jax.input_pipeline import steps_per_epoch

# MVTec AD's training-set sizes (Bergmann et al., CVPR 2019, table 1).
MVTEC_TRAIN_SIZES = {
    "bottle": 209, "cable": 224, "capsule": 219, "carpet": 280, "grid": 264, "hazelnut": 391,
    "leather": 245, "metal_nut": 220, "pill": 267, "screw": 320, "tile": 230, "toothbrush": 60,
    "transistor": 213, "wood": 247, "zipper": 240,
}  # fmt: skip
CIFAR_LIKE_SPLITS = 10
PROTOCOLS = ("mvtec_like", "cifar_like")
# Per protocol: the paper config whose epochs it trains, and the default scale and test images.
DEFAULTS = {
    "mvtec_like": dict(config="mvtec", scale=0.05, num_test=16),
    "cifar_like": dict(config="cifar10", scale=0.02, num_test=200),
}
MIN_TRAIN = 8  # training images of a split at least: one held out at holdout_fraction 0.1


def paper_epochs(name: str) -> int:
    """The epochs of protocol ``name``'s paper config (``configs/mvtec.py``: 100,
    ``configs/cifar10.py``: 20)."""
    import importlib

    return int(importlib.import_module(f"configs.{DEFAULTS[name]['config']}").get_config()
               .train.epochs)


def protocol_sizes(name: str, scale: float, num_splits: int = 0) -> dict[str, int]:
    """Training images per category of protocol ``name`` at ``scale``; the first
    ``num_splits`` categories only if > 0 (the tests' tiny form)."""
    if name == "mvtec_like":
        sizes = {c: max(MIN_TRAIN, round(n * scale)) for c, n in MVTEC_TRAIN_SIZES.items()}
    else:  # CIFAR-10: 5,000 training images per class
        sizes = {f"class{i}": max(MIN_TRAIN, round(5000 * scale))
                 for i in range(CIFAR_LIKE_SPLITS)}
    return dict(list(sizes.items())[: num_splits or None])


def _image(rng: np.random.Generator, size: int, tone: int) -> np.ndarray:
    base = rng.normal(tone, 30, (size // 4, size // 4, 3)).clip(0, 255).astype(np.uint8)
    return np.array(Image.fromarray(base).resize((size, size), Image.BILINEAR))


def write_dataset(root: Path, name: str, scale: float, image_size: int, num_test: int,
                  num_splits: int = 0, seed: int = 0) -> dict[str, int]:
    """Writes protocol ``name``'s folder dataset (``fcd_jax.datasets.folders`` layout) under
    ``root``; returns the training-set sizes. Anomalies are bright squares (masks for
    mvtec_like)."""
    rng = np.random.default_rng(seed)
    sizes = protocol_sizes(name, scale, num_splits)
    with_masks = name == "mvtec_like"
    shared_test = None
    for index, (category, count) in enumerate(sizes.items()):
        tone = 60 + 10 * index
        train = root / category / "train" / "good"
        train.mkdir(parents=True)
        for i in range(count):
            Image.fromarray(_image(rng, image_size, tone)).save(train / f"{i:04d}.png")
        if shared_test is not None:  # cifar_like: every class has the same test files
            shutil.copytree(shared_test, root / category / "test")
            continue
        for i in range(num_test):
            anomalous = i % 2 == 1
            image = _image(rng, image_size, tone)
            mask = np.zeros((image_size, image_size), np.uint8)
            if anomalous:
                y, x = rng.integers(0, image_size // 2, 2)
                mask[y: y + image_size // 4, x: x + image_size // 4] = 255
                image[mask > 0] = 250
            kind = "defect" if anomalous else "good"
            folder = root / category / "test" / kind
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i:04d}.png")
            if with_masks and anomalous:
                masks = root / category / "ground_truth" / kind
                masks.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask).save(masks / f"{i:04d}_mask.png")
        if not with_masks:
            shared_test = root / category / "test"
    return sizes


def protocol_config(base: ml_collections.ConfigDict, root: Path,
                    epochs: int) -> ml_collections.ConfigDict:
    """The benchmark config as a folder job over ``root``: every category, ``epochs`` epochs."""
    config = ml_collections.ConfigDict(base.to_dict())
    config.data.name = "folder"
    config.data.root = str(root)
    config.data.category = ""
    config.train.epochs = epochs
    config.train.steps = 0
    config.train.log_every = 10**6
    config.train.checkpoint_every = 10**6
    return config


# ---------------------------------------------------------------- the PyTorch loop


def _torch_dataset_base() -> type:
    import torch

    return torch.utils.data.Dataset


class ImageFiles(_torch_dataset_base()):
    """The anchors' dataset: PNG files decoded on every read (in the DataLoader's workers)."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        import torch

        with Image.open(self.paths[index]) as image:
            return torch.from_numpy(np.asarray(image.convert("RGB"), np.uint8).copy())


def in_fresh_process(function, *args) -> Any:
    """``function(*args)`` in a fresh ``spawn``-ed process (nothing imported, compiled or
    started there yet), its result returned. Not daemonic: the function may fork workers."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(function, *args).result()


def torch_loop_process(config: ml_collections.ConfigDict, root: Path, teacher_params: dict,
                       student_params: dict, workers: int, threads: int) -> dict[str, Any]:
    """:func:`torch_loop` in a fresh process that never starts JAX, as the anchors run (their
    DataLoader forks its workers, unsafe in a process where JAX's threads run)."""
    return in_fresh_process(_torch_loop_child, config.to_json(), str(root), teacher_params,
                            student_params, workers, threads)


def _torch_loop_child(config_json: str, root: str, teacher_params: dict, student_params: dict,
                      workers: int, threads: int) -> dict[str, Any]:
    import json

    import torch

    from benchmarks import bench

    torch.set_num_threads(threads)
    config = ml_collections.ConfigDict(json.loads(config_json))
    return torch_loop(config, Path(root), teacher_params, student_params,
                      lambda t, s: bench.torch_fcd(config, t, s, None), workers)


def torch_loop(config: ml_collections.ConfigDict, root: Path, teacher_params: dict,
               student_params: dict, fcd_factory, workers: int) -> dict[str, Any]:
    """Trains and scores every category of ``root`` one after another (the anchors' loop): a
    ``DataLoader`` over the PNG files with ``workers`` workers, ``TorchFcd`` (teacher in every
    step), then the held-out normals and the test set scored with the teacher again. Returns
    the seconds and each split's image AUROC."""
    import torch
    from sklearn.metrics import roc_auc_score

    def loader(paths, batch, shuffle, drop_last):
        return torch.utils.data.DataLoader(
            ImageFiles(paths), batch_size=batch, shuffle=shuffle, drop_last=drop_last,
            num_workers=workers, persistent_workers=workers > 0,
            multiprocessing_context="fork" if workers else None,  # Linux's default, as the anchors
        )

    def scores(fcd, paths):
        return np.concatenate([fcd.score(images).numpy() for images in
                               loader(paths, config.data.eval_batch_size, False, False)])

    batch = config.data.batch_size
    start = time.perf_counter()
    aurocs, steps = {}, 0
    for category in sorted(p.name for p in root.iterdir()):
        files = sorted((root / category / "train" / "good").glob("*.png"))
        train_idx, holdout_idx = holdout_indices(len(files), config.data.holdout_fraction)
        fcd = fcd_factory(teacher_params, student_params)
        total = config.train.epochs * steps_per_epoch(len(train_idx), batch)
        train = loader([files[i] for i in train_idx], batch, True, True)
        done = 0
        while done < total:
            for images in train:
                fcd.train_step(images)
                done += 1
                if done == total:
                    break
        steps += total
        test = sorted((root / category / "test").glob("*/*.png"))
        labels = np.array([path.parent.name != "good" for path in test], np.int32)
        scores(fcd, [files[i] for i in holdout_idx])  # the threshold's images, as in fcd-jax
        test_scores = scores(fcd, test)
        aurocs[category] = float(roc_auc_score(labels, test_scores)) if 0 < labels.sum() < len(
            labels) else float("nan")
    return dict(seconds=time.perf_counter() - start, split_steps=steps, image_auroc=aurocs)


# ---------------------------------------------------------------- fcd-jax's job


def fcd_jax_job(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """``experiment.train_and_evaluate`` timed; its runs' image AUROC."""
    start = time.perf_counter()
    result = experiment.train_and_evaluate(config, workdir)
    jax.effects_barrier()
    seconds = time.perf_counter() - start
    return dict(seconds=seconds,
                image_auroc={run["name"]: run["image_auroc"] for run in result["runs"]})


def fcd_jax_jobs_process(config: ml_collections.ConfigDict, workdirs: list[str],
                         compilation_cache: str) -> list[dict[str, Any]]:
    """:func:`fcd_jax_job` into each of ``workdirs`` in turn, in one fresh ``spawn``-ed process
    (nothing compiled yet) whose JAX reads and writes the persistent compilation cache
    ``compilation_cache``, as ``fcd_jax.main`` runs (``--compilation_cache``): the first job
    of an empty cache is a user's first job; a second job in the process finds every program
    compiled; the first job of a process over a filled cache is a later job of the same
    sizes."""
    return in_fresh_process(_fcd_jax_jobs_child, config.to_json(), workdirs, compilation_cache)


def _fcd_jax_jobs_child(config_json: str, workdirs: list[str],
                        compilation_cache: str) -> list[dict[str, Any]]:
    import json

    from fcd_jax import compilation_cache as cache

    cache.enable(compilation_cache)
    config = ml_collections.ConfigDict(json.loads(config_json))
    return [fcd_jax_job(config, workdir) for workdir in workdirs]


def scratch_dir() -> str:
    """A fresh temporary folder (the caller removes it)."""
    return tempfile.mkdtemp(prefix="fcd_protocol_", dir=os.environ.get("TMPDIR"))
