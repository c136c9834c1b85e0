"""Safe image decoding and folder listing: every image a user drops in a folder either becomes 8-bit RGB
or is refused with a short reason that names the file, never a crash deep inside Pillow."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError, features

_HAS_AVIF = features.check("avif")
_BASE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
IMAGE_EXTENSIONS: frozenset[str] = frozenset(_BASE_EXTENSIONS | ({".avif"} if _HAS_AVIF else set()))

# Decoders Pillow may use (multi-picture JPEGs from cameras open through "JPEG"). Restricting them means a
# file that merely sniffs as, say, EPS (which Pillow hands to Ghostscript) is refused as "not an image"
# instead of running an external program.
_ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "DIB", "GIF", "TIFF") + (("AVIF",) if _HAS_AVIF else ())
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
# Everything Pillow raises for a damaged file (struct.error for short headers, SyntaxError for bad chunks,
# EOFError for an early end, OSError for truncation, ValueError for impossible parameters, ...).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError, TypeError)


class ImageRejected(Exception):
    """An input file that cannot be used as an image; `reason` is short enough to show a user as is."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


def list_images(folder: Path) -> list[Path]:
    """Image files under `folder`, sorted by relative posix path so every machine sees the same order.

    Symlinks are refused when they resolve outside `folder` (a dataset must not pull in arbitrary files).
    Symlinked directories are never descended: inside the folder their files are already listed, and
    not following them makes symlink loops impossible.
    """
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"image folder {folder} is not a directory")
    root = folder.resolve()
    found: list[tuple[str, Path]] = []
    pending = [folder]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                path = Path(entry.path)
                if entry.name.startswith("."):
                    continue
                if entry.is_symlink():
                    if not _is_file_inside(path, root):  # also refuses symlinked directories
                        continue
                elif entry.is_dir(follow_symlinks=False):
                    pending.append(path)
                    continue
                elif not entry.is_file(follow_symlinks=False):
                    continue
                if path.suffix.lower() in IMAGE_EXTENSIONS:
                    found.append((path.relative_to(folder).as_posix(), path))
    return [path for _, path in sorted(found)]


def _is_file_inside(link: Path, root: Path) -> bool:
    try:
        target = link.resolve(strict=True)
    except (OSError, RuntimeError):  # dangling link or a loop
        return False
    return target.is_file() and target.is_relative_to(root)


def load_rgb(
    path: Path,
    *,
    background: tuple[int, int, int] = (255, 255, 255),
    max_pixels: int = 89_478_485,
    min_side: int = 1,
) -> Image.Image:
    """Decode `path` completely into an 8-bit RGB image, upright, transparency flattened on `background`.

    The size limits are checked from the header before any pixel is decoded, so a decompression bomb costs
    nothing. Pillow's global limit (twice its MAX_IMAGE_PIXELS) stays a hard ceiling above `max_pixels`,
    but the global is never changed here: other code in the process may rely on it.
    """
    path = Path(path)
    try:
        size_bytes = path.stat().st_size
    except OSError as exc:
        raise ImageRejected(path, f"cannot read file: {exc.strerror or exc}") from exc
    if not path.is_file():
        raise ImageRejected(path, "not a regular file")
    if size_bytes == 0:
        raise ImageRejected(path, "zero-byte file")
    try:
        with Image.open(path, formats=_ALLOWED_FORMATS) as image:
            _check_size(path, image.size, max_pixels=max_pixels, min_side=min_side)
            image.load()
            upright = ImageOps.exif_transpose(image)
    except UnidentifiedImageError as exc:
        raise ImageRejected(path, "not an image (content is not a known format)") from exc
    except Image.DecompressionBombError as exc:
        raise ImageRejected(path, f"too large: {exc}") from exc
    except _DECODE_ERRORS as exc:
        raise ImageRejected(path, f"truncated or corrupt image: {exc}") from exc
    try:
        return _to_rgb(upright, background)
    except ValueError as exc:
        raise ImageRejected(path, f"unsupported colour mode {upright.mode}: {exc}") from exc


def _check_size(path: Path, size: tuple[int, int], *, max_pixels: int, min_side: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ImageRejected(path, f"too large: {width} x {height} pixels exceeds limit {max_pixels}")
    if min(width, height) < min_side:
        raise ImageRejected(path, f"too small: {width} x {height} pixels, the shorter side must be at least {min_side}")


def _to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Convert any decoded mode to 8-bit RGB without the silent clipping Pillow does for 16-bit greyscale."""
    if image.mode in _SIXTEEN_BIT_MODES:
        image = _sixteen_bit_to_l(image)
    elif image.mode == "F":
        image = _float_to_l(image)
    has_palette_alpha = image.mode == "P" and image.palette is not None and image.palette.mode == "RGBA"
    if image.mode in _ALPHA_MODES or "transparency" in image.info or has_palette_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    # Pillow's I;16 -> L conversion clips everything above 255 to white; scale the 16-bit range instead.
    # Mode "I" (32-bit) comes from 16-bit PNG/TIFF in practice, so it gets the same range. A 16-bit colour
    # key ("transparency") cannot survive the scaling and is dropped.
    values = np.asarray(image.convert("I"), dtype=np.float64).clip(0, 65535)
    return Image.fromarray(np.rint(values / 257.0).astype(np.uint8))


def _float_to_l(image: Image.Image) -> Image.Image:
    # Float images (TIFF) follow the usual 0..1 convention for floating-point pixel data.
    values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0).clip(0.0, 1.0)
    return Image.fromarray(np.rint(values * 255.0).astype(np.uint8))
