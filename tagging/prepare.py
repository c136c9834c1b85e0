"""The prepared training set: square, resized, optionally flipped PNGs plus a manifest that makes re-runs
incremental (a source whose bytes and options did not change is reused without decoding)."""

from __future__ import annotations

import dataclasses
import io
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pandas as pd
from PIL import Image, ImageOps

from common.atomic import write_bytes
from common.hashing import bytes_sha256, file_sha256, json_sha256
from tagging.images import ImageRejected, list_images, load_rgb

RESAMPLE_FILTERS: dict[str, Image.Resampling] = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
MANIFEST_COLUMNS = (
    "source", "source_sha256", "output", "sha256", "flipped", "width", "height", "status", "reason", "options",
)
FLIP_SUFFIX = "__flip"
# Characters that are illegal in file names on some common file system (Windows is the strictest).
_UNSAFE_CHARACTERS = re.compile(r'[<>:"/\\|?*\x00-\x1f]')
# Keep flat names well under the usual 255-byte limit, leaving room for the hash and flip suffixes.
_MAX_STEM_BYTES = 160
_NOT_UTF8 = "file name is not valid UTF-8 (rename the file)"


@dataclass(frozen=True)
class PrepareOptions:
    """The webui "Preprocess images" settings that change the prepared pixels."""

    size: int = 512
    flip: bool = False
    resample: str = "lanczos"
    background: tuple[int, int, int] = (255, 255, 255)
    min_side: int = 1
    max_pixels: int = 89_478_485

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"preprocess size must be a positive number of pixels, got {self.size}")
        if self.resample not in RESAMPLE_FILTERS:
            raise ValueError(f"unknown resample filter {self.resample!r}; choose one of {sorted(RESAMPLE_FILTERS)}")
        if len(self.background) != 3 or not all(0 <= int(c) <= 255 for c in self.background):
            raise ValueError(f"background must be three 0-255 values (R, G, B), got {self.background!r}")
        # YAML and JSON give lists; the fingerprint and the hash of the frozen dataclass need a tuple.
        object.__setattr__(self, "background", tuple(int(c) for c in self.background))

    def fingerprint(self) -> str:
        """Part of every cache key, so changing any option invalidates exactly the outputs it affects."""
        return json_sha256(dataclasses.asdict(self))


