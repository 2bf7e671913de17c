"""The offline ``digits`` and ``textures`` sets: contents, synthetic defects, determinism, speed."""

import time

import numpy as np
import pytest
from fixtures import default_data_config
from sklearn.datasets import load_digits

from fcd_jax import input_pipeline
from fcd_jax.datasets import embedded
from fcd_jax.errors import DataError

SMALL = embedded.TextureSpec(crop=32, n_train=5, n_test_good=3, n_test_per_defect=2, seed=0)


def test_digits_one_class_split():
    config = default_data_config(name="digits", holdout_fraction=0.1)
    assert input_pipeline.list_splits(config) == [str(d) for d in range(10)]
    split = input_pipeline.load_split(config, "7")
    digits = load_digits()
    scaled = np.round(digits.images * 255 / 16).astype(np.uint8)[..., None]
    n_sevens = int((digits.target == 7).sum())

    train = np.concatenate([split.train_images.images, split.holdout_images.images])
    assert train.shape[1:] == (8, 8, 1)
    sevens = {bytes(image) for image in scaled[digits.target == 7]}
    assert all(bytes(image) in sevens for image in train)
    n_test_normal = int((split.test_labels == 0).sum())
    assert n_test_normal == round(0.3 * n_sevens) and len(train) + n_test_normal == n_sevens
    assert not {bytes(i) for i in train} & {
        bytes(i) for i in split.test_images.images[split.test_labels == 0]
    }
    assert (split.test_labels == 1).sum() == (digits.target != 7).sum()
    np.testing.assert_array_equal(split.test_labels, split.test_classes != 7)
    again = input_pipeline.load_split(config, "7")
    np.testing.assert_array_equal(again.test_images.images, split.test_images.images)
    np.testing.assert_array_equal(again.train_images.images, split.train_images.images)


@pytest.mark.parametrize("kind", embedded.DEFECTS)
def test_each_defect_changes_exactly_its_mask(kind):
    rng = np.random.default_rng(1)
    image = np.full((64, 64), 128, np.uint8)
    other = rng.integers(0, 256, (64, 64), dtype=np.uint8)
    for trial in range(5):
        defective, mask = embedded.add_defect(image, kind, other, np.random.default_rng(trial))
        changed = defective != image
        assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
        assert not changed[mask == 0].any()  # nothing outside the mask changes
        assert changed[mask == 1].mean() > 0.9  # and (almost) all of it inside does
        assert 20 <= mask.sum() <= 0.2 * 64 * 64


def test_textures_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    start = time.perf_counter()
    a = embedded.build_textures(tmp_path / "a", SMALL)
    seconds = time.perf_counter() - start
    b = embedded.build_textures(tmp_path / "b", SMALL)
    c = embedded.build_textures(
        tmp_path / "c", embedded.TextureSpec(**{**SMALL.__dict__, "seed": 1})
    )
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 3 * (5 + 3 + 4 * 2 * 2) + 1  # images + masks per texture, and the spec
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert sum((a / f).read_bytes() != (c / f).read_bytes() for f in files) > len(files) // 2
    assert seconds < 10


def test_textures_load_through_the_folder_loader(tmp_path):
    config = default_data_config(
        name="textures", root=str(tmp_path / "tex"), image_size=32, holdout_fraction=0.2
    )
    config.textures = dict(SMALL.__dict__)
    assert input_pipeline.list_splits(config) == ["brick", "grass", "gravel"]
    split = input_pipeline.load_split(config, "grass")
    assert (len(split.train_images), len(split.holdout_images)) == (4, 1)
    assert split.test_class_names == ["good", "hole", "patch", "scratch", "stain"]
    np.testing.assert_array_equal(split.test_labels, [0, 0, 0] + [1] * 8)
    masks = split.test_masks.images
    assert not masks[:3].any() and all(m.sum() >= 5 for m in masks[3:])
    images = split.test_images.images
    assert images.shape == (11, 32, 32, 3) and (images[..., 0] == images[..., 2]).all()  # gray

    marker = tmp_path / "tex" / "textures_spec.json"
    built = marker.stat().st_mtime_ns
    input_pipeline.load_split(config, "brick")  # reuses the folder
    assert marker.stat().st_mtime_ns == built


def test_textures_refuse_a_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    config = default_data_config(name="textures", root=str(tmp_path / "mine"))
    with pytest.raises(DataError, match="not empty and holds no generated textures"):
        input_pipeline.load_split(config, "brick")
    config.root = str(tmp_path / "new")
    config.textures = {"crops": 3}
    with pytest.raises(DataError, match="unknown config.data.textures field"):
        input_pipeline.load_split(config, "brick")


def test_texture_spec_refuses_impossible_sizes(tmp_path):
    config = default_data_config(name="textures", root=str(tmp_path / "tex"))
    for textures, needle in (({"crop": embedded.MAX_CROP + 1}, "crop=193: use 1..192"),
                             ({"crop": 0}, "crop=0"), ({"n_train": 0}, "n_train=0: use at least 1"),
                             ({"n_test_good": -1}, "n_test_good=-1")):  # fmt: skip
        config.textures = textures
        with pytest.raises(DataError, match=needle):
            embedded.texture_spec(config)
    (tmp_path / "file").write_text("keep me")
    config.textures, config.root = {}, str(tmp_path / "file")
    with pytest.raises(DataError, match="is a file"):
        embedded.textures_root(config)
    assert (tmp_path / "file").read_text() == "keep me"
