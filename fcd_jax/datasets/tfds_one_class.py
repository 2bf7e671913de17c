"""One-class splits of CIFAR-10, CIFAR-100 (20 superclasses) and Fashion-MNIST from tfds.

METHOD.md "Training and data protocol": one class (CIFAR-100: one ``coarse_label`` superclass) is
normal; train = that class's training images; test = the whole test split, label 1 = any other
class.

Reading uses ``tfds.data_source`` (array_record random access): no TensorFlow. A whole split is
read into host memory once per process (uint8, native size: 32x32x3 or 28x28x1) and cached.

Preparing: tfds's own builders need TensorFlow only to read the downloaded files
(``tf.io.gfile``) and to PNG-encode the images (``tf.image.encode_png``). ``prepare`` runs the same
builders with those two steps done by NumPy and PIL, so a connected machine prepares the data
without TensorFlow (``python -m fcd_jax.datasets.tfds_one_class cifar10 --data_dir DIR``).
"""

from __future__ import annotations

import concurrent.futures
import functools
import io
import os
import socket
import sys

import numpy as np
from PIL import Image

from fcd_jax.datasets.split import Split, one_class_split
from fcd_jax.errors import DataError
from fcd_jax.paper_results import CIFAR10_CLASSES, CIFAR100_SUPERCLASSES, FASHION_MNIST_CLASSES

# dataset -> (the label feature that defines a run, the run names in label order)
RUN_LABELS: dict[str, tuple[str, tuple[str, ...]]] = {
    "cifar10": ("label", CIFAR10_CLASSES),
    "cifar100": ("coarse_label", CIFAR100_SUPERCLASSES),
    "fashion_mnist": ("label", FASHION_MNIST_CLASSES),
}


def list_runs(dataset: str) -> list[str]:
    return list(RUN_LABELS[dataset][1])


def _how_to_prepare(dataset: str, data_dir: str) -> str:
    return (
        f"on a connected machine run `python -m fcd_jax.datasets.tfds_one_class {dataset} "
        f"--data_dir {data_dir}` (no TensorFlow needed; or `tfds build {dataset} --data_dir "
        f"{data_dir} --file_format array_record` with TensorFlow), "
        f"then copy {data_dir}/{dataset} here"
    )


def _prepared_builder(dataset: str, data_dir: str | None, download: bool):
    """The tfds builder of ``dataset`` prepared as array_record (prepared here first if missing
    and ``download``), or None where tfds serves data without files (``tfds.testing.mock_data``).
    """
    import tensorflow_datasets as tfds

    builder = tfds.builder(dataset, data_dir=data_dir)
    root = str(builder.data_dir_root)
    if builder.is_prepared():
        if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
            raise DataError(
                f"tfds {dataset} in {builder.data_dir} is in {builder.info.file_format.value} "
                f"format, which has no random access; rebuild it with array_record: "
                f"{_how_to_prepare(dataset, root)}"
            )
        return builder
    try:  # a mocked tfds serves examples although nothing is prepared
        tfds.data_source(dataset, split="test", data_dir=data_dir, download=False)
        return None
    except Exception:  # tfds raises several types for a missing dataset
        pass
    if not download:
        raise DataError(
            f"tfds dataset {dataset} is not prepared in {root}: {_how_to_prepare(dataset, root)}"
        )
    prepare(dataset, data_dir)
    return tfds.builder(dataset, data_dir=data_dir)


def _check_names(dataset: str, names: list[str]) -> None:
    label_key, run_names = RUN_LABELS[dataset]
    if names != [str(i) for i in range(len(names))] and names != list(run_names):
        raise DataError(
            f"tfds {dataset} names its {label_key} classes {names[:3]}..., not "
            f"{list(run_names[:3])}...; prepare it again with this version of tfds"
        )


def _decode_png(data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image, dtype=np.uint8).reshape(shape)


