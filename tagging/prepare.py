"""The prepared training set: cropped, resized, optionally flipped/greyscale PNGs plus a manifest.

Work is done per source content, not per run: every decoded source lands in a content-addressed cache
(tagging/prepare_cache.py) keyed by (source hash, options fingerprint), built in parallel worker processes;
the prepared folder and the manifest are then assembled from the cache, so adding one image to a thousand
decodes one, a rename decodes none, and a killed run resumes where it stopped.
"""

from __future__ import annotations

import multiprocessing
import os
import re
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from common.hashing import bytes_sha256, file_sha256
from tagging.sheets import contact_sheet
from tagging.filewords import filename_words, sidecar_caption
from tagging.images import list_images
from tagging.prepare_cache import (
    FLIP_SUFFIX,
    GREY_SUFFIX,
    build_entry,
    entry_dir,
    link_output,
    prune,
    read_entry,
)
from tagging.prepare_options import RESAMPLE_FILTERS, PrepareOptions
from tagging.splits import assign_splits

__all__ = ["MANIFEST_COLUMNS", "PrepareOptions", "RESAMPLE_FILTERS", "SelectOptions", "contact_sheet",
           "prepare_images"]

MANIFEST_COLUMNS = (
    "source", "source_sha256", "output", "sha256", "flipped", "width", "height", "status", "reason", "options",
    "greyscale", "tile", "crop_left", "crop_top", "crop_right", "crop_bottom", "source_width", "source_height",
    "source_bytes", "source_mtime_ns", "dhash", "duplicate_of", "source_caption", "filename_words", "split",
)
_INT_COLUMNS = ("width", "height", "tile", "crop_left", "crop_top", "crop_right", "crop_bottom", "source_width",
                "source_height", "source_bytes", "source_mtime_ns")
# Characters that are illegal in file names on some common file system (Windows is the strictest).
_UNSAFE_CHARACTERS = re.compile(r'[<>:"/\\|?*\x00-\x1f]')
# Keep flat names well under the usual 255-byte limit, leaving room for the hash and variant suffixes.
_MAX_STEM_BYTES = 160
_NOT_UTF8 = "file name is not valid UTF-8 (rename the file)"
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class SelectOptions:
    """Options that choose and describe images without changing pixels, so they are not in the cache key."""

    near_duplicate_distance: int = 4  # dHash bits; 0 turns near-duplicate detection off
    drop_near_duplicates: bool = False
    filename_word_regex: str = ""  # webui "Filename word regex"
    filename_join_string: str = " "  # webui "Filename join string"
    validation_fraction: float = 0.0  # sources held out for the validation loss (tagging/splits.py); 0: none


