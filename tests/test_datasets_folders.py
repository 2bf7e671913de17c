"""MVTec AD / image-folder loading: labels, masks, formats, and one clear error per bad input."""

import os
import shutil
from pathlib import Path

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
    shutil.rmtree(mvtec_root / "bottle/train/good")
    with pytest.raises(DataError) as error:
        input_pipeline.load_split(mvtec_config(mvtec_root), "bottle")
    assert_one_line(error, "missing folder", str(mvtec_root / "bottle/train/good"))


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


# --- Legitimate odd layouts: no defect images, hidden entries, "." and ".." roots ---------------


def folder_config(root, **overrides):
    fields = dict(name="folder", root=str(root), image_size=32, holdout_fraction=0.34)
    return default_data_config(**{**fields, **overrides})


def assert_empty_test_set(split, n_train=6):
    assert (len(split.train_images), len(split.holdout_images)) == (n_train - 2, 2)
    assert split.test_images.images.shape == (0, 32, 32, 3)
    assert split.test_labels.shape == split.test_classes.shape == (0,)
    assert split.test_labels.dtype == split.test_classes.dtype == np.int32
    assert split.test_class_names == ["good"] and split.test_paths == []
    assert split.auroc_undefined_reason == "no test images"


def test_train_good_only_gives_an_empty_test_set(tmp_path):
    root = make_mvtec_folder(tmp_path / "parts", categories=("widget",), defects=(), masks=False)
    shutil.rmtree(root / "widget/test")
    split = input_pipeline.load_split(folder_config(root), "widget")
    assert_empty_test_set(split)
    assert split.test_masks is None
    (root / "widget/test").mkdir()  # an empty test/ folder: the same
    (root / "widget/ground_truth").mkdir()  # with an empty ground_truth/: empty masks
    split = input_pipeline.load_split(folder_config(root), "widget")
    assert_empty_test_set(split)
    assert split.test_masks.images.shape == (0, 32, 32)


def test_normal_test_images_only(mvtec_root):
    for defect in ("broken", "contamination"):
        shutil.rmtree(mvtec_root / "bottle/test" / defect)
        shutil.rmtree(mvtec_root / "bottle/ground_truth" / defect)
    split = input_pipeline.load_split(mvtec_config(mvtec_root), "bottle")
    assert split.test_class_names == ["good"] and len(split.test_images) == 3
    np.testing.assert_array_equal(split.test_labels, [0, 0, 0])
    assert split.test_masks.images.shape == (3, 32, 32) and not split.test_masks.images.any()
    assert split.auroc_undefined_reason == "no anomalous test images"
    full = make_mvtec_folder(mvtec_root.parent / "full")
    assert input_pipeline.load_split(mvtec_config(full), "bottle").auroc_undefined_reason is None


def test_images_outside_their_class_folders(mvtec_root):
    shutil.copy(mvtec_root / "bottle/test/good/000.png", mvtec_root / "bottle/test/stray.png")
    with pytest.raises(DataError) as error:
        input_pipeline.load_split(mvtec_config(mvtec_root), "bottle")
    assert_one_line(error, "1 image(s) directly in", "stray.png", "test/good", "<defect name>")
    (mvtec_root / "grid/train/good").rename(mvtec_root / "grid/train/flat")
    for path in (mvtec_root / "grid/train/flat").iterdir():
        path.rename(mvtec_root / "grid/train" / path.name)
    with pytest.raises(DataError) as error:
        input_pipeline.load_split(mvtec_config(mvtec_root), "grid")
    assert_one_line(error, "must be in", "grid/train/good", "not directly in", "move them")


def test_empty_train_set_names_the_other_file_types(mvtec_root):
    train = mvtec_root / "bottle/train/good"
    for path in train.iterdir():
        path.rename(path.with_suffix(".webp"))
    with pytest.raises(DataError) as error:
        input_pipeline.load_split(mvtec_config(mvtec_root), "bottle")
    assert_one_line(error, "empty training set", "6 file(s) of other types: .webp")