def prepare_images(
    src_dir: Path,
    out_dir: Path,
    options: PrepareOptions,
    previous: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Write the prepared PNGs for every image in `src_dir` into `out_dir` and return the manifest.

    Rows come one per output (a flipped copy is its own row) and one per skipped source, sorted by source.
    Outputs recorded in `previous` with the same source bytes and options are reused when the file on disk
    still has the recorded hash. PNGs in `out_dir` that no source produces any more are deleted together
    with their `.txt` caption; every other file there is left alone.
    """
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    _refuse_overlap(src_dir, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = list_images(src_dir)
    relatives = [path.relative_to(src_dir).as_posix() for path in sources]
    stems = _output_stems([relative for relative in relatives if _is_utf8(relative)], flip=options.flip)
    fingerprint = options.fingerprint()
    reusable = _reusable_rows(previous, fingerprint)
    rows: list[dict] = []
    for path, relative in zip(sources, relatives):
        if relative not in stems:
            rows.append(_skipped_row({"source": _printable(relative), "options": fingerprint}, None, _NOT_UTF8))
            continue
        rows.extend(_prepare_one(path, relative, stems[relative], out_dir, options, fingerprint, reusable))
    manifest = _manifest_frame(rows)
    _remove_stale_outputs(out_dir, keep=set(manifest["output"].dropna()))
    return manifest


def _is_utf8(relative: str) -> bool:
    """Linux names are bytes; one that is not UTF-8 reaches Python with surrogate escapes, which neither the
    manifest (Parquet strings) nor an output name can hold, so such a source is skipped with a reason."""
    try:
        relative.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(relative: str) -> str:
    return relative.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _refuse_overlap(src_dir: Path, out_dir: Path) -> None:
    # Stale-output removal deletes PNGs in out_dir: it must never be able to reach the raw images.
    src, out = src_dir.resolve(), out_dir.resolve()
    if out == src or out.is_relative_to(src):
        raise ValueError(f"output folder {out_dir} must not be the source folder {src_dir} or inside it")


def _output_stems(relatives: list[str], *, flip: bool) -> dict[str, str]:
    """Map each source's relative path to a flat, file-system-safe output stem, unique even on case-insensitive
    file systems. Colliding names all get a suffix from their own path's hash, so a source's name depends only
    on which other sources exist, never on the order they are listed in.
    """
    stems = {relative: _flat_stem(relative) for relative in relatives}
    claims = Counter(name for relative in relatives for name in _claimed_names(stems[relative], flip))
    for relative in relatives:
        if any(claims[name] > 1 for name in _claimed_names(stems[relative], flip)):
            stems[relative] = f"{stems[relative]}~{bytes_sha256(relative.encode('utf-8'))[:10]}"
    final = Counter(name for relative in relatives for name in _claimed_names(stems[relative], flip))
    clashes = sorted(r for r in relatives if any(final[name] > 1 for name in _claimed_names(stems[r], flip)))
    if clashes:
        raise ValueError(f"cannot give these sources distinct output names, please rename one of them: {clashes}")
    return stems


def _flat_stem(relative: str) -> str:
    stem = relative[: -len(PurePosixPath(relative).suffix)]  # list_images only yields names with a suffix
    flat = _UNSAFE_CHARACTERS.sub("_", stem.replace("/", "__")).rstrip(" .") or "_"
    if len(flat.encode("utf-8")) > _MAX_STEM_BYTES:
        head = flat.encode("utf-8")[:_MAX_STEM_BYTES].decode("utf-8", errors="ignore")
        flat = f"{head}~{bytes_sha256(relative.encode('utf-8'))[:10]}"
    return flat


def _claimed_names(stem: str, flip: bool) -> list[str]:
    names = [f"{stem}.png"] + ([f"{stem}{FLIP_SUFFIX}.png"] if flip else [])
    return [name.casefold() for name in names]


def _reusable_rows(previous: pd.DataFrame | None, fingerprint: str) -> dict[tuple[str, str, bool], dict]:
    if previous is None or previous.empty:
        return {}
    missing = [column for column in MANIFEST_COLUMNS if column not in previous.columns]
    if missing:
        raise ValueError(f"previous manifest lacks the columns {missing}; expected {list(MANIFEST_COLUMNS)}")
    usable = previous[(previous["status"] != "skipped") & (previous["options"] == fingerprint)]
    return {
        (row["source"], row["source_sha256"], bool(row["flipped"])): row
        for row in usable.to_dict("records")
        if isinstance(row["output"], str) and isinstance(row["sha256"], str)
    }


def _prepare_one(
    path: Path,
    relative: str,
    stem: str,
    out_dir: Path,
    options: PrepareOptions,
    fingerprint: str,
    reusable: dict[tuple[str, str, bool], dict],
) -> list[dict]:
    base = {"source": relative, "options": fingerprint}
    try:
        source_sha = file_sha256(path)
    except OSError as exc:
        return [_skipped_row(base, None, f"cannot read file: {exc.strerror or exc}")]
    variants = [False, True] if options.flip else [False]
    rows: dict[bool, dict] = {}
    for flipped in variants:
        name = f"{stem}{FLIP_SUFFIX if flipped else ''}.png"
        known = reusable.get((relative, source_sha, flipped))
        if known is not None and known["output"] == name and _has_hash(out_dir / name, known["sha256"]):
            rows[flipped] = _output_row(base, source_sha, name, known["sha256"], flipped, options.size, "reused")
    if len(rows) < len(variants):
        try:
            square = _square(path, options)
        except ImageRejected as exc:
            return [_skipped_row(base, source_sha, exc.reason)]
        for flipped in variants:
            if flipped not in rows:
                name = f"{stem}{FLIP_SUFFIX if flipped else ''}.png"
                image = ImageOps.mirror(square) if flipped else square
                digest = _write_png(out_dir / name, image)
                rows[flipped] = _output_row(base, source_sha, name, digest, flipped, options.size, "processed")
    return [rows[flipped] for flipped in variants]


def _has_hash(path: Path, expected: str) -> bool:
    try:
        return path.is_file() and file_sha256(path) == expected
    except OSError:
        return False


def _square(path: Path, options: PrepareOptions) -> Image.Image:
    """Centre crop to the largest square, then resize. Cropping first (rather than resizing a box of the
    full image) keeps pixels from outside the crop from bleeding into its edges through the filter."""
    image = load_rgb(path, background=options.background, max_pixels=options.max_pixels, min_side=options.min_side)
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    return square.resize((options.size, options.size), resample=RESAMPLE_FILTERS[options.resample])


def _write_png(target: Path, image: Image.Image) -> str:
    """PNG bytes that depend only on the pixels: no metadata (ICC, EXIF, text, time) is carried over."""
    clean = Image.frombytes("RGB", image.size, image.tobytes())
    buffer = io.BytesIO()
    clean.save(buffer, format="PNG", compress_level=6)
    data = buffer.getvalue()
    write_bytes(target, data)
    return bytes_sha256(data)


def _output_row(base: dict, source_sha: str, name: str, digest: str, flipped: bool, size: int, status: str) -> dict:
    return {**base, "source_sha256": source_sha, "output": name, "sha256": digest, "flipped": flipped,
            "width": size, "height": size, "status": status, "reason": ""}


def _skipped_row(base: dict, source_sha: str | None, reason: str) -> dict:
    return {**base, "source_sha256": source_sha, "output": None, "sha256": None, "flipped": False,
            "width": None, "height": None, "status": "skipped", "reason": reason}


def _manifest_frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))
    return frame.astype({"flipped": bool, "width": "Int64", "height": "Int64"})


def _remove_stale_outputs(out_dir: Path, keep: set[str]) -> None:
    """Delete PNGs no source produces any more. The caption goes first, so a run killed in between leaves a
    stale PNG (removed next time), never an orphan caption."""
    for png in sorted(out_dir.glob("*.png")):
        if png.name in keep or not png.is_file():
            continue
        png.with_suffix(".txt").unlink(missing_ok=True)
        png.unlink()


def contact_sheet(paths: list[Path], *, columns: int = 8, cell: int = 96, max_images: int = 64) -> Image.Image:
    """A grid of thumbnails so a person can eyeball a whole dataset in the UI at a glance.

    An unreadable image becomes a grey cell instead of failing the sheet: the sheet is for looking, and the
    manifest already records why a file was skipped.
    """
    shown = list(paths)[:max_images]
    if not shown:
        raise ValueError("contact_sheet needs at least one image path")
    if columns < 1 or cell < 1:
        raise ValueError(f"columns and cell must be positive, got columns={columns}, cell={cell}")
    columns = min(columns, len(shown))
    rows = math.ceil(len(shown) / columns)
    sheet = Image.new("RGB", (columns * cell, rows * cell), (255, 255, 255))
    for index, path in enumerate(shown):
        origin = ((index % columns) * cell, (index // columns) * cell)
        try:
            thumb = ImageOps.contain(load_rgb(path), (cell, cell), method=Image.Resampling.LANCZOS)
        except ImageRejected:
            sheet.paste((128, 128, 128), (*origin, origin[0] + cell, origin[1] + cell))
            continue
        sheet.paste(thumb, (origin[0] + (cell - thumb.width) // 2, origin[1] + (cell - thumb.height) // 2))
    return sheet