def prepare_images(
    src_dir: Path,
    out_dir: Path,
    options: PrepareOptions,
    previous: pd.DataFrame | None = None,
    *,
    cache_dir: Path | None = None,
    select: SelectOptions = SelectOptions(),
    workers: int = 1,
    progress: Progress | None = None,
) -> pd.DataFrame:
    """Write the prepared PNGs for every image in `src_dir` into `out_dir` and return the manifest.

    Rows come one per output (each tile, flipped and greyscale copy is its own row) and one per skipped
    source, sorted by source; `split` says which kept rows are held out for validation (tagging/splits.py).
    `previous` (the last manifest) only saves re-hashing sources whose size and mtime did not change. Sources missing from the cache are built by `workers` processes (0: one per CPU);
    `progress(done, total)` is called as each finishes. PNGs in `out_dir` that no source produces any more are
    deleted together with their `.txt` caption; every other file there is left alone.
    """
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    _refuse_overlap(src_dir, out_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else out_dir.parent / f".{out_dir.name}_cache"
    _refuse_overlap(src_dir, cache_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = list_images(src_dir)
    relatives = [path.relative_to(src_dir).as_posix() for path in sources]
    stems = _output_stems([relative for relative in relatives if _is_utf8(relative)], options)
    fingerprint = options.fingerprint()
    known_hashes = _known_hashes(previous)

    rows: list[dict] = []
    located: list[tuple[Path, str, dict]] = []  # (path, relative, base row) of every readable source
    for path, relative in zip(sources, relatives):
        if relative not in stems:
            rows.append(_skipped_row({"source": _printable(relative), "options": fingerprint}, _NOT_UTF8))
            continue
        base = {"source": relative, "options": fingerprint}
        try:  # a file can vanish or become unreadable between listing and reading
            base.update(_describe(path, relative, select))
            base["source_sha256"] = _source_hash(path, relative, base, known_hashes)
        except OSError as exc:
            rows.append(_skipped_row(base, f"cannot read file: {exc.strerror or exc}"))
            continue
        located.append((path, relative, base))

    entries, built = _entries(located, options, fingerprint, cache_dir, workers, progress)
    first_of: dict[str, str] = {}
    for path, relative, base in located:
        sha = base["source_sha256"]
        if sha in first_of:
            rows.append(_skipped_row(base, f"exact duplicate of {first_of[sha]}", duplicate_of=first_of[sha]))
            continue
        first_of[sha] = relative
        rows.extend(_rows_for(base, stems[relative], entries[sha], entry_dir(cache_dir, fingerprint, sha), out_dir,
                              "processed" if sha in built else "reused"))
    manifest = _mark_near_duplicates(_manifest_frame(rows), select)
    manifest["split"] = assign_splits(manifest, select.validation_fraction)
    _remove_stale_outputs(out_dir, keep=set(manifest.loc[manifest["status"] != "skipped", "output"].dropna()))
    prune(cache_dir, keep=set(first_of))
    return manifest


def _describe(path: Path, relative: str, select: SelectOptions) -> dict:
    stat = path.stat()
    words = filename_words(PurePosixPath(relative).name, word_regex=select.filename_word_regex,
                           join=select.filename_join_string)
    return {"source_bytes": stat.st_size, "source_mtime_ns": stat.st_mtime_ns, "source_caption": sidecar_caption(path),
            "filename_words": words}


def _known_hashes(previous: pd.DataFrame | None) -> dict[tuple[str, int, int], str]:
    """(source, size, mtime_ns) -> content hash from the last manifest; older manifests simply give none."""
    needed = {"source", "source_sha256", "source_bytes", "source_mtime_ns"}
    if previous is None or previous.empty or not needed <= set(previous.columns):
        return {}
    usable = previous.dropna(subset=list(needed))
    return {(row.source, int(row.source_bytes), int(row.source_mtime_ns)): row.source_sha256
            for row in usable.itertuples()}


def _source_hash(path: Path, relative: str, base: dict, known: dict[tuple[str, int, int], str]) -> str:
    hit = known.get((relative, base["source_bytes"], base["source_mtime_ns"]))
    return hit if hit is not None else file_sha256(path)


def _entries(
    located: list[tuple[Path, str, dict]],
    options: PrepareOptions,
    fingerprint: str,
    cache_dir: Path,
    workers: int,
    progress: Progress | None,
) -> tuple[dict[str, dict], set[str]]:
    """The cache entry of every distinct source content, building the missing ones; also which were built."""
    entries: dict[str, dict] = {}
    missing: dict[str, Path] = {}
    for path, _, base in located:
        sha = base["source_sha256"]
        if sha in entries or sha in missing:
            continue
        entry = read_entry(entry_dir(cache_dir, fingerprint, sha))
        if entry is None:
            missing[sha] = path
        else:
            entries[sha] = entry
    total = len(missing)
    count = workers if workers > 0 else (os.cpu_count() or 1)
    if count == 1 or total < 2 * count:  # too few to repay starting the worker processes
        for done, (sha, path) in enumerate(missing.items(), start=1):
            entries[sha] = build_entry(str(path), options, str(entry_dir(cache_dir, fingerprint, sha)))
            if progress:
                progress(done, total)
        return entries, set(missing)
    context = multiprocessing.get_context("forkserver")  # fork is unsafe in a threaded process (Dagster's)
    context.set_forkserver_preload(["tagging.prepare_cache"])  # imported once, then every worker forks from it
    with ProcessPoolExecutor(max_workers=min(count, total), mp_context=context) as pool:
        futures: dict[Future, str] = {
            pool.submit(build_entry, str(path), options, str(entry_dir(cache_dir, fingerprint, sha))): sha
            for sha, path in missing.items()
        }
        for done, future in enumerate(as_completed(futures), start=1):
            entries[futures[future]] = future.result()
            if progress:
                progress(done, total)
    return entries, set(missing)
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


def _output_stems(relatives: list[str], options: PrepareOptions) -> dict[str, str]:
    """Map each source's relative path to a flat, file-system-safe output stem, unique even on case-insensitive
    file systems. Colliding names all get a suffix from their own path's hash, so a source's name depends only
    on which other sources exist, never on the order they are listed in.
    """
    flip = (options.flip, options.greyscale)
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


def _claimed_names(stem: str, copies: tuple[bool, bool]) -> list[str]:
    """Names a source's plain, flipped and greyscale outputs take (tiles of split images are not claimed:
    their count is only known after decoding)."""
    flip, grey = copies
    names = [f"{stem}.png"] + ([f"{stem}{FLIP_SUFFIX}.png"] if flip else []) + ([f"{stem}{GREY_SUFFIX}.png"] if grey else [])
    return [name.casefold() for name in names]


def _rows_for(base: dict, stem: str, entry: dict, cached: Path, out_dir: Path, status: str) -> list[dict]:
    if entry["skipped"]:
        return [_skipped_row(base, entry["skipped"])]
    rows = []
    for variant in entry["variants"]:
        name = f"{stem}{variant['suffix']}.png"
        link_output(cached / variant["file"], out_dir / name, variant["sha256"])
        left, top, right, bottom = variant["box"]
        rows.append({**base, "output": name, "sha256": variant["sha256"], "flipped": variant["flipped"],
                     "greyscale": variant["greyscale"], "tile": variant["tile"], "width": variant["width"],
                     "height": variant["height"], "crop_left": left, "crop_top": top, "crop_right": right,
                     "crop_bottom": bottom, "source_width": entry["source_width"],
                     "source_height": entry["source_height"], "dhash": entry["dhash"], "status": status,
                     "reason": ""})
    return rows


def _skipped_row(base: dict, reason: str, *, duplicate_of: str | None = None) -> dict:
    return {"source_sha256": None, **base, "output": None, "sha256": None, "flipped": False, "greyscale": False,
            "status": "skipped", "reason": reason, "duplicate_of": duplicate_of}


def _manifest_frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))
    frame = frame.astype({"flipped": bool, "greyscale": bool, **{column: "Int64" for column in _INT_COLUMNS}})
    return frame.astype({column: "object" for column in ("duplicate_of", "source_caption", "dhash", "sha256",
                                                          "output", "source_sha256")})


