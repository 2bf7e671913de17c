"""Reading single image and mask files: EXIF orientation, mask modes, listing, messages."""

import zlib

import numpy as np
import pytest
from PIL import Image

from fcd_jax.datasets import image_files
from fcd_jax.errors import DataError

ROTATE_CLOCKWISE = 6  # EXIF orientation: the viewer turns the stored pixels 90 degrees clockwise


def save_with_orientation(array: np.ndarray, path, orientation: int | None) -> None:
    image = Image.fromarray(array)
    exif = image.getexif()
    if orientation is not None:
        exif[image_files.EXIF_ORIENTATION] = orientation
    image.save(path, exif=exif)


def left_dark_right_bright(height: int = 16, width: int = 32) -> np.ndarray:
    array = np.full((height, width), 255, np.uint8)
    array[:, : width // 2] = 0
    return array


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_exif_orientation_is_applied_to_images(tmp_path, suffix):
    path = tmp_path / f"turned{suffix}"
    save_with_orientation(np.repeat(left_dark_right_bright()[..., None], 3, -1), path, 6)
    assert image_files.upright_size(path) == (16, 32)
    image = image_files.load_image(path, 32).mean(axis=-1)
    # Turned clockwise, the stored left (dark) half is the top half.
    assert image[:12].max() < 30 and image[20:].min() > 225
    plain = tmp_path / f"plain{suffix}"
    save_with_orientation(np.repeat(left_dark_right_bright()[..., None], 3, -1), plain, None)
    image = image_files.load_image(plain, 32).mean(axis=-1)
    assert image[:, :12].max() < 30 and image[:, 20:].min() > 225


def test_exif_orientation_is_applied_to_masks_and_their_size_check(tmp_path):
    image, mask = tmp_path / "image.png", tmp_path / "mask.png"
    save_with_orientation(np.zeros((16, 32, 3), np.uint8), image, ROTATE_CLOCKWISE)
    save_with_orientation(255 - left_dark_right_bright(), mask, ROTATE_CLOCKWISE)
    binary = image_files.load_mask(mask, image, 32)
    expected = np.zeros((32, 32), np.uint8)
    expected[:16] = 1  # the stored left (defect) half turned to the top
    np.testing.assert_array_equal(binary, expected)
    save_with_orientation(255 - left_dark_right_bright(), mask, None)  # stored 32 wide, 16 high
    with pytest.raises(DataError) as error:
        image_files.load_mask(mask, image, 32)
    message = str(error.value)
    assert "mask.png is 32x16" in message and "image.png is 16x32" in message


def test_mask_modes(tmp_path):
    image = tmp_path / "image.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(image)
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[0, 0, 2] = 1  # a faint blue pixel: converting to gray would round it to 0
    rgb[1, 1] = (255, 0, 0)
    rgba = np.dstack([np.full((4, 4, 3), 255, np.uint8), np.zeros((4, 4), np.uint8)])
    rgba[2, 3, 3] = 255  # white everywhere, opaque only here
    deep = np.zeros((4, 4), np.uint16)
    deep[3, 0] = 1000
    cases = {
        "rgb.png": (Image.fromarray(rgb), [(0, 0), (1, 1)]),
        "rgba.png": (Image.fromarray(rgba, "RGBA"), [(2, 3)]),
        "deep.png": (Image.fromarray(deep), [(3, 0)]),
        "bilevel.png": (Image.fromarray(np.eye(4, dtype=bool)), [(i, i) for i in range(4)]),
        "palette.png": (Image.fromarray(rgb).convert("P"), [(1, 1)]),
    }
    for name, (mask, defects) in cases.items():
        mask.save(tmp_path / name)
        expected = np.zeros((4, 4), np.uint8)
        expected[tuple(np.array(defects).T)] = 1
        np.testing.assert_array_equal(image_files.load_mask(tmp_path / name, image, 4), expected,
                                      err_msg=name)  # fmt: skip
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    with pytest.raises(DataError) as error:
        image_files.load_mask(tmp_path / "cmyk.jpg", image, 4)
    assert "CMYK" in str(error.value) and "gray or RGB PNGs" in str(error.value)


def test_listing_skips_hidden_and_other_files_and_keeps_dangling_links(tmp_path):
    for name in ("b.PNG", "a.jpg", "._a.jpg", ".hidden.png", "notes.txt", "c.webp"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "z.png").symlink_to(tmp_path / "missing.png")
    (tmp_path / "y.png").symlink_to(tmp_path / "a.jpg")
    names = [path.name for path in image_files.list_image_files(tmp_path)]
    assert names == ["a.jpg", "b.PNG", "y.png", "z.png"]
    note = image_files.other_files_note(tmp_path)
    assert note == " (it holds 2 file(s) of other types: .txt, .webp)"


def test_bad_file_messages_are_one_line(tmp_path):
    huge = tmp_path / "huge.png"  # a valid PNG header claiming 40000 x 40000 pixels
    Image.new("L", (1, 1)).save(huge)
    data = bytearray(huge.read_bytes())
    data[16:24] = (40000).to_bytes(4, "big") * 2
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    huge.write_bytes(bytes(data))
    for path in (huge, tmp_path / "empty.png", tmp_path / "text.png"):
        if path.name != "huge.png":
            path.write_bytes(b"" if path.name == "empty.png" else b"line one\nline two")
        with pytest.raises(DataError) as error:
            image_files.load_image(path, 8)
        assert "\n" not in str(error.value) and str(path) in str(error.value)
        assert "skip_bad_images" in str(error.value)
