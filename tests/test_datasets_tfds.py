"""tfds one-class splits: under ``tfds.testing.mock_data``, and through a real TensorFlow-free
preparation from fake downloads (array_record on disk, read back with ``tfds.data_source``)."""

import contextlib
import socket
import sys
from unittest import mock

import numpy as np
import pytest
import tensorflow_datasets as tfds
from fixtures import default_data_config

from fcd_jax import input_pipeline
from fcd_jax.datasets import tfds_one_class
from fcd_jax.errors import DataError

N_MOCK = 48

# Written out from the datasets' own releases (batches.meta.txt, coarse_label_names.txt).
CIFAR10_NAMES = "airplane automobile bird cat deer dog frog horse ship truck".split()
CIFAR100_COARSE_NAMES = """aquatic_mammals fish flowers food_containers fruit_and_vegetables
household_electrical_devices household_furniture insects large_carnivores
large_man-made_outdoor_things large_natural_outdoor_scenes large_omnivores_and_herbivores
medium_mammals non-insect_invertebrates people reptiles small_mammals trees vehicles_1
vehicles_2""".split()


@pytest.fixture(autouse=True)
def fresh_cache():
    tfds_one_class.read_split.cache_clear()
    yield
    tfds_one_class.read_split.cache_clear()


def test_run_names_are_the_datasets_class_names():
    config = default_data_config()
    for dataset, names in [
        ("cifar10", CIFAR10_NAMES),
        ("cifar100", CIFAR100_COARSE_NAMES),
        ("fashion_mnist", tfds.builder("fashion_mnist").info.features["label"].names),
    ]:
        config.name = dataset
        assert input_pipeline.list_splits(config) == list(names)


@pytest.mark.parametrize(
    "dataset, key", [("cifar10", "label"), ("cifar100", "coarse_label"), ("fashion_mnist", "label")]
)
def test_mock_one_class_split(dataset, key):
    config = default_data_config(name=dataset, holdout_fraction=0.25)
    with tfds.testing.mock_data(num_examples=N_MOCK):
        mocked = [tfds.data_source(dataset, split=s) for s in ("train", "test")]
        train_ref = [mocked[0][i] for i in range(N_MOCK)]  # one at a time: the mock lacks batches
        test_ref = [mocked[1][i] for i in range(N_MOCK)]
        run = int(train_ref[0][key])  # a class the mock's random labels contain
        name = input_pipeline.list_splits(config)[run]
        split = input_pipeline.load_split(config, name)

    normal_ref = np.stack([ex["image"] for ex in train_ref if ex[key] == run])
    assert len(normal_ref) > 0
    got = np.concatenate([split.train_images.images, split.holdout_images.images])
    assert len(got) == len(normal_ref) and len(split.holdout_images) == round(len(got) * 0.25)
    assert sorted(map(bytes, got)) == sorted(map(bytes, normal_ref))  # only the normal class

    test_runs = np.array([ex[key] for ex in test_ref])
    assert split.test_labels.dtype == np.int32 and set(split.test_labels) <= {0, 1}
    assert len(split.test_labels) == N_MOCK
    assert (split.test_labels == 0).sum() == (test_runs == run).sum()
    np.testing.assert_array_equal(split.test_labels, (test_runs != run).astype(int))
    np.testing.assert_array_equal(split.test_classes, test_runs)
    np.testing.assert_array_equal(
        split.test_images.images, np.stack([ex["image"] for ex in test_ref])
    )
    assert split.test_class_names == input_pipeline.list_splits(config)
    assert split.test_masks is None


# --- preparation without TensorFlow, from fake downloads ----------------------------------------


