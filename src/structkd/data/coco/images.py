"""Reading one image file: the decompression-bomb limit, EXIF orientation and the size check.

``load_image`` opens a file under the pixel limit, checks its size against the annotation (after
its EXIF orientation, applied with ``PIL.ImageOps.exif_transpose``) and returns a float32 RGB
tensor. The helpers that read headers only (``_open_image``, ``_exif_orientation``,
``_size_problem``) are shared with ``CocoDetection.check_images``.
"""

from __future__ import annotations

import os
import re
import stat
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")

#: Environment variable: the largest image, in pixels, that is opened (0: no limit). Unset, PIL's
#: decompression-bomb guard applies (it refuses images over 2 x ``PIL.Image.MAX_IMAGE_PIXELS``,
#: about 179 million pixels).
MAX_PIXELS_ENV = "STRUCTKD_MAX_IMAGE_PIXELS"
_RAISE_LIMIT_HINT = (
    f"if the file is trusted, raise the limit with the environment variable "
    f"{MAX_PIXELS_ENV}=<pixels> (0 = no limit)"
)

_EXIF_ORIENTATION_TAG = 0x0112
#: EXIF orientation -> what ``PIL.ImageOps.exif_transpose`` does to show the image as intended
#: (for the size-check message); 5-8 swap width and height. Orientation 1 (and any other value)
#: leaves the image as stored.
_EXIF_ORIENTATION_NAMES: dict[int, str] = {
    2: "mirrored",
    3: "rotated 180°",
    4: "flipped vertically",
    5: "transposed",
    6: "rotated 90° clockwise",
    7: "transversed",
    8: "rotated 90° counter-clockwise",
}


class ImageTooLarge(ValueError):
    """An image over the decompression-bomb limit (PIL's, or ``$STRUCTKD_MAX_IMAGE_PIXELS``)."""


class NotRegularFile(OSError):
    """A path that names a FIFO, a socket or a device instead of a file (opening a FIFO would
    block until something writes to it)."""


class _SizeMismatch(Exception):
    """Internal: the image does not have the annotated size (the message is final)."""


def _env_pixel_limit() -> int | None:
    """``$STRUCTKD_MAX_IMAGE_PIXELS`` as a number (0: no limit), None when unset."""
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return None
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(
            f"environment variable {MAX_PIXELS_ENV}={raw!r}: expected a whole number of pixels "
            "(0 for no limit)"
        )
    return value


def _pil_open() -> Any:
    """PIL's own ``Image.open``. Importing ultralytics (an optional detector family) replaces
    it process-wide with one that, for a file PIL cannot identify, tries to pip-install a HEIF
    plugin and raises that failure instead; structkd's checks read files with PIL's."""
    patches = sys.modules.get("ultralytics.utils.patches")
    original = getattr(patches, "_image_open", None)
    return original if callable(original) else Image.open


def _open_image(path: Path) -> Image.Image:
    """``Image.open`` (reads the header only) under the decompression-bomb limit.

    Raises :class:`ImageTooLarge` for an image over the limit, and whatever ``Image.open`` raises
    for a missing or unreadable file. PIL's ``DecompressionBombWarning`` (images between one and
    two times its limit, which it still opens) is left to the caller to filter.
    """
    limit = _env_pixel_limit()
    if limit is not None:
        Image.MAX_IMAGE_PIXELS = None  # structkd's limit (below) replaces PIL's guard
    mode = os.stat(path).st_mode  # FileNotFoundError as Image.open would raise it
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # a directory: PIL's own error
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a file")
        raise NotRegularFile(f"is {kind}, not a regular image file")
    try:
        img = _pil_open()(path)
    except Image.DecompressionBombError as e:
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        size = f"has {pixels[1]} pixels" if pixels else f"is too large ({e})"
        limit_pil = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else None
        raise ImageTooLarge(
            f"{size}, more than PIL's limit of {limit_pil} against decompression bombs"
        ) from None
    if limit:
        w, h = img.size
        if w * h > limit:
            img.close()
            raise ImageTooLarge(
                f"has {w}x{h} = {w * h} pixels, more than the limit {MAX_PIXELS_ENV}={limit}"
            )
    return img


def _exif_orientation(img: Image.Image) -> int:
    """The EXIF (or XMP) orientation of an opened image, 1 when it has none or an invalid one.

    Reads what the header holds (``Image.Image.getexif``: PNG's own ``getexif`` would decode the
    pixels to look for an eXIf chunk after them).
    """
    try:
        value = Image.Image.getexif(img).get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:  # a malformed EXIF block: PIL's exif_transpose would not rotate either
        return 1
    return value if isinstance(value, int) and value in _EXIF_ORIENTATION_NAMES else 1


