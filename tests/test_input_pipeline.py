"""Batching, evaluation coverage, on-device preprocessing and the split API's errors."""

import itertools

import jax
import ml_collections
import numpy as np
import pytest
from fixtures import default_data_config

from fcd_jax import input_pipeline
from fcd_jax.errors import DataError, FcdError
from fcd_jax.input_pipeline import ArraySource
from fcd_jax.preprocessing import preprocess


def data(image_size, mean, std):
    return ml_collections.ConfigDict(dict(image_size=image_size, mean=mean, std=std))


def numbered_source(n: int, size: int = 2) -> ArraySource:
    """Image i is filled with the value i (so batches can be read back as indices)."""
    return ArraySource(
        np.broadcast_to(
            np.arange(n, dtype=np.uint8)[:, None, None, None], (n, size, size, 3)
        ).copy()
    )


def ids(batch: np.ndarray) -> np.ndarray:
    return batch[:, 0, 0, 0].astype(int)


def take(iterator, count):
    return [ids(b) for b in itertools.islice(iterator, count)]


def test_steps_per_epoch():
    assert input_pipeline.steps_per_epoch(10, 4) == 2
    assert input_pipeline.steps_per_epoch(8, 4) == 2
    assert input_pipeline.steps_per_epoch(3, 4) == 1


def test_train_epochs_are_permutations_without_the_partial_batch():
    source = numbered_source(10)
    batches = take(input_pipeline.train_batches(source, 4, seed=1), 4)  # 2 epochs of 2 steps
    for epoch in (batches[0:2], batches[2:4]):
        seen = np.concatenate(epoch)
        assert len(seen) == 8 and len(set(seen.tolist())) == 8  # 8 distinct of 10, 2 dropped
    assert not np.array_equal(np.concatenate(batches[0:2]), np.concatenate(batches[2:4]))


def test_train_batches_deterministic_and_resumable():
    source = numbered_source(10)
    run = take(input_pipeline.train_batches(source, 4, seed=3), 7)
    again = take(input_pipeline.train_batches(source, 4, seed=3), 7)
    resumed = take(input_pipeline.train_batches(source, 4, seed=3, start_step=5), 2)
    other_seed = take(input_pipeline.train_batches(source, 4, seed=4), 7)
    np.testing.assert_array_equal(run, again)
    np.testing.assert_array_equal(run[5:], resumed)
    assert not np.array_equal(run, other_seed)


def test_train_process_slices_partition_the_global_batch():
    source = numbered_source(13)
    global_batches = take(input_pipeline.train_batches(source, 6, seed=0), 5)
    slices = [
        take(input_pipeline.train_batches(source, 6, 0, process_index=p, process_count=3), 5)
        for p in range(3)
    ]
    for step in range(5):
        assert all(len(s[step]) == 2 for s in slices)
        np.testing.assert_array_equal(
            np.concatenate([s[step] for s in slices]), global_batches[step]
        )


def test_train_set_smaller_than_a_batch_wraps_around():
    source = numbered_source(3)
    batches = take(input_pipeline.train_batches(source, 4, seed=0), 3)
    stream = np.concatenate(batches)  # 12 = 4 epochs of 3, each a permutation
    for epoch in stream.reshape(4, 3):
        assert sorted(epoch.tolist()) == [0, 1, 2]


def test_train_batches_reject_bad_process_arguments():
    with pytest.raises(ValueError, match="divisible"):
        next(input_pipeline.train_batches(numbered_source(8), 4, 0, process_count=3))


@pytest.mark.parametrize("n", [12, 13, 1, 5])
@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_covers_every_image_exactly_once(n, process_count):
    batch_size = 4
    source = numbered_source(n)
    per_process = [
        list(input_pipeline.eval_batches(source, batch_size, p, process_count))
        for p in range(process_count)
    ]
    assert len({len(batches) for batches in per_process}) == 1  # same count on every process
    assert len(per_process[0]) == -(-n // batch_size)
    seen = []
    for step in range(len(per_process[0])):  # the global batch = process slices in order
        images = np.concatenate([batches[step][0] for batches in per_process])
        valid = np.concatenate([batches[step][1] for batches in per_process])
        assert images.shape == (batch_size, 2, 2, 3) and valid.dtype == bool
        assert not images[~valid].any()  # padding is zeros
        seen += ids(images[valid]).tolist()
    assert seen == list(range(n))


def _bilinear_reference(images: np.ndarray, size: int) -> np.ndarray:
    """Half-pixel-centred bilinear upsampling with edge clamping, in plain NumPy."""

    def axis_weights(n_in):
        x = np.clip((np.arange(size) + 0.5) * n_in / size - 0.5, 0, n_in - 1)
        lo = np.floor(x).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        w = np.zeros((size, n_in))
        np.add.at(w, (np.arange(size), lo), 1 - (x - lo))
        np.add.at(w, (np.arange(size), hi), x - lo)
        return w

    wy, wx = axis_weights(images.shape[1]), axis_weights(images.shape[2])
    return np.einsum("yh,nhwc,xw->nyxc", wy, images.astype(np.float64), wx)


def test_preprocess_matches_numpy_reference():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(2, 8, 8, 3), dtype=np.uint8)
    got = np.asarray(jax.jit(lambda x: preprocess(x, data(16, 0.5, 0.5)))(images))
    want = (_bilinear_reference(images, 16) / 255.0 - 0.5) / 0.5
    assert got.dtype == np.float32 and got.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_preprocess_gray_to_three_channels_and_per_channel_stats():
    gray = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4, 1) * 7
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    got = np.asarray(preprocess(gray, data(4, mean, std)))
    x = gray.astype(np.float64) / 255.0
    want = np.concatenate([(x - m) / s for m, s in zip(mean, std, strict=True)], axis=-1)
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(preprocess(gray[..., 0], data(4, 0.5, 0.5))),
        (np.repeat(x, 3, -1) - 0.5) / 0.5,
        atol=1e-6,
    )


def test_prefetch_yields_everything_and_reraises():
    assert list(input_pipeline.prefetch(iter(range(5)))) == list(range(5))

    def broken():
        yield 1
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        list(input_pipeline.prefetch(broken()))


def test_select_splits_keeps_the_datasets_order_and_names_unknown_ones():
    config = ml_collections.ConfigDict(dict(data=default_data_config(name="digits"), splits="all"))
    assert input_pipeline.select_splits(config) == [str(digit) for digit in range(10)]
    config.splits = " 7, 3"
    assert input_pipeline.select_splits(config) == ["7", "3"]
    config.splits = "3,x"
    with pytest.raises(FcdError, match=r"unknown split\(s\) x for dataset digits: choose from 0"):
        input_pipeline.select_splits(config)


def test_unknown_dataset_and_run_are_one_line_errors():
    data = default_data_config(name="imagenet")
    with pytest.raises(DataError, match="unknown dataset 'imagenet'; valid: cifar10, ") as error:
        input_pipeline.list_splits(data)
    assert "\n" not in str(error.value)
    data.name = "cifar10"
    with pytest.raises(DataError, match="unknown run 'zebra' .* valid: airplane, automobile"):
        input_pipeline.load_split(data, "zebra")
