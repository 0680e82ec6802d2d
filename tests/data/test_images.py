"""Reading image files: modes, missing/corrupt files, the annotated size, decompression bombs
and EXIF orientation."""

from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from coco_files import base_coco, single_image_dataset, tiny_dataset, write_dataset
from PIL import Image

from structkd.data import CocoDetection


def test_missing_image_file(tmp_path: Path) -> None:
    ds = tiny_dataset(tmp_path)
    (tmp_path / "im2.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"im2\.png \(image id 2\) does not exist"):
        ds[1]


def test_corrupt_image_file(tmp_path: Path) -> None:
    ds = tiny_dataset(tmp_path)
    (tmp_path / "im5.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(ValueError, match=r"im5\.png \(image id 5\)"):
        ds[2]


def test_image_size_mismatch(tmp_path: Path) -> None:
    ds = tiny_dataset(tmp_path)
    Image.new("RGB", (30, 10)).save(tmp_path / "im1.png")
    with pytest.raises(ValueError, match=r"im1\.png \(image id 1\) has size 30x10.*says 20x10"):
        ds[0]


def _expect_rgb(image: torch.Tensor, rgb: np.ndarray) -> None:
    assert image.dtype == torch.float32 and image.shape == (3, 4, 6)
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    expected = torch.as_tensor(rgb, dtype=torch.float32).permute(2, 0, 1)
    torch.testing.assert_close(image.as_subclass(torch.Tensor), expected, atol=1e-6, rtol=0)


def test_grayscale_image(tmp_path: Path) -> None:
    gray = np.arange(24, dtype=np.uint8).reshape(4, 6) * 10
    ds = single_image_dataset(tmp_path, Image.fromarray(gray, mode="L"), "g.png")
    _expect_rgb(ds[0][0], np.repeat(gray[:, :, None], 3, axis=2) / 255.0)


def test_rgba_image_drops_alpha(tmp_path: Path) -> None:
    rgba = np.zeros((4, 6, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2] = 200, 100, 50
    rgba[..., 3] = 0  # fully transparent: the colour must survive, not turn black
    ds = single_image_dataset(tmp_path, Image.fromarray(rgba, mode="RGBA"), "a.png")
    _expect_rgb(ds[0][0], rgba[..., :3] / 255.0)


def test_palette_image(tmp_path: Path) -> None:
    idx = (np.arange(24).reshape(4, 6) % 3).astype(np.uint8)
    img = Image.fromarray(idx, mode="P")
    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255]
    img.putpalette(palette + [0] * (768 - len(palette)))
    ds = single_image_dataset(tmp_path, img, "p.png")
    lut = np.array(palette, dtype=np.float64).reshape(3, 3) / 255.0
    _expect_rgb(ds[0][0], lut[idx])


def test_sixteen_bit_image(tmp_path: Path) -> None:
    values = np.linspace(0, 65535, 24).astype(np.uint16).reshape(4, 6)
    img = Image.fromarray(values)
    assert img.mode == "I;16"
    ds = single_image_dataset(tmp_path, img, "s16.png")
    loaded = ds[0][0]
    _expect_rgb(loaded, np.repeat(values[:, :, None], 3, axis=2) / 65535.0)
    assert float(loaded.max()) == 1.0 and float(loaded[0, 2, 0]) < 1.0  # not clipped at 255


def test_int32_mode_image(tmp_path: Path) -> None:
    values = np.linspace(0, 65535, 24).astype(np.int32).reshape(4, 6)
    img = Image.fromarray(values, mode="I")
    ds = single_image_dataset(tmp_path, img, "i32.tif")
    _expect_rgb(ds[0][0], np.repeat(values[:, :, None], 3, axis=2) / 65535.0)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (its pixel data is a stub)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00"))
        + chunk(b"IEND", b"")
    )


# --------------------------------------------------------------------------- decompression bombs


@pytest.fixture
def pil_limit(monkeypatch):
    """Restore PIL's MAX_IMAGE_PIXELS (STRUCTKD_MAX_IMAGE_PIXELS lifts it process-wide)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    monkeypatch.delenv("STRUCTKD_MAX_IMAGE_PIXELS", raising=False)
    return monkeypatch


def _bomb_dataset(tmp_path: Path) -> CocoDetection:
    (tmp_path / "huge.png").write_bytes(_png_header_only(20000, 20000))
    coco = {
        "images": [{"id": 4, "file_name": "huge.png", "width": 20000, "height": 20000}],
        "annotations": [],
        "categories": [{"id": 1, "name": "thing"}],
    }
    return CocoDetection(write_dataset(tmp_path, coco, images=False), tmp_path)


def test_decompression_bomb_names_file_and_limit(tmp_path: Path, pil_limit) -> None:
    ds = _bomb_dataset(tmp_path)
    expected = (
        r" has 400000000 pixels, more than PIL's limit of 178956970 against "
        r"decompression bombs; if the file is trusted, raise the limit with the environment "
        r"variable STRUCTKD_MAX_IMAGE_PIXELS=<pixels> \(0 = no limit\)"
    )
    with pytest.raises(ValueError, match=r"image id 4 \(.*huge\.png\)" + expected):
        ds.check_images()
    with pytest.raises(ValueError, match=r"huge\.png \(image id 4\)" + expected):
        ds.load_image(0)


def test_max_image_pixels_env(tmp_path: Path, pil_limit) -> None:
    ds = _bomb_dataset(tmp_path)
    pil_limit.setenv("STRUCTKD_MAX_IMAGE_PIXELS", "0")
    ds.check_images()  # no limit: the 20000x20000 header passes
    tiny = CocoDetection(write_dataset(tmp_path / "t", base_coco()), tmp_path / "t")
    pil_limit.setenv("STRUCTKD_MAX_IMAGE_PIXELS", "100")
    with pytest.raises(
        ValueError,
        match=r"has 20x10 = 200 pixels, more than the limit "
        r"STRUCTKD_MAX_IMAGE_PIXELS=100",
    ):
        tiny[0]
    pil_limit.setenv("STRUCTKD_MAX_IMAGE_PIXELS", "many")
    with pytest.raises(ValueError, match=r"STRUCTKD_MAX_IMAGE_PIXELS='many': expected a whole"):
        tiny.check_images()


# --------------------------------------------------------------------------- EXIF orientation


def _oriented_png(path: Path, orientation: int) -> Image.Image:
    """A 6x4 (WxH) PNG with distinct pixels and an EXIF orientation; returns the stored image."""
    pixels = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3) * 3
    img = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, exif=exif)
    return img


def _oriented_dataset(tmp_path: Path, orientation: int, size: tuple[int, int], **kw):
    _oriented_png(tmp_path / "o.png", orientation)
    coco = {
        "images": [{"id": 1, "file_name": "o.png", "width": size[0], "height": size[1]}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 5]}],
        "categories": [{"id": 1, "name": "thing"}],
    }
    return CocoDetection(write_dataset(tmp_path, coco, images=False), tmp_path, **kw)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int, caplog) -> None:
    """Pixels as ``ImageOps.exif_transpose`` shows them; annotated size = the displayed size."""
    from PIL import ImageOps

    displayed = (4, 6) if orientation in (6, 8) else (6, 4)
    ds = _oriented_dataset(tmp_path, orientation, displayed)
    with caplog.at_level(logging.INFO, logger="structkd.data"):
        ds.check_images()
    assert any(
        "1 images carry an EXIF orientation; applied" in r.getMessage() for r in caplog.records
    )
    image, target = ds[0]
    with Image.open(tmp_path / "o.png") as stored:
        expected = np.asarray(ImageOps.exif_transpose(stored).convert("RGB"))
    assert image.shape == (3, displayed[1], displayed[0])
    assert tuple(target["boxes"].canvas_size) == (displayed[1], displayed[0])
    torch.testing.assert_close(
        image.as_subclass(torch.Tensor),
        torch.from_numpy(expected.copy()).permute(2, 0, 1).float() / 255,
    )


def test_exif_size_mismatch_says_orientation_and_what_to_do(tmp_path: Path) -> None:
    """Annotated with the stored size of a file whose EXIF says rotate 90°: both the start-up
    check and the loader say that orientation is applied and what the annotation matches."""
    ds = _oriented_dataset(tmp_path, 6, (6, 4))
    pattern = (
        r"has size 4x6 \(WxH\) once its EXIF orientation 6 \(rotated 90° clockwise\) is applied "
        r"\(stored pixels 6x4\), but the annotation file says 6x4; structkd applies EXIF "
        r"orientation.*matches the stored pixels.*remove the EXIF Orientation tag"
    )
    with pytest.raises(ValueError, match=r"o\.png\) " + pattern):
        ds.check_images()
    with pytest.raises(ValueError, match=r"o\.png \(image id 1\) " + pattern):
        ds[0]


def test_exif_orientation_can_be_ignored(tmp_path: Path) -> None:
    ds = _oriented_dataset(tmp_path, 6, (6, 4), apply_exif=False)
    ds.check_images()
    image, _ = ds[0]
    stored = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3) * 3
    torch.testing.assert_close(
        image.as_subclass(torch.Tensor), torch.from_numpy(stored).permute(2, 0, 1).float() / 255
    )


# What each EXIF orientation asks for (TIFF/EXIF 2.3 tag 0x0112), written out with numpy on a
# (H, W, 3) array: the image as displayed.
DISPLAYED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored
    3: lambda a: a[::-1, ::-1],  # rotated 180°
    4: lambda a: a[::-1],  # flipped vertically
    5: lambda a: a.transpose(1, 0, 2),  # transposed
    6: lambda a: np.rot90(a, -1),  # rotated 90° clockwise
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # transversed
    8: lambda a: np.rot90(a, 1),  # rotated 90° counter-clockwise
}


@pytest.mark.parametrize("orientation", sorted(DISPLAYED))
def test_load_image_applies_every_exif_orientation(tmp_path: Path, orientation: int) -> None:
    """load_image shows each orientation as its definition says, checked against the displayed
    size; with apply_exif=False the stored pixels come back and the stored size is expected."""
    from structkd.data.coco import load_image

    path = tmp_path / "o.png"
    stored = np.array(_oriented_png(path, orientation))
    shown = np.ascontiguousarray(DISPLAYED[orientation](stored))
    size = (shown.shape[1], shown.shape[0])
    image = load_image(path, 1, size)
    assert image.shape == (3, shown.shape[0], shown.shape[1])
    assert torch.equal((image * 255).round().byte(), torch.from_numpy(shown).permute(2, 0, 1))
    raw = load_image(path, 1, (6, 4), apply_exif=False)
    assert torch.equal((raw * 255).round().byte(), torch.from_numpy(stored).permute(2, 0, 1))
    if orientation in (5, 6, 7, 8):
        with pytest.raises(ValueError, match=rf"EXIF orientation {orientation} \("):
            load_image(path, 1, (6, 4))
        with pytest.raises(ValueError, match=rf"orientation {orientation} is not applied"):
            load_image(path, 1, (4, 6), apply_exif=False)


def test_a_fifo_named_like_an_image_is_a_listed_problem_not_a_hang(tmp_path: Path) -> None:
    """A FIFO in place of an annotated image would block ``Image.open`` forever: the header
    check lists it (with the count of unusable files) and loading names it, at once."""
    import os

    ds = tiny_dataset(tmp_path)
    (tmp_path / "im2.png").unlink()
    os.mkfifo(tmp_path / "im2.png")
    with pytest.raises(ValueError, match=r"1 of \d+ image files cannot be used: image id 2 "
                                         r"\(.*im2\.png\) is a FIFO, not a regular image file"):
        ds.check_images(progress=False)
    with pytest.raises(ValueError, match=r"im2\.png \(image id 2\) is a FIFO"):
        ds[1]