def _size_problem(
    stored: tuple[int, int], orientation: int, expected: tuple[int, int], apply_exif: bool
) -> str | None:
    """Why an image of ``stored`` (W, H) pixels does not fit the annotated ``expected`` size."""
    rotated = apply_exif and orientation in (5, 6, 7, 8)
    shown = (stored[1], stored[0]) if rotated else stored
    if tuple(shown) == tuple(expected):
        return None
    ew, eh = expected
    if apply_exif and orientation in _EXIF_ORIENTATION_NAMES:
        text = (
            f"has size {shown[0]}x{shown[1]} (WxH) once its EXIF orientation {orientation} "
            f"({_EXIF_ORIENTATION_NAMES[orientation]}) is applied (stored pixels "
            f"{stored[0]}x{stored[1]}), but the annotation file says {ew}x{eh}; structkd applies "
            "EXIF orientation like mmdetection and detectron2, so the annotated width/height and "
            "boxes must describe the image as displayed"
        )
        if tuple(stored) == tuple(expected):
            text += (
                "; the annotation matches the stored pixels, so its boxes were probably drawn on "
                "them: remove the EXIF Orientation tag from the file (or pass apply_exif=False "
                "to CocoDetection)"
            )
        return text
    note = ""
    if orientation in _EXIF_ORIENTATION_NAMES:
        note = f" (its EXIF orientation {orientation} is not applied: apply_exif=False)"
    return f"has size {stored[0]}x{stored[1]} (WxH){note} but the annotation file says {ew}x{eh}"


def _describe_open_error(e: BaseException) -> str:
    """What went wrong opening an image file, for a message that names the file before it."""
    if isinstance(e, FileNotFoundError):
        return "does not exist"
    if isinstance(e, IsADirectoryError):
        return "is a directory, not an image file"
    if isinstance(e, PermissionError):
        return "cannot be read (permission denied)"
    if isinstance(e, ImageTooLarge):
        return f"{e}; {_RAISE_LIMIT_HINT}"
    if isinstance(e, NotRegularFile):
        return str(e)
    if isinstance(e, UnidentifiedImageError):
        return "is not an image PIL can read (unknown format or corrupt header)"
    return f"is corrupt or not an image ({type(e).__name__}: {e})"


def _image_to_tensor(img: Image.Image) -> Tensor:
    """Convert a PIL image of any common mode to a float32 RGB tensor (3, H, W) in [0, 1].

    16-bit modes are scaled by 65535 (a plain ``convert("RGB")`` would clip them to 255).
    """
    if img.mode in _SIXTEEN_BIT_MODES:
        arr = np.asarray(img).astype(np.float32) / 65535.0
        np.clip(arr, 0.0, 1.0, out=arr)
        chw = torch.from_numpy(np.ascontiguousarray(arr))[None].expand(3, -1, -1).contiguous()
        return chw
    if img.mode == "F":
        raise ValueError(
            "unsupported image mode 'F' (32-bit float) of unknown range; "
            "expected 8-bit (L, P, RGB, RGBA, ...) or 16-bit (I;16, I)"
        )
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # avoids PIL's warning; alpha is dropped below
    if img.mode != "RGB":
        img = img.convert("RGB")  # L, LA, RGBA (alpha dropped), P, CMYK, YCbCr, 1, ...
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def load_image(
    path: Path,
    image_id: int,
    expected_size: tuple[int, int] | None = None,
    *,
    apply_exif: bool = True,
) -> Tensor:
    """Load one image as a float32 RGB tensor (3, H, W) in [0, 1].

    With ``apply_exif`` the image's EXIF orientation is applied (``PIL.ImageOps.exif_transpose``),
    so the tensor shows the image as displayed. ``expected_size`` is ``(width, height)`` from the
    annotation file, of the image as displayed; a mismatch raises because the boxes would then
    refer to a different image geometry.
    """
    where = f"image file {path} (image id {image_id})"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = _open_image(path)
        with img:
            img.load()
            orientation = _exif_orientation(img)  # after load: PNG may keep EXIF after the pixels
            if expected_size is not None:
                problem = _size_problem(img.size, orientation, expected_size, apply_exif)
                if problem:
                    raise _SizeMismatch(f"{where} {problem}")
            if apply_exif and orientation in _EXIF_ORIENTATION_NAMES:
                return _image_to_tensor(ImageOps.exif_transpose(img))
            return _image_to_tensor(img)
    except _SizeMismatch as e:
        raise ValueError(str(e)) from None
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{where} does not exist") from e
    except (ImageTooLarge, UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{where} {_describe_open_error(e)}") from e
    except ValueError as e:
        raise ValueError(f"cannot decode {where}: {e}") from e
