"""MVTec AD / image-folder loading: labels, masks, formats, and one clear error per bad input."""

import shutil

import numpy as np
import pytest
from fixtures import default_data_config, defect_square, make_mvtec_folder
from PIL import Image

from fcd_jax import input_pipeline
from fcd_jax.datasets import folders
from fcd_jax.errors import DataError


def mvtec_config(root, **overrides):
    fields = dict(name="mvtec", root=str(root), image_size=32, holdout_fraction=0.0)
    return default_data_config(**{**fields, **overrides})


@pytest.fixture
def mvtec_root(tmp_path):
    return make_mvtec_folder(tmp_path / "mvtec", categories=("bottle", "grid"), seed=3)


def assert_one_line(error: pytest.ExceptionInfo, *needles: str):
    message = str(error.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message


def test_mvtec_labels_masks_and_paths(mvtec_root):
    split = input_pipeline.load_split(mvtec_config(mvtec_root), "bottle")
    assert split.test_class_names == ["good", "broken", "contamination"]
    assert len(split.train_images) == 6 and len(split.holdout_images) == 0
    assert split.test_images.image_shape == (32, 32, 3)
    np.testing.assert_array_equal(split.test_classes, [0, 0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(split.test_labels, [0, 0, 0, 1, 1, 1, 1])
    assert split.skipped == []
    masks, images = split.test_masks.images, split.test_images.images
    assert masks.shape == (7, 32, 32) and set(np.unique(masks)) == {0, 1}
    assert not masks[split.test_labels == 0].any()
    for i in np.flatnonzero(split.test_labels):  # the fixture's defect: a white square = its mask
        assert masks[i].sum() == 8 * 8
        assert (images[i][masks[i] == 1] == 255).all() and (images[i][masks[i] == 0] < 200).all()
        mask_file = (
            split.test_paths[i].replace("/test/", "/ground_truth/").replace(".png", "_mask.png")
        )
        np.testing.assert_array_equal(masks[i], np.asarray(Image.open(mask_file)) > 0)


def test_mvtec_images_match_files_and_are_resized(mvtec_root):
    split = input_pipeline.load_split(mvtec_config(mvtec_root, image_size=16), "grid")
    first = np.asarray(Image.open(split.test_paths[0]).resize((16, 16), Image.BILINEAR))
    np.testing.assert_array_equal(split.test_images[0], first)
    assert split.test_masks.images.shape[1:] == (16, 16)


def test_holdout_takes_a_share_of_train(mvtec_root):
    split = input_pipeline.load_split(mvtec_config(mvtec_root, holdout_fraction=0.34), "bottle")
    assert (len(split.train_images), len(split.holdout_images)) == (4, 2)
    together = np.concatenate([split.train_images.images, split.holdout_images.images])
    assert len(np.unique(together.reshape(6, -1), axis=0)) == 6


def test_mvtec_list_splits_in_paper_order_and_category_filter(mvtec_root):
    assert input_pipeline.list_splits(mvtec_config(mvtec_root))[:3] == [
        "bottle",
        "hazelnut",
        "capsule",
    ]
    assert len(input_pipeline.list_splits(mvtec_config(mvtec_root))) == 15
    assert input_pipeline.list_splits(mvtec_config(mvtec_root, category="grid,bottle")) == [
        "grid",
        "bottle",
    ]
    with pytest.raises(DataError) as error:
        input_pipeline.list_splits(mvtec_config(mvtec_root, category="bottel"))
    assert_one_line(error, "unknown MVTec AD category 'bottel'", "bottle, hazelnut")


def test_folder_with_any_defect_names_and_no_masks(tmp_path):
    root = make_mvtec_folder(
        tmp_path / "mine", categories=("widget",), defects=("dent",), masks=False
    )
    config = default_data_config(name="folder", root=str(root), image_size=32)
    assert input_pipeline.list_splits(config) == ["widget"]
    split = input_pipeline.load_split(config, "widget")
    assert split.test_class_names == ["good", "dent"] and split.test_masks is None
    # A root that is itself one category folder.
    config.root = str(root / "widget")
    assert input_pipeline.list_splits(config) == ["widget"]
    assert len(input_pipeline.load_split(config, "widget").test_images) == 5


def test_gray_rgba_16bit_and_other_formats_load_as_rgb(tmp_path):
    root = make_mvtec_folder(tmp_path / "f", n_train=1, defects=(), n_test_good=1, masks=False)
    train = root / "bottle/train/good"
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (20, 20), dtype=np.uint8)
    Image.fromarray(gray).save(train / "gray.bmp")
    rgba = rng.integers(0, 256, (20, 20, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(train / "rgba.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(train / "deep.tif")
    smooth = np.linspace(0, 255, 20 * 20 * 3).reshape(20, 20, 3).astype(np.uint8)
    Image.fromarray(smooth).save(train / "photo.JPEG", quality=95)
    split = folders.load_folder_split(root / "bottle", "bottle", image_size=20)
    images = (
        split.train_images.images
    )  # sorted: 000.png(32px), deep.tif, gray.bmp, photo.JPEG, rgba.png
    assert images.shape == (5, 20, 20, 3)
    np.testing.assert_array_equal(images[1], np.repeat(gray[..., None], 3, -1))
    np.testing.assert_array_equal(images[2], np.repeat(gray[..., None], 3, -1))
    np.testing.assert_array_equal(images[4], rgba[..., :3])
    assert np.abs(images[3].astype(int) - smooth).mean() < 3  # lossy JPEG


def test_missing_folder(tmp_path, mvtec_root):
    with pytest.raises(DataError) as error:
        input_pipeline.load_split(mvtec_config(mvtec_root), "capsule")
    assert_one_line(error, "missing folder", str(mvtec_root / "capsule"))
    shutil.rmtree(mvtec_root / "bottle/test")
    with pytest.raises(DataError) as error:
        input_pipeline.load_split(mvtec_config(mvtec_root), "bottle")
    assert_one_line(error, "missing folder", str(mvtec_root / "bottle/test"))


def test_empty_train_set(mvtec_root):
    for path in (mvtec_root / "bottle/train/good").iterdir():
        path.unlink()
    with pytest.raises(DataError) as error:
        input_pipeline.load_split(mvtec_config(mvtec_root), "bottle")
    assert_one_line(error, "empty training set", str(mvtec_root / "bottle/train/good"))


def test_unreadable_image(mvtec_root):
    bad = mvtec_root / "bottle/test/broken/001.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(DataError) as error:
        input_pipeline.load_split(mvtec_config(mvtec_root), "bottle")
    assert_one_line(error, "cannot read image", str(bad), "skip_bad_images")


def test_truncated_image(mvtec_root):
    bad = mvtec_root / "bottle/train/good/002.png"
    bad.write_bytes(bad.read_bytes()[:-40])
    with pytest.raises(DataError) as error:
        input_pipeline.load_split(mvtec_config(mvtec_root), "bottle")
    assert_one_line(error, "cannot read image", str(bad))


def test_mask_size_differs_from_image(mvtec_root):
    bad = mvtec_root / "bottle/ground_truth/contamination/000_mask.png"
    Image.fromarray(np.zeros((16, 32), np.uint8)).save(bad)
    with pytest.raises(DataError) as error:
        input_pipeline.load_split(mvtec_config(mvtec_root), "bottle")
    assert_one_line(error, str(bad), "32x16", "32x32")


def test_missing_mask(mvtec_root):
    (mvtec_root / "bottle/ground_truth/broken/001_mask.png").unlink()
    with pytest.raises(DataError) as error:
        input_pipeline.load_split(mvtec_config(mvtec_root), "bottle")
    assert_one_line(error, "missing mask", "001_mask.png")


def test_skip_bad_images_reports_what_was_skipped(mvtec_root):
    (mvtec_root / "bottle/train/good/000.png").write_bytes(b"garbage")
    (mvtec_root / "bottle/test/broken/000.png").write_bytes(b"garbage")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(
        mvtec_root / "bottle/ground_truth/contamination/001_mask.png"
    )
    split = input_pipeline.load_split(mvtec_config(mvtec_root, skip_bad_images=True), "bottle")
    assert sorted(split.skipped) == sorted(
        str(mvtec_root / p)
        for p in (
            "bottle/train/good/000.png",
            "bottle/test/broken/000.png",
            "bottle/test/contamination/001.png",
        )
    )
    assert len(split.train_images) == 5 and len(split.test_images) == 5
    assert len(split.test_masks) == 5 and len(split.test_paths) == 5
    np.testing.assert_array_equal(split.test_classes, [0, 0, 0, 1, 2])
    assert split.test_masks.images[3].sum() == 64  # masks stay aligned with their images


def test_fixture_is_deterministic(tmp_path):
    a = make_mvtec_folder(tmp_path / "a", seed=5)
    b = make_mvtec_folder(tmp_path / "b", seed=5)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert files and all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    rows, cols = defect_square(np.random.default_rng(0), 32)
    assert rows.stop - rows.start == cols.stop - cols.start == 8