def _mark_near_duplicates(manifest: pd.DataFrame, select: SelectOptions) -> pd.DataFrame:
    """Record, for every source whose dHash is within the distance of a larger source's, that larger source
    in `duplicate_of`; with `drop_near_duplicates` its rows become skips, so the largest of a group stays."""
    if select.near_duplicate_distance <= 0:
        return manifest
    kept = manifest[(manifest["status"] != "skipped") & manifest["dhash"].notna()].drop_duplicates("source")
    order = kept.assign(area=kept["source_width"] * kept["source_height"]).sort_values(
        ["area", "source"], ascending=[False, True])
    names = order["source"].tolist()
    hashes = np.array([int(value, 16) for value in order["dhash"]], dtype=np.uint64)
    is_near = np.zeros(len(names), dtype=bool)
    near: dict[str, str] = {}
    for index in range(1, len(names)):  # each against every larger source that is itself no near duplicate
        close = (np.bitwise_count(hashes[:index] ^ hashes[index]) <= select.near_duplicate_distance) & ~is_near[:index]
        if close.any():
            is_near[index] = True
            near[names[index]] = names[int(np.argmax(close))]
    if not near:
        return manifest
    hit = manifest["source"].isin(list(near)) & (manifest["status"] != "skipped")
    manifest.loc[hit, "duplicate_of"] = manifest.loc[hit, "source"].map(near)
    if select.drop_near_duplicates:
        manifest.loc[hit, "reason"] = "near duplicate of " + manifest.loc[hit, "duplicate_of"]
        manifest.loc[hit, ["status", "output", "sha256"]] = ["skipped", None, None]
    return manifest


def _remove_stale_outputs(out_dir: Path, keep: set[str]) -> None:
    """Delete PNGs no source produces any more. The caption goes first, so a run killed in between leaves a
    stale PNG (removed next time), never an orphan caption."""
    for png in sorted(out_dir.glob("*.png")):
        if png.name in keep or not png.is_file():
            continue
        png.with_suffix(".txt").unlink(missing_ok=True)
        png.unlink()