def test_hidden_entries_are_never_classes_categories_or_images(tmp_path):
    root = make_mvtec_folder(tmp_path / "parts", categories=("widget",), defects=("dent",))
    category = root / "widget"
    for hidden in (category / "test/.ipynb_checkpoints", root / ".ipynb_checkpoints/train/good"):
        hidden.mkdir(parents=True)
        shutil.copy(category / "test/good/000.png", hidden / "000-checkpoint.png")
    for folder in ("train/good", "test/good", "test/dent"):
        (category / folder / "._000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
        (category / folder / ".DS_Store").write_bytes(b"Bud1")
    config = folder_config(root, holdout_fraction=0.0)
    assert input_pipeline.list_splits(config) == ["widget"]
    split = input_pipeline.load_split(config, "widget")
    assert split.test_class_names == ["good", "dent"] and split.skipped == []
    assert (len(split.train_images), len(split.test_images)) == (6, 5)


def test_root_given_as_dot_or_dotdot_is_named_after_its_folder(tmp_path, monkeypatch):
    root = make_mvtec_folder(tmp_path / "parts", categories=("widget",), defects=("dent",))
    for cwd, given in ((root / "widget", "."), (root / "widget/train", ".."),
                       (root, "."), (root / "widget", ".."), (root, str(root) + "/")):  # fmt: skip
        monkeypatch.chdir(cwd)
        config = folder_config(given)
        assert input_pipeline.list_splits(config) == ["widget"], (cwd, given)
        assert len(input_pipeline.load_split(config, "widget").test_images) == 5
    assert folders.resolved_root("~") == folders.resolved_root(str(folders.Path.home()))


def test_dangling_symlink_is_reported_or_skipped(mvtec_root):
    link = mvtec_root / "bottle/train/good/zzz.png"
    link.symlink_to(mvtec_root / "nowhere.png")
    with pytest.raises(DataError) as error:
        input_pipeline.load_split(mvtec_config(mvtec_root), "bottle")
    assert_one_line(error, str(link), "symlink to", "nowhere.png", "does not exist")
    split = input_pipeline.load_split(mvtec_config(mvtec_root, skip_bad_images=True), "bottle")
    assert split.skipped == [str(link)] and len(split.train_images) == 6


def test_non_utf8_file_names(mvtec_root):
    raw = os.fsencode(mvtec_root / "bottle")
    for folder, source in ((b"/train/good/", b"/train/good/000.png"),
                           (b"/test/broken/", b"/test/broken/000.png")):  # fmt: skip
        os.rename(raw + source, raw + folder + b"caf\xe9.png")
    os.rename(raw + b"/ground_truth/broken/000_mask.png",
              raw + b"/ground_truth/broken/caf\xe9_mask.png")  # fmt: skip
    split = input_pipeline.load_split(mvtec_config(mvtec_root), "bottle")
    assert len(split.train_images) == 6 and len(split.test_images) == 7
    assert os.fsencode(split.test_paths[4]) == raw + b"/test/broken/caf\xe9.png"
    assert split.test_masks.images[4].sum() == 64  # sorted after 001.png
    Path(os.fsdecode(raw + b"/train/good/caf\xe9.png")).write_bytes(b"not an image")
    with pytest.raises(DataError) as error:
        input_pipeline.load_split(mvtec_config(mvtec_root), "bottle")
    assert_one_line(error, "train/good/caf\\xe9.png")
    str(error.value).encode("utf-8")  # printable: no lone surrogates left
    os.rename(raw, os.fsencode(mvtec_root) + b"/bottl\xe9")
    with pytest.raises(DataError) as error:
        input_pipeline.list_splits(folder_config(mvtec_root))
    assert_one_line(error, "bottl\\xe9", "not UTF-8", "rename the folder")
