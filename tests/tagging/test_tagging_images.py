from __future__ import annotations

import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tagging.images import IMAGE_EXTENSIONS, ImageRejected, list_images, load_rgb


def pixel(image: Image.Image, xy: tuple[int, int] = (0, 0)) -> tuple[int, int, int]:
    return image.getpixel(xy)


def assert_close(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 0) -> None:
    assert max(abs(a - e) for a, e in zip(actual, expected)) <= tolerance, (actual, expected)


def rejected_reason(path: Path, **kwargs: object) -> str:
    with pytest.raises(ImageRejected) as caught:
        load_rgb(path, **kwargs)
    assert caught.value.path == path
    assert str(path) in str(caught.value)
    return caught.value.reason


def png_with_header_size(path: Path, width: int, height: int) -> Path:
    """A PNG whose IHDR claims width x height but whose pixel data is a single tiny row: a bomb in miniature."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0\0\0\0")) + chunk(b"IEND", b""))
    return path


def test_extensions_cover_the_common_formats() -> None:
    assert {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"} <= IMAGE_EXTENSIONS
    assert ".txt" not in IMAGE_EXTENSIONS


@pytest.mark.parametrize(
    ("mode", "colour", "expected"),
    [
        ("L", 100, (100, 100, 100)),
        ("1", 1, (255, 255, 255)),
        ("RGB", (10, 20, 30), (10, 20, 30)),
        ("RGBA", (255, 0, 0, 0), (255, 255, 255)),
        ("LA", (0, 0), (255, 255, 255)),
        ("LA", (40, 255), (40, 40, 40)),
    ],
)
def test_modes_become_rgb(tmp_path: Path, solid_image, mode: str, colour: object, expected: tuple) -> None:
    image = load_rgb(solid_image(tmp_path / f"{mode}.png", colour, mode=mode))
    assert image.mode == "RGB"
    assert pixel(image) == expected


def test_half_transparent_pixels_blend_with_the_background(tmp_path: Path, solid_image) -> None:
    path = solid_image(tmp_path / "half.png", (255, 0, 0, 128), mode="RGBA")
    assert_close(pixel(load_rgb(path)), (255, 127, 127), tolerance=1)
    assert_close(pixel(load_rgb(path, background=(0, 0, 0))), (128, 0, 0), tolerance=1)


def test_palette_transparency_uses_the_background(tmp_path: Path) -> None:
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    image.putpixel((1, 1), 1)
    image.save(tmp_path / "p.png", transparency=0)
    loaded = load_rgb(tmp_path / "p.png", background=(0, 255, 0))
    assert pixel(loaded, (0, 0)) == (0, 255, 0)
    assert pixel(loaded, (1, 1)) == (200, 10, 10)


def test_cmyk_becomes_rgb(tmp_path: Path, solid_image) -> None:
    cyan = (255, 0, 0, 0)
    assert pixel(load_rgb(solid_image(tmp_path / "c.tiff", cyan, mode="CMYK"))) == (0, 255, 255)
    assert_close(pixel(load_rgb(solid_image(tmp_path / "c.jpg", cyan, mode="CMYK"))), (0, 255, 255), tolerance=3)


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 1000, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    loaded = np.asarray(load_rgb(tmp_path / "deep.png"))[0, :, 0]
    assert loaded.tolist() == [0, 4, 128, 255]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    upright = load_rgb(tmp_path / "rotated.jpg")
    assert upright.size == (20, 40)
    assert_close(pixel(upright, (10, 5)), (255, 0, 0), tolerance=8)
    assert_close(pixel(upright, (10, 35)), (0, 0, 255), tolerance=8)


def test_animated_gif_gives_its_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert pixel(load_rgb(tmp_path / "anim.gif")) == (255, 0, 0)


def test_zero_byte_file(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    assert rejected_reason(tmp_path / "empty.png") == "zero-byte file"


def test_missing_file(tmp_path: Path) -> None:
    assert rejected_reason(tmp_path / "gone.png").startswith("cannot read file")


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_image(tmp_path: Path, suffix: str) -> None:
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    whole = tmp_path / f"whole{suffix}"
    Image.fromarray(noise).save(whole)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert rejected_reason(cut).startswith("truncated or corrupt image")


def test_text_named_png_is_not_an_image(tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("just some text\n")
    assert rejected_reason(tmp_path / "notes.png") == "not an image (content is not a known format)"


def test_formats_outside_the_allow_list_are_refused(tmp_path: Path) -> None:
    # Pillow would recognise EPS and hand it to Ghostscript; a dataset image must never run a program.
    (tmp_path / "trap.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")
    assert rejected_reason(tmp_path / "trap.png") == "not an image (content is not a known format)"


def test_pixel_limit_is_checked_from_the_header(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        reason = rejected_reason(png_with_header_size(tmp_path / "bomb.png", 10_000, 10_000))
    assert reason == "too large: 10000 x 10000 pixels exceeds limit 89478485"
    assert rejected_reason(png_with_header_size(tmp_path / "huge.png", 30_000, 30_000)).startswith("too large")


def test_custom_pixel_limit_and_min_side(tmp_path: Path, solid_image) -> None:
    path = solid_image(tmp_path / "wide.png", size=(100, 3))
    assert rejected_reason(path, max_pixels=299) == "too large: 100 x 3 pixels exceeds limit 299"
    assert rejected_reason(path, min_side=4).startswith("too small: 100 x 3 pixels")
    assert load_rgb(path, min_side=3).size == (100, 3)


def test_list_images_is_sorted_recursive_and_filtered(tmp_path: Path, solid_image) -> None:
    for name in ["b.png", "a/z.JPG", "a/b c.webp", "-dash.png", "ünï çödé.png", ".hidden.png", ".cache/x.png"]:
        solid_image(tmp_path / name)
    (tmp_path / "b.txt").write_text("caption")
    (tmp_path / "dataset.yaml").write_text("a: 1")
    (tmp_path / "notes.md").write_text("# notes")
    listed = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert listed == sorted(["-dash.png", "a/b c.webp", "a/z.JPG", "b.png", "ünï çödé.png"])
    assert all(load_rgb(tmp_path / name).size == (32, 32) for name in listed)


def test_list_images_refuses_symlinks_leaving_the_folder(tmp_path: Path, solid_image) -> None:
    outside = solid_image(tmp_path / "outside" / "secret.png")
    data = tmp_path / "data"
    inside = solid_image(data / "real.png")
    os.symlink(outside, data / "escape.png")
    os.symlink(inside, data / "alias.png")
    os.symlink(tmp_path / "outside", data / "escape_dir")
    os.symlink(data, data / "loop")
    os.symlink(data / "missing.png", data / "dangling.png")
    os.symlink(data / "ping.png", data / "pong.png")
    os.symlink(data / "pong.png", data / "ping.png")
    assert [p.name for p in list_images(data)] == ["alias.png", "real.png"]


def test_list_images_needs_a_folder(tmp_path: Path, solid_image) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_images(tmp_path / "nope")
    with pytest.raises(NotADirectoryError):
        list_images(solid_image(tmp_path / "file.png"))


def test_animated_webp_gives_its_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.webp", save_all=True, append_images=frames[1:], duration=100, lossless=True)
    assert pixel(load_rgb(tmp_path / "anim.webp")) == (255, 0, 0)


@pytest.mark.parametrize("suffix", [".bmp", ".tif", ".webp", ".avif"])
def test_other_formats_decode(tmp_path: Path, solid_image, suffix: str) -> None:
    if suffix not in IMAGE_EXTENSIONS:
        pytest.skip(f"this Pillow build cannot read {suffix}")
    path = solid_image(tmp_path / f"x{suffix}", (0, 128, 255), size=(16, 16))
    assert_close(pixel(load_rgb(path)), (0, 128, 255), tolerance=6)
