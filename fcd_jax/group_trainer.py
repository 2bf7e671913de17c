"""Training splits on the stack slots of one sharded, checkpointed program, as scheduled.

A ``GroupTrainer`` runs a ``schedule.Plan`` over its splits: per segment of the plan, the
stacked states of the slots (a stack of one compiled size) are stepped by ``train_step``'s
stacked step; at a segment boundary the states (and the teacher-cache rows) of the splits that
go on are gathered on the devices into the next stack, the splits that come in get fresh states
(and rows), and a split that has finished is saved (``workdir.model_dir``) before its slot is
reused. It owns the ``("split", "data")`` mesh, the teacher's parameters or the teacher cache, the
input streams, the orbax checkpoint manager and the TensorBoard writers; use it as a context
manager: leaving it closes the writers and the manager.

The orbax checkpoint of global step ``g`` holds the stack that stepped ``g - 1``; the plan is
recomputed from the config, so a run killed at any step resumes with the same numbers.

The step of every later stack size is compiled in a background thread while the current
segment trains (XLA compiles without Python's lock), so a re-stack waits for no compiler:
the same program, compiled ahead of its first call.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from tensorboardX import SummaryWriter
from tqdm.auto import tqdm

from fcd_jax import checkpoints, parallel, schedule, teacher_cache, workdir
from fcd_jax.datasets.split import Split
from fcd_jax.errors import TrainingError
from fcd_jax.input_pipeline import prefetch, train_batches
from fcd_jax.networks import Networks
from fcd_jax.schedule import IDLE
from fcd_jax.train_state import TrainState, init_stacked_states, total_steps_for
from fcd_jax.train_step import stacked_train_step


class GroupTrainer:
    """Trains ``splits`` as scheduled on ``group_size`` slots; ``model(name)`` is a trained
    split's ``{"params", "anchor"}``."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        directory: str,
        splits: list[Split],
        split_indices: list[int],
        teacher_params: dict,
        networks: Networks,
        group_size: int | None = None,
        save_models: Collection[str] | None = None,
    ):
        """``teacher_params``: cut to ``networks.teacher`` (``Networks.teacher_params``);
        ``split_indices``: each split's index in the experiment (its student's seed);
        ``group_size``: the stack slots (default: one per split), rounded up to the mesh;
        ``save_models``: the splits whose trained models are written to ``workdir.model_dir``
        when they finish (default: all)."""
        self.config = config
        self.directory = directory
        self.splits = splits
        self.split_indices = list(split_indices)
        self.networks = networks
        self.save_models = (set(save_models) if save_models is not None
                            else {split.name for split in splits})
        slots = min(group_size or len(splits), len(splits))
        self.mesh = parallel.make_mesh(slots, config.data.batch_size, config.mesh_shape)
        multiple = self.mesh.shape[parallel.SPLIT]
        totals = [total_steps_for(config, len(split.train_images)) for split in splits]
        self.plan = schedule.make_plan(totals, slots, multiple)
        self.num_stacked = self.plan.sizes[0]
        # Per split, then 0 for the padding slots of the first stack.
        self.totals = np.asarray(totals + [0] * (self.num_stacked - len(splits)), np.int32)
        logging.info("%s", schedule.describe(self.plan, slots, multiple))
        self.teacher_params = jax.device_put(teacher_params, parallel.replicated(self.mesh))
        self.cached_teacher = teacher_cache.use_teacher_cache(
            config, self.mesh, self.num_stacked,
            images_seen=max(totals) * config.data.batch_size,
            largest_set=max(len(split.train_images) for split in splits),
            bytes_per_device=self.teacher_cache_bytes(),
        )
        self.step_fn = stacked_train_step(config, networks, self.mesh, self.cached_teacher)
        self.compiler = ThreadPoolExecutor(1, thread_name_prefix="compile-later-stacks")
        self.compiled: dict[int, Future] = {}  # stack size -> its step, compiled ahead
        self.checkpoints = checkpoints.training_manager(
            workdir.checkpoint_dir(directory, [split.name for split in splits])
        )
        self.writers = (
            {split.name: SummaryWriter(workdir.tensorboard_dir(directory, split.name))
             for split in splits}
            if jax.process_index() == 0 else {}
        )
        self.states: TrainState | None = None  # the current segment's stack
        self.cache: Any = None  # its teacher-cache rows (a pytree for a CNN)
        self.models: dict[str, dict] = {}  # the finished splits' models, replicated
        self.steps_taken: dict[str, int] = {}  # each finished split's own step count

    def __enter__(self) -> GroupTrainer:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        """Waits for pending checkpoint saves, then closes the manager and the writers."""
        self.compiler.shutdown(cancel_futures=True)
        self.checkpoints.wait_until_finished()
        self.checkpoints.close()
        for writer in self.writers.values():
            writer.close()

    def teacher_cache_bytes(self) -> int:
        """Device memory per device of the teacher cache of the largest stack."""
        sources = [split.train_images for split in self.splits]
        return teacher_cache.cache_bytes(
            teacher_cache.image_features(
                self.config, self.networks, self.teacher_params, sources[0].image_shape
            ),
            self.num_stacked // self.mesh.shape[parallel.SPLIT],
            teacher_cache.cache_length(sources, self.config.data.batch_size),
        )

    # --- The plan, segment by segment ----------------------------------------------------------

    def train(self) -> None:
        """Trains from the last checkpoint (if any) to the end of the plan."""
        plan = self.plan
        self.states, restored = checkpoints.restore_latest(self.checkpoints, self.abstract_states)
        step = int(restored or 0)
        if restored is not None:
            logging.info("resuming %s at step %d of %d", self.checkpoints.directory, step,
                         plan.last)
        names = ", ".join(split.name for split in self.splits)
        with tqdm(
            total=plan.last, initial=step, desc=f"train {names}"[:60], unit="step",
            disable=jax.process_index() != 0, dynamic_ncols=True,
        ) as bar:
            first = plan.segment_index(step)
            if restored is not None and step == plan.segments[first].stop:
                first += 1  # the restored stack ended its segment
            for index in range(first, len(plan.segments)):
                segment = plan.segments[index]
                if step == segment.start:
                    self.begin_segment(index)
                if self.cached_teacher and self.cache is None:
                    self.cache = self.fill_cache(segment.slots, segment.size)
                self.run_segment(segment, step, bar)
                step = segment.stop
        self.finish_splits(plan.segments[-1], plan.last)
        self.checkpoints.wait_until_finished()
        for writer in self.writers.values():
            writer.flush()

    def abstract_states(self, step: int) -> TrainState:
        """Shapes, dtypes and shardings of the stack that stepped global step ``step - 1``."""
        size = self.plan.segments[self.plan.segment_index(max(step - 1, 0))].size
        return self.abstract_stack(size)

    def abstract_stack(self, size: int) -> TrainState:
        shapes = jax.eval_shape(lambda: self.fresh_states([IDLE] * size))
        sharding = parallel.stacked_sharding(self.mesh)
        return jax.tree.map(
            lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), shapes
        )

    def fresh_states(self, slots: list[int] | tuple[int, ...]) -> TrainState:
        """A stack of fresh students for ``slots`` (IDLE: a padding state of 0 steps)."""
        return init_stacked_states(
            self.config, self.teacher_params, self.networks,
            np.asarray([self.split_indices[max(split, 0)] for split in slots], np.int32),
            np.asarray([self.plan.totals[split] if split != IDLE else 0 for split in slots],
                       np.int32),
            self.mesh,
        )

    def begin_segment(self, index: int) -> None:
        """The stack of segment ``index``: the first one fresh; later ones from the previous
        stack (the splits that finished at its end saved first) and fresh incoming states."""
        plan, segment = self.plan, self.plan.segments[index]
        if index == 0:
            self.states, self.cache = self.fresh_states(segment.slots), None
            return
        previous = plan.segments[index - 1]
        self.finish_splits(previous, segment.start)
        transition = plan.transition(index)
        if transition.is_identity:
            return
        incoming = list(transition.incoming)
        padded = parallel.padded_num_splits(len(incoming), self.mesh) if incoming else 0
        padding = [IDLE] * (padded - len(incoming))
        # Fresh states written at the incoming slots; the padded tail of the scatter is dropped.
        slots = np.asarray(list(transition.incoming_slots) + [segment.size] * len(padding),
                           np.int32)
        gather = np.asarray(transition.gather, np.int32)
        fresh = self.fresh_states(incoming + padding) if incoming else None
        self.states = restack(self.mesh)(self.states, fresh, gather, slots)
        if self.cache is not None:
            rows = self.fill_cache(incoming, padded) if incoming else None
            self.cache = restack(self.mesh)(self.cache, rows, gather, slots)

    def fill_cache(self, slots: list[int] | tuple[int, ...], size: int) -> Any:
        """The teacher's features of the training images of the splits in ``slots`` (IDLE: no
        image), a stack of ``size``, each padded to the rows of the largest split."""
        sources = [self.splits[split].train_images for split in slots if split != IDLE]
        empty = sources[0].subset(np.arange(0))
        cache = teacher_cache.fill_teacher_cache(
            self.config, self.networks, self.teacher_params,
            [self.splits[split].train_images if split != IDLE else empty for split in slots],
            self.mesh, size,
        )
        rows = teacher_cache.cache_length(
            [split.train_images for split in self.splits], self.config.data.batch_size
        )
        cached_rows = jax.tree.leaves(cache)[0].shape[1]
        return pad_rows(self.mesh)(cache, rows) if cached_rows < rows else cache

    def finish_splits(self, segment: schedule.Segment, step: int) -> None:
        """Keeps (and saves, if asked) the models of the splits of ``segment`` that end at
        global step ``step``, before their slots are reused."""
        take = parallel.jit_once(("take", self.mesh), lambda: jax.jit(
            lambda states, index: jax.tree.map(lambda leaf: leaf[index], states),
            out_shardings=parallel.replicated(self.mesh),
        ))
        for slot, split in enumerate(segment.slots):
            if split == IDLE or self.plan.ends(split) != step:
                continue
            name = self.splits[split].name
            state = take(self.states, np.int32(slot))
            self.models[name] = {"params": state.params, "anchor": state.anchor}
            self.steps_taken[name] = int(state.step)
            if name in self.save_models:
                checkpoints.save_tree(workdir.model_dir(self.directory, name), self.models[name])

    def run_segment(self, segment: schedule.Segment, start: int, bar: tqdm) -> None:
        """Global steps ``start .. segment.stop - 1``: log, check for NaN and save on the
        configured steps only (the loop never waits for the device otherwise)."""
        config, last = self.config, self.plan.last
        active = np.asarray(segment.slots) != IDLE
        images_per_step = int(active.sum()) * config.data.batch_size
        teacher = self.cache if self.cached_teacher else self.teacher_params
        step_fn = self.segment_step(segment.size)
        tick, tick_step = time.perf_counter(), start
        steps = range(start, segment.stop)
        for step, batch in zip(steps, self.global_batches(segment, start), strict=True):
            self.states, metrics = step_fn(self.states, teacher, batch)
            if step == start:
                self.compile_later_stacks(segment, teacher, batch)
            done = step + 1
            save = done % config.train.checkpoint_every == 0 or done == last
            if save or done % config.train.log_every == 0:
                metrics = multihost_utils.process_allgather(metrics, tiled=True)
                self.check_finite(segment, np.asarray(metrics["loss"]), done)
                now = time.perf_counter()
                rate = (done - tick_step) * images_per_step / max(now - tick, 1e-9)
                tick, tick_step = now, done
                loss = float(np.mean(np.asarray(metrics["loss"])[active]))
                bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{rate:.0f}")
                bar.update(done - bar.n)
                self.log_metrics(segment, metrics, done)
            if save:
                self.checkpoints.save(done, args=ocp.args.StandardSave(self.states))

    def segment_step(self, size: int) -> Callable:
        """The step of a stack of ``size``: compiled ahead (waited for) or the jitted step."""
        future = self.compiled.get(size)
        return self.step_fn if future is None else future.result()

    def compile_later_stacks(self, segment: schedule.Segment, teacher: Any, batch: Any) -> None:
        """Starts compiling the step of each stack size that a later segment runs, for the
        shapes and shardings of this segment's arguments at that size."""
        later = {other.size for other in self.plan.segments if other.start >= segment.stop}
        for size in sorted(later - {segment.size} - set(self.compiled), reverse=True):
            def at_size(tree, size=size):
                return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(
                    (size, *leaf.shape[1:]), leaf.dtype, sharding=leaf.sharding), tree)

            arguments = (self.abstract_stack(size),
                         at_size(teacher) if self.cached_teacher else teacher, at_size(batch))
            self.compiled[size] = self.compiler.submit(
                lambda arguments=arguments: self.step_fn.lower(*arguments).compile())

    def log_metrics(self, segment: schedule.Segment, metrics: dict, step: int) -> None:
        """TensorBoard scalars ``train/<metric>`` of the splits that trained (process 0), at
        each split's own step."""
        for slot, split in enumerate(segment.slots):
            name = self.splits[split].name if split != IDLE else None
            if name in self.writers:
                own_step = step - self.plan.begins[split]
                for key, values in metrics.items():
                    self.writers[name].add_scalar(f"train/{key}", float(values[slot]), own_step)

    def check_finite(self, segment: schedule.Segment, losses: np.ndarray, step: int) -> None:
        """One ``TrainingError`` line if a split that trained has a NaN or infinite loss."""
        for split, loss in zip(segment.slots, losses, strict=True):
            if split != IDLE and not np.isfinite(loss):
                self.checkpoints.wait_until_finished()  # keep what was written so far
                kept = self.checkpoints.latest_step()
                raise TrainingError(
                    f"run {self.splits[split].name}: the loss became {loss} at step "
                    f"{step - self.plan.begins[split]}; lower --config.optim.lr or keep "
                    "--config.optim.clip_norm=1.0 ("
                    + ("no checkpoint was written yet" if kept is None else
                       f"checkpoints up to step {kept} are kept in {self.checkpoints.directory};"
                       " a rerun resumes from them: delete it or use another --workdir to start"
                       " afresh")
                    + ")"
                )

    def global_batches(self, segment: schedule.Segment, start: int) -> Iterator[Any]:
        """The global uint8 batches ``[S, B, h, w, c]`` of global steps ``start ..
        segment.stop - 1``, each slot's from its split's own step (with the teacher cache:
        ``(images, indices [S, B] into the cache)``), each process loading only its block;
        prefetched in a background thread so that the device does not wait for the host.
        IDLE slots load nothing (zeros)."""
        layout = parallel.GlobalBatch(
            parallel.batch_sharding(self.mesh),
            (segment.size, self.config.data.batch_size, *self.splits[0].train_images.image_shape),
        )
        index_layout = parallel.GlobalBatch(layout.sharding, layout.shape[:2])
        process_index, process_count = layout.process_slot
        streams = {
            slot: train_batches(
                self.splits[split].train_images, self.config.data.batch_size,
                seed=self.config.seed, start_step=start - self.plan.begins[split],
                process_index=process_index, process_count=process_count, with_indices=True,
            )
            for slot in range(layout.splits.start, layout.splits.stop)
            if (split := segment.slots[slot]) != IDLE
        }

        def produce():
            for _ in range(start, segment.stop):
                parts = {slot: next(stream) for slot, stream in streams.items()}
                images = layout.assemble({slot: part[0] for slot, part in parts.items()})
                if self.cached_teacher:
                    indices = index_layout.assemble(
                        {slot: part[1] for slot, part in parts.items()}, np.int32
                    )
                    yield images, indices
                else:
                    yield images

        return prefetch(produce(), size=2)

    # --- Results -------------------------------------------------------------------------------

    def model(self, name: str) -> dict:
        """Split ``name``'s trained ``{"params", "anchor"}``, replicated over the mesh (read from
        its ``workdir.model_dir`` if it finished before this process resumed)."""
        if name not in self.models:
            saved = checkpoints.load_tree(workdir.model_dir(self.directory, name))
            self.models[name] = jax.device_put(saved, parallel.replicated(self.mesh))
        return self.models[name]

    def final_models(self) -> list[dict]:
        """Each split's trained ``{"params", "anchor"}``, replicated over the mesh."""
        return [self.model(split.name) for split in self.splits]


