"""The content-addressed cache of prepared images: one entry per (source content hash, options fingerprint).

Why content-addressed: the key does not mention the file's name or the run, so a renamed file is a hit,
an added file is the only miss, and a run killed half way leaves only complete entries (the entry's
`entry.json` is written last, atomically) that the next run reuses. Outputs in the prepared folder are
hard links to the entry's files, so the cache costs no extra disk space where links work.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from common.atomic import write_bytes, write_text
from common.hashing import bytes_sha256, file_sha256
from tagging.crops import CropRefused, plan_regions
from tagging.images import ImageRejected, load_rgb
from tagging.prepare_options import RESAMPLE_FILTERS, PrepareOptions

ENTRY_FILE = "entry.json"
THUMB_FILE = "thumb.png"  # a small copy of the source, for drawing crop boxes without decoding it again
THUMB_SIDE = 128
FLIP_SUFFIX = "__flip"
GREY_SUFFIX = "__grey"
TILE_SUFFIX = "__tile"


def entry_dir(cache_dir: Path, fingerprint: str, source_sha: str) -> Path:
    return Path(cache_dir) / fingerprint[:16] / source_sha[:2] / source_sha


def read_entry(directory: Path) -> dict | None:
    """A complete, untouched entry, or None when it is missing, unreadable, or one of its files changed.

    Outputs are hard links to the entry's files, so a prepared PNG edited in place changes the entry too:
    the size and mtime recorded when the entry was written catch that without reading the pixels.
    """
    try:
        entry = json.loads((directory / ENTRY_FILE).read_text(encoding="utf-8"))
        for variant in entry["variants"]:
            stat = (directory / variant["file"]).stat()
            if [stat.st_size, stat.st_mtime_ns] != variant["stat"]:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return entry


def build_entry(path: str, options: PrepareOptions, directory: str) -> dict:
    """Decode, crop and resize one source into `directory` and describe the result. Runs in a worker
    process, so it takes and returns only plain values; a refused image is a (cached) skip, not an error."""
    target = Path(directory)
    try:
        image = load_rgb(Path(path), background=options.background, max_pixels=options.max_pixels,
                         min_side=options.min_side)
        regions = plan_regions(image, options)
    except (ImageRejected, CropRefused) as exc:
        entry = {"skipped": getattr(exc, "reason", str(exc)), "variants": []}
        write_text(target / ENTRY_FILE, json.dumps(entry))
        return entry
    variants = []
    for index, region in enumerate(regions):
        resized = image.crop(region.box).resize(region.size, resample=RESAMPLE_FILTERS[options.resample])
        tile = f"{TILE_SUFFIX}{index}" if len(regions) > 1 else ""
        copies = [("", resized, False, False)]
        if options.flip:
            copies.append((FLIP_SUFFIX, ImageOps.mirror(resized), True, False))
        if options.greyscale:
            copies.append((GREY_SUFFIX, ImageOps.grayscale(resized).convert("RGB"), False, True))
        for suffix, picture, flipped, grey in copies:
            file = f"{index}{suffix}.png"
            digest = write_png(target / file, picture)
            stat = (target / file).stat()
            variants.append({"file": file, "stat": [stat.st_size, stat.st_mtime_ns], "suffix": f"{tile}{suffix}", "sha256": digest, "flipped": flipped,
                             "greyscale": grey, "tile": index, "box": list(region.box),
                             "width": picture.width, "height": picture.height})
    ImageOps.contain(image, (THUMB_SIDE, THUMB_SIDE), method=Image.Resampling.BILINEAR).save(target / THUMB_FILE)
    entry = {"skipped": None, "variants": variants, "source_width": image.width, "source_height": image.height,
             "dhash": dhash(image)}
    write_text(target / ENTRY_FILE, json.dumps(entry))
    return entry


def write_png(target: Path, image: Image.Image) -> str:
    """PNG bytes that depend only on the pixels: no metadata (ICC, EXIF, text, time) is carried over."""
    clean = Image.frombytes("RGB", image.size, image.convert("RGB").tobytes())
    buffer = io.BytesIO()
    # Level 3: a tenth larger than the default 6 and four times faster, which is most of a cold run.
    clean.save(buffer, format="PNG", compress_level=3)
    data = buffer.getvalue()
    write_bytes(target, data)
    return bytes_sha256(data)


def dhash(image: Image.Image, bits: int = 8) -> str:
    """64-bit difference hash (hex): near-identical pictures (re-encoded, resized) differ in few bits.
    Ten lines of Pillow rather than a dependency that brings SciPy and PyWavelets for one function."""
    small = np.asarray(image.convert("L").resize((bits + 1, bits), Image.Resampling.LANCZOS), dtype=np.int16)
    flags = (small[:, 1:] > small[:, :-1]).ravel()
    return f"{int(''.join('1' if f else '0' for f in flags), 2):0{bits * bits // 4}x}"


def hamming(a: str, b: str) -> int:
    return (int(a, 16) ^ int(b, 16)).bit_count()


def link_output(cached: Path, target: Path, sha256: str) -> None:
    """Make `target` the cached file (content `sha256`): a hard link swapped in atomically, or a copy where
    links fail (then an intact copy is recognised by its hash)."""
    with contextlib.suppress(OSError):
        if os.path.samefile(cached, target) or file_sha256(target) == sha256:
            return
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=".tmp.png", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        tmp.unlink()
        try:
            os.link(cached, tmp)
        except OSError:  # another file system, or one without hard links
            shutil.copyfile(cached, tmp)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def prune(cache_dir: Path, keep: set[str]) -> int:
    """Remove entries (under any fingerprint) whose source content is no longer in the dataset; entries of
    current sources under other options stay, so switching a setting back costs nothing."""
    removed = 0
    for entry in Path(cache_dir).glob("*/*/*"):
        if entry.is_dir() and entry.name not in keep:
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
    return removed