def fake_cifar100_download(directory, n, names, seed=0):
    """A CIFAR-100 binary release: rows of (coarse, fine, 3072 CHW pixels) plus label-name files."""
    folder = directory / "cifar-100-binary"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for file, count in (("train.bin", n), ("test.bin", n // 2)):
        coarse = rng.integers(0, 20, (count, 1))
        fine = rng.integers(0, 100, (count, 1))
        pixels = rng.integers(0, 256, (count, 3072))
        np.concatenate([coarse, fine, pixels], 1).astype(np.uint8).tofile(folder / file)
    (folder / "coarse_label_names.txt").write_text("\n".join(names) + "\n")
    (folder / "fine_label_names.txt").write_text("\n".join(f"fine{i}" for i in range(100)) + "\n")
    return directory


def cifar_rows(download_dir, file):
    return np.fromfile(download_dir / "cifar-100-binary" / file, np.uint8).reshape(-1, 3074)


@pytest.fixture
def cifar100_download(tmp_path):
    return fake_cifar100_download(tmp_path / "download", 60, CIFAR100_COARSE_NAMES)


@contextlib.contextmanager
def patched_download(result):
    """tfds "downloads" ``result``; the network probe passes."""
    with (
        mock.patch.object(
            tfds.download.DownloadManager, "download_and_extract", lambda self, urls: result
        ),
        mock.patch.object(tfds_one_class, "_check_reachable", lambda *args: None),
    ):
        yield


def test_tf_free_prepare_then_load_cifar100(tmp_path, cifar100_download):
    config = default_data_config(
        name="cifar100", data_dir=str(tmp_path / "tfds"), holdout_fraction=0.0
    )
    with patched_download(cifar100_download):  # load_split prepares the missing dataset itself
        split = input_pipeline.load_split(config, "fish")
    assert "tensorflow" not in sys.modules

    train, test = (
        cifar_rows(cifar100_download, "train.bin"),
        cifar_rows(cifar100_download, "test.bin"),
    )

    def chw_to_hwc(rows):
        return rows[:, 2:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)

    normal = chw_to_hwc(train[train[:, 0] == 1])
    assert sorted(map(bytes, split.train_images.images)) == sorted(map(bytes, normal))
    # tfds shuffles records; match the test split by content.
    order = {bytes(image): i for i, image in enumerate(chw_to_hwc(test))}
    positions = [order[bytes(image)] for image in split.test_images.images]
    assert sorted(positions) == list(range(len(test)))
    np.testing.assert_array_equal(split.test_classes, test[positions, 0])
    np.testing.assert_array_equal(split.test_labels, test[positions, 0] != 1)


def test_tf_free_prepare_fashion_mnist(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 30).astype(np.uint8)
    files = {}
    for key, header, payload in [
        ("train_data", 16, images),
        ("train_labels", 8, labels),
        ("test_data", 16, images[:10]),
        ("test_labels", 8, labels[:10]),
    ]:
        files[key] = tmp_path / key
        files[key].write_bytes(bytes(header) + payload.tobytes())
    with patched_download(files):
        tfds_one_class.prepare("fashion_mnist", str(tmp_path / "tfds"))
    records = tfds_one_class.read_split("fashion_mnist", "train", str(tmp_path / "tfds"))
    got, got_labels = records.images(np.arange(len(records))), records.labels
    assert got.shape == (30, 28, 28, 1)
    order = {bytes(image): i for i, image in enumerate(images)}
    positions = [order[bytes(image[..., 0])] for image in got]
    assert sorted(positions) == list(range(30))
    np.testing.assert_array_equal(got_labels, labels[positions])


def test_array_record_reader_matches_tfds_data_source(tmp_path, cifar100_download):
    with patched_download(cifar100_download):
        tfds_one_class.prepare("cifar100", str(tmp_path / "tfds"))
    builder = tfds.builder("cifar100", data_dir=str(tmp_path / "tfds"))
    for split in ("train", "test"):
        fast = tfds_one_class._read_array_record(builder, split, "coarse_label")
        public = tfds_one_class._read_data_source(
            "cifar100", split, str(tmp_path / "tfds"), "coarse_label"
        )
        np.testing.assert_array_equal(fast.labels, public.labels)
        some = np.array([3, 0, 3, len(fast) - 1])  # decoded on demand, repeats allowed
        np.testing.assert_array_equal(fast.images(some), public.images(some))
        everything = np.arange(len(fast))
        np.testing.assert_array_equal(fast.images(everything), public.images(everything))


def test_prepared_dataset_with_other_class_names_is_refused(tmp_path):
    download = fake_cifar100_download(tmp_path / "dl", 10, [f"super{i}" for i in range(20)])
    with patched_download(download):
        tfds_one_class.prepare("cifar100", str(tmp_path / "tfds"))
    config = default_data_config(name="cifar100", data_dir=str(tmp_path / "tfds"))
    with pytest.raises(DataError, match="names its coarse_label classes"):
        input_pipeline.load_split(config, "fish")


def test_missing_dataset_is_one_line_with_the_fix(tmp_path):
    config = default_data_config(name="cifar10", data_dir=str(tmp_path / "empty"))
    config.download = False
    with pytest.raises(DataError) as error:
        input_pipeline.load_split(config, "cat")
    message = str(error.value)
    assert "\n" not in message and "cifar10 is not prepared" in message
    assert "python -m fcd_jax.datasets.tfds_one_class cifar10 --data_dir" in message


def test_offline_machine_fails_at_once_with_the_fix(tmp_path):
    config = default_data_config(name="fashion_mnist", data_dir=str(tmp_path / "tfds"))
    offline = mock.patch.object(socket, "create_connection", side_effect=OSError("no route"))
    with offline, pytest.raises(DataError) as error:
        input_pipeline.load_split(config, "Trouser")
    message = str(error.value)
    assert "\n" not in message and "fashion_mnist is not prepared" in message
    assert "cannot be reached (no route)" in message and "then copy" in message


def test_failed_download_is_one_line_with_the_fix(tmp_path):
    config = default_data_config(name="cifar10", data_dir=str(tmp_path / "tfds"))
    with (
        mock.patch.object(tfds_one_class, "_check_reachable", lambda *args: None),
        mock.patch.object(
            tfds.download.DownloadManager,
            "download_and_extract",
            side_effect=ConnectionError("connection reset"),
        ),
        pytest.raises(DataError) as error,
    ):
        input_pipeline.load_split(config, "cat")
    message = str(error.value)
    assert "\n" not in message and "could not download and prepare tfds cifar10" in message
    assert "connection reset" in message and "then copy" in message