class SplitRecords:
    """A tfds split in host memory: every label, and images decoded when first asked for (then
    kept), so one run decodes only its normal class of the training split."""

    def __init__(self, labels: np.ndarray, images: np.ndarray, encoded: list[bytes] | None = None):
        self.labels = labels
        self._images = images
        self._encoded = encoded
        self._decoded = np.full(len(labels), encoded is None)

    def __len__(self) -> int:
        return len(self.labels)

    def images(self, indices: np.ndarray) -> np.ndarray:
        """uint8 ``[len(indices), h, w, c]`` (a copy)."""
        indices = np.asarray(indices, np.int64)
        missing = np.unique(indices[~self._decoded[indices]])
        if len(missing):
            decode = functools.partial(_decode_png, shape=self._images.shape[1:])
            with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
                decoded = pool.map(decode, [self._encoded[i] for i in missing], chunksize=256)
                self._images[missing] = np.stack(list(decoded))
            self._decoded[missing] = True
        return self._images[indices]


def _read_array_record(builder, split: str, label_key: str) -> SplitRecords:
    """Reads the split's array_record files directly: each record is a tf.train.Example proto
    (tfds's serialisation) holding a PNG; ~20x faster than tfds's per-example decoding."""
    from array_record.python.array_record_data_source import ArrayRecordDataSource
    from tensorflow_datasets.proto import tf_example_pb2

    records = ArrayRecordDataSource([os.fspath(p) for p in builder.info.splits[split].filepaths])
    encoded, labels = [], np.empty(len(records), np.int32)
    for start in range(0, len(records), 8192):
        chunk = records.__getitems__(range(start, min(start + 8192, len(records))))
        for offset, record in enumerate(chunk):
            feature = tf_example_pb2.Example.FromString(record).features.feature
            encoded.append(feature["image"].bytes_list.value[0])
            labels[start + offset] = feature[label_key].int64_list.value[0]
    images = np.empty((len(records), *builder.info.features["image"].shape), np.uint8)
    return SplitRecords(labels, images, encoded)


def _read_data_source(dataset: str, split: str, data_dir: str | None, label_key: str):
    """Reads via the public ``tfds.data_source``, one example at a time (all the mock offers)."""
    import tensorflow_datasets as tfds

    source = tfds.data_source(dataset, split=split, data_dir=data_dir, download=False)
    _check_names(dataset, list(source.dataset_info.features[label_key].names))
    examples = [source[index] for index in range(len(source))]
    images = np.stack([example["image"] for example in examples]).astype(np.uint8)
    return SplitRecords(np.array([example[label_key] for example in examples], np.int32), images)


@functools.lru_cache(maxsize=2)
def read_split(
    dataset: str, split: str, data_dir: str | None = None, download: bool = True
) -> SplitRecords:
    """A tfds split (labels of the run's label feature), in the order of tfds's records.

    Cached per process, so the runs of one dataset read the split once and decode each image once.
    """
    label_key = RUN_LABELS[dataset][0]
    builder = _prepared_builder(dataset, data_dir, download)
    if builder is None:
        return _read_data_source(dataset, split, data_dir, label_key)
    _check_names(dataset, list(builder.info.features[label_key].names))
    return _read_array_record(builder, split, label_key)


def load_split(data_config, name: str) -> Split:
    """The one-class run ``name`` (a class name of ``list_runs(data_config.name)``)."""
    dataset = data_config.name
    class_names = list_runs(dataset)
    normal_class = class_names.index(name)
    data_dir = data_config.get("data_dir", "") or None
    download = bool(data_config.get("download", True))
    train = read_split(dataset, "train", data_dir, download=download)
    test = read_split(dataset, "test", data_dir, download=download)
    normal = np.flatnonzero(train.labels == normal_class)
    if len(normal) == 0:
        raise DataError(f"tfds {dataset} has no training images of class {name!r}")
    return one_class_split(
        name,
        normal_images=train.images(normal),
        test_images=test.images(np.arange(len(test))),
        test_labels=(test.labels != normal_class).astype(np.int32),
        test_classes=test.labels,
        test_class_names=class_names,
        holdout_fraction=data_config.holdout_fraction,
    )


# --- Preparation without TensorFlow -------------------------------------------------------------


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="png")
    return buffer.getvalue()