def restack(mesh: jax.sharding.Mesh):
    """``restack(old, fresh, gather, slots)``: the stack ``old[gather]`` (every leaf), with
    ``fresh`` (or nothing: None) written at ``slots`` (an index past the end: dropped)."""

    def apply(old, fresh, gather, slots):
        new = jax.tree.map(lambda leaf: leaf[gather], old)
        if fresh is None:
            return new

        return jax.tree.map(lambda leaf, rows: leaf.at[slots].set(rows, mode="drop"), new, fresh)

    return parallel.jit_once(("restack", mesh), lambda: jax.jit(
        apply, out_shardings=parallel.stacked_sharding(mesh),
    ))


def pad_rows(mesh: jax.sharding.Mesh):
    """``pad_rows(cache, rows)``: a teacher cache (every leaf ``[S, N, ...]``: one array for a
    ViT, one per tap for a CNN) padded with zeros to ``rows``."""

    def pad(leaf, rows):
        return jnp.pad(leaf, [(0, 0), (0, rows - leaf.shape[1])] + [(0, 0)] * (leaf.ndim - 2))

    def apply(cache, rows):
        return jax.tree.map(lambda leaf: pad(leaf, rows), cache)

    return parallel.jit_once(("pad_rows", mesh), lambda: jax.jit(
        apply, static_argnums=1, out_shardings=parallel.stacked_sharding(mesh),
    ))
