"""Training a group of splits as one stacked, sharded, checkpointed program.

A ``GroupTrainer`` owns what one group needs while it trains: the ``("split", "data")`` mesh, the
stacked states (padded to the mesh), the compiled stacked step (``train_step``), the teacher's
parameters or the teacher cache, the input streams, the orbax checkpoint manager and the
TensorBoard writers. Use it as a context manager: leaving it closes the writers and the manager.
Killed at any step, the same group resumes from its last checkpoint with the same numbers.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from tensorboardX import SummaryWriter
from tqdm.auto import tqdm

from fcd_jax import checkpoints, parallel, teacher_cache, workdir
from fcd_jax.datasets.split import Split
from fcd_jax.errors import TrainingError
from fcd_jax.input_pipeline import prefetch, train_batches
from fcd_jax.networks import Networks
from fcd_jax.train_state import init_stacked_states, total_steps_for
from fcd_jax.train_step import stacked_train_step


class GroupTrainer:
    """Trains ``splits`` together; ``final_models()`` are their trained students and anchors."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        directory: str,
        splits: list[Split],
        split_indices: list[int],
        teacher_params: dict,
        networks: Networks,
        group_size: int | None = None,
    ):
        """``teacher_params``: cut to ``networks.teacher`` (``Networks.teacher_params``);
        ``split_indices``: each split's index in the experiment (its student's seed);
        ``group_size``: the stack is sized for this many splits (a smaller last group is padded
        to it, so it reuses the compiled programs of the full groups)."""
        self.config = config
        self.splits = splits
        self.networks = networks
        group_size = max(group_size or len(splits), len(splits))
        self.mesh = parallel.make_mesh(group_size, config.data.batch_size, config.mesh_shape)
        self.num_stacked = parallel.padded_num_splits(group_size, self.mesh)
        padding = self.num_stacked - len(splits)
        self.totals = np.asarray(
            [total_steps_for(config, len(split.train_images)) for split in splits] + [0] * padding,
            np.int32,
        )
        indices = np.asarray(list(split_indices) + [split_indices[0]] * padding, np.int32)
        self.teacher_params = jax.device_put(teacher_params, parallel.replicated(self.mesh))
        self.states = init_stacked_states(
            config, self.teacher_params["pos_embedding"], networks, indices, self.totals,
            self.mesh,
        )
        self.layout = parallel.GlobalBatch(
            parallel.batch_sharding(self.mesh),
            (self.num_stacked, config.data.batch_size, *splits[0].train_images.image_shape),
        )
        self.cached_teacher = teacher_cache.use_teacher_cache(
            config, self.mesh, self.num_stacked,
            images_seen=int(self.totals.max()) * config.data.batch_size,
            largest_set=max(len(split.train_images) for split in splits),
            bytes_per_device=self.teacher_cache_bytes(),
        )
        self.step_fn = stacked_train_step(config, networks, self.mesh, self.cached_teacher)
        self.checkpoints = checkpoints.training_manager(
            workdir.checkpoint_dir(directory, [split.name for split in splits])
        )
        self.writers = (
            {split.name: SummaryWriter(workdir.tensorboard_dir(directory, split.name))
             for split in splits}
            if jax.process_index() == 0 else {}
        )

    def __enter__(self) -> GroupTrainer:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        """Waits for pending checkpoint saves, then closes the manager and the writers."""
        self.checkpoints.wait_until_finished()
        self.checkpoints.close()
        for writer in self.writers.values():
            writer.close()

    def teacher_cache_bytes(self) -> int:
        """Device memory per device of the teacher cache of this group."""
        sources = [split.train_images for split in self.splits]
        return teacher_cache.cache_bytes(
            teacher_cache.image_features(
                self.config, self.networks, self.teacher_params, sources[0].image_shape
            ),
            self.num_stacked // self.mesh.shape[parallel.SPLIT],
            teacher_cache.cache_length(sources, self.config.data.batch_size),
        )

    def train(self) -> None:
        """Trains from the last checkpoint (if any) to the end of the longest split."""
        self.states, restored = checkpoints.restore_latest(self.checkpoints, self.states)
        start = int(restored or 0)
        last = int(self.totals.max())
        if restored is not None:
            logging.info("resuming %s at step %d of %d", self.checkpoints.directory, start, last)
        names = ", ".join(split.name for split in self.splits)
        with tqdm(
            total=last, initial=start, desc=f"train {names}"[:60], unit="step",
            disable=jax.process_index() != 0, dynamic_ncols=True,
        ) as bar:
            self.run_steps(start, last, bar)
        self.checkpoints.wait_until_finished()
        for writer in self.writers.values():
            writer.flush()

    def run_steps(self, start: int, last: int, bar: tqdm) -> None:
        """Steps ``start`` to ``last``: log, check for NaN and save on the configured steps only
        (the loop never waits for the device otherwise)."""
        config = self.config
        images_per_step = len(self.splits) * config.data.batch_size
        teacher = self.teacher_params
        if self.cached_teacher and start < last:
            teacher = teacher_cache.fill_teacher_cache(
                config, self.networks, self.teacher_params,
                [split.train_images for split in self.splits], self.mesh, self.num_stacked,
            )
        tick, tick_step = time.perf_counter(), start
        for step, batch in zip(range(start, last), self.global_batches(start, last), strict=True):
            self.states, metrics = self.step_fn(self.states, teacher, batch)
            done = step + 1
            save = done % config.train.checkpoint_every == 0 or done == last
            if save or done % config.train.log_every == 0:
                active = step < self.totals  # the splits this step trained
                metrics = multihost_utils.process_allgather(metrics, tiled=True)
                self.check_finite(np.asarray(metrics["loss"]), done, active)
                now = time.perf_counter()
                rate = (done - tick_step) * images_per_step / max(now - tick, 1e-9)
                tick, tick_step = now, done
                bar.set_postfix(loss=f"{float(np.mean(metrics['loss'][: len(self.splits)])):.3f}",
                                img_s=f"{rate:.0f}")
                bar.update(done - bar.n)
                self.log_metrics(metrics, done, active)
            if save:
                self.checkpoints.save(done, args=ocp.args.StandardSave(self.states))

    def log_metrics(self, metrics: dict, step: int, active: np.ndarray) -> None:
        """TensorBoard scalars ``train/<metric>`` of the splits that trained (process 0)."""
        for index, split in enumerate(self.splits):
            if split.name in self.writers and active[index]:
                for key, values in metrics.items():
                    self.writers[split.name].add_scalar(f"train/{key}", float(values[index]), step)

    def check_finite(self, losses: np.ndarray, step: int, active: np.ndarray) -> None:
        """One ``TrainingError`` line if a split that trained has a NaN or infinite loss."""
        for split, loss, is_active in zip(self.splits, losses, active, strict=False):
            if is_active and not np.isfinite(loss):
                self.checkpoints.wait_until_finished()  # keep what was written so far
                kept = self.checkpoints.latest_step()
                raise TrainingError(
                    f"run {split.name}: the loss became {loss} at step {step}; lower "
                    f"--config.optim.lr or keep --config.optim.clip_norm=1.0 ("
                    + ("no checkpoint was written yet" if kept is None else
                       f"checkpoints up to step {kept} are kept in {self.checkpoints.directory};"
                       " a rerun resumes from them: delete it or use another --workdir to start"
                       " afresh")
                    + ")"
                )

    def global_batches(self, start_step: int, stop_step: int) -> Iterator[Any]:
        """The global uint8 batches ``[S, B, h, w, c]`` of steps ``start_step..stop_step - 1``
        (with the teacher cache: ``(images, indices [S, B] into the cache)``), each process
        loading only its block; prefetched in a background thread so that the device does not
        wait for the host. Padding splits load nothing (zeros)."""
        layout = self.layout
        index_layout = parallel.GlobalBatch(layout.sharding, layout.shape[:2])
        process_index, process_count = layout.process_slot
        streams = {
            split: train_batches(
                self.splits[split].train_images, self.config.data.batch_size,
                seed=self.config.seed, start_step=start_step, process_index=process_index,
                process_count=process_count, with_indices=True,
            )
            for split in range(layout.splits.start, min(layout.splits.stop, len(self.splits)))
        }

        def produce():
            for _ in range(start_step, stop_step):
                parts = {split: next(stream) for split, stream in streams.items()}
                images = layout.assemble({split: part[0] for split, part in parts.items()})
                if self.cached_teacher:
                    indices = index_layout.assemble(
                        {split: part[1] for split, part in parts.items()}, np.int32
                    )
                    yield images, indices
                else:
                    yield images

        return prefetch(produce(), size=2)

    def final_models(self) -> list[dict]:
        """Each split's trained ``{"params", "anchor"}``, replicated over the mesh."""
        take = parallel.jit_once(("take", self.mesh), lambda: jax.jit(
            lambda states, index: jax.tree.map(lambda leaf: leaf[index], states),
            out_shardings=parallel.replicated(self.mesh),
        ))
        models = []
        for index in range(len(self.splits)):
            state = take(self.states, index)
            models.append({"params": state.params, "anchor": state.anchor})
        return models