def _cifar_examples(label_keys, split_prefix, filepaths):
    """tfds ``Cifar10._generate_examples`` (same keys, ids and records), images as PNG bytes."""
    index = 0
    for path in filepaths:
        rows = np.fromfile(os.fspath(path), dtype=np.uint8).reshape(-1, len(label_keys) + 3072)
        for row in rows:
            image = row[len(label_keys) :].reshape(3, 32, 32).transpose(1, 2, 0)
            record = dict(zip(label_keys, row[: len(label_keys)].tolist(), strict=True))
            record.update(id=f"{split_prefix}{index:05d}", image=_png(image))
            yield index, record
            index += 1


def _mnist_examples(num_examples, data_path, label_path):
    """tfds ``MNIST._generate_examples`` (same keys and records), images as PNG bytes."""
    with open(data_path, "rb") as f:
        f.read(16)  # idx header
        images = np.frombuffer(f.read(28 * 28 * num_examples), np.uint8).reshape(-1, 28, 28)
    with open(label_path, "rb") as f:
        f.read(8)  # idx header
        labels = np.frombuffer(f.read(num_examples), np.uint8)
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        yield index, {"image": _png(image), "label": int(label)}


def _tf_free_builder_class(dataset: str):
    """tfds's builder for ``dataset`` with the TensorFlow-only steps replaced (not registered)."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.image_classification import cifar, mnist

    base = {"cifar10": cifar.Cifar10, "cifar100": cifar.Cifar100,
            "fashion_mnist": mnist.FashionMNIST}[dataset]  # fmt: skip
    with tfds.core.registered.skip_registration():
        if dataset.startswith("cifar"):

            class Builder(base):
                name = dataset
                __module__ = base.__module__  # tfds finds the URL checksums beside its code

                def _generate_examples(self, split_prefix, filepaths):
                    return _cifar_examples(self._cifar_info.label_keys, split_prefix, filepaths)

        else:

            class Builder(base):
                name = dataset
                __module__ = base.__module__  # tfds finds the URL checksums beside its code

                def _generate_examples(self, num_examples, data_path, label_path):
                    return _mnist_examples(num_examples, data_path, label_path)

    return Builder


# Where the builders download from (tfds's cifar.py and mnist.py), probed before downloading.
DOWNLOAD_HOSTS = {
    "cifar10": ("www.cs.toronto.edu", 443),
    "cifar100": ("www.cs.toronto.edu", 443),
    "fashion_mnist": ("fashion-mnist.s3-website.eu-central-1.amazonaws.com", 80),
}


def _check_reachable(dataset: str, data_dir: str) -> None:
    """Fails at once offline (tfds's own downloader retries for minutes before it gives up)."""
    host, port = DOWNLOAD_HOSTS[dataset]
    try:
        socket.create_connection((host, port), timeout=10).close()
    except OSError as error:
        raise DataError(
            f"tfds dataset {dataset} is not prepared and {host} cannot be reached ({error}); "
            f"{_how_to_prepare(dataset, data_dir)}"
        ) from None


def prepare(dataset: str, data_dir: str | None = None) -> str:
    """Downloads and prepares ``dataset`` as array_record in ``data_dir``; returns its folder."""
    import tensorflow_datasets as tfds

    builder = _tf_free_builder_class(dataset)(data_dir=data_dir, file_format="array_record")
    _check_reachable(dataset, str(builder.data_dir_root))
    try:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False)
        )
    except Exception as error:
        raise DataError(
            f"could not download and prepare tfds {dataset} ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); "
            f"{_how_to_prepare(dataset, str(builder.data_dir_root))}"
        ) from None
    return builder.data_dir


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Prepare tfds datasets without TensorFlow.")
    parser.add_argument("datasets", nargs="+", choices=sorted(RUN_LABELS))
    parser.add_argument(
        "--data_dir", default=None, help="tfds data_dir (default ~/tensorflow_datasets)"
    )
    args = parser.parse_args()
    for name in args.datasets:
        try:
            print(f"{name}: prepared in {prepare(name, args.data_dir)}")
        except DataError as error:
            sys.exit(f"error: {error}")
