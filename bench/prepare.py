"""Benchmark of image preparation (issue 3): cold run, incremental run after adding images, parallel speed-up.

    PYTHONPATH=. python bench/prepare.py [--count 1000] [--added 10] [--max-side 4000] [--workers 0]

Builds `count` synthetic images of mixed sizes (up to `max-side`), colour modes and formats in a temporary
folder, then times, on this machine, in one run: a cold parallel run, the incremental run after adding
`added` images (it must cost under 5% of the cold run), and a cold single-process run for the speed-up.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from tagging.prepare import PrepareOptions, prepare_images

# (Pillow mode, file suffix): the mix a scraped/exported/screenshotted folder has.
KINDS = [("RGB", ".jpg"), ("RGB", ".png"), ("RGBA", ".png"), ("L", ".jpg"), ("P", ".gif"), ("RGB", ".webp"),
         ("CMYK", ".jpg")]


def synthetic_image(path: Path, mode: str, rng: np.random.Generator, max_side: int) -> None:
    """A smooth gradient with some noise (compresses like a photo, unlike pure noise), random mode and size:
    sides drawn as max_side * u^2, so most images are small and a few are huge, as in a scraped folder."""
    width, height = (max(64, int(max_side * u * u)) for u in rng.random(2))
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
    noise = Image.effect_noise((width, height), 24).convert("RGB")
    image = Image.blend(image, noise, 0.15)
    if mode == "RGBA":
        image.putalpha(Image.linear_gradient("L").resize((width, height)))
    elif mode == "P":
        image = image.quantize(64)
    else:
        image = image.convert(mode)
    image.save(path, **({"compress_level": 1} if path.suffix == ".png" else {}))


def make_images(folder: Path, start: int, count: int, max_side: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(start, start + count):
        rng = np.random.default_rng(index)
        mode, suffix = KINDS[int(rng.integers(len(KINDS)))]
        synthetic_image(folder / f"{index:05d} image{suffix}", mode, rng, max_side)


def _burn(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i
    return total


def cpu_control(workers: int) -> float:
    """Speed-up of pure CPU work with the same number of processes right now: the ceiling this (possibly
    shared) machine allows, to read the preparation speed-up against."""
    count = workers if workers > 0 else (os.cpu_count() or 1)
    jobs = [2_000_000] * (2 * count)
    start = time.perf_counter()
    for n in jobs:
        _burn(n)
    serial = time.perf_counter() - start
    with ProcessPoolExecutor(count) as pool:
        start = time.perf_counter()
        list(pool.map(_burn, jobs))
        parallel = time.perf_counter() - start
    return serial / parallel


def timed_run(src: Path, out: Path, options: PrepareOptions, workers: int, previous=None):
    start = time.perf_counter()
    manifest = prepare_images(src, out / "prepared", options, previous=previous, cache_dir=out / "cache",
                              workers=workers)
    seconds = time.perf_counter() - start
    processed = int((manifest["status"] == "processed").sum())
    return manifest, seconds, processed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--added", type=int, default=10)
    parser.add_argument("--max-side", type=int, default=4000)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--workers", type=int, default=0, help="parallel run's processes (0: one per CPU)")
    args = parser.parse_args()
    options = PrepareOptions(size=args.size)
    with tempfile.TemporaryDirectory(prefix="bench_prepare_") as tmp:
        root = Path(tmp)
        src = root / "raw"
        start = time.perf_counter()
        make_images(src, 0, args.count, args.max_side)
        print(f"made {args.count} synthetic images (up to {args.max_side} px) in {time.perf_counter() - start:.1f} s; "
              f"{os.cpu_count()} CPUs")

        # Single process first, so the parallel run is not the one that warms the page cache.
        _, single_s, single_n = timed_run(src, root / "single", options, 1)
        print(f"cold, single process:  {single_n:5d} images in {single_s:7.2f} s = {single_n / single_s:7.2f} images/s")
        cold, cold_s, cold_n = timed_run(src, root / "parallel", options, args.workers)
        print(f"cold, parallel:        {cold_n:5d} images in {cold_s:7.2f} s = {cold_n / cold_s:7.2f} images/s")
        make_images(src, args.count, args.added, args.max_side)
        _, incr_s, incr_n = timed_run(src, root / "parallel", options, args.workers, previous=cold)
        print(f"incremental (+{args.added}):    {incr_n:5d} images in {incr_s:7.2f} s = {incr_n / incr_s:7.2f} images/s")
        print(f"incremental / cold time: {incr_s / cold_s:.2%} (target: under 5%)")
        print(f"parallel speed-up over one process: {single_s / cold_s:.2f}x "
              f"(pure-CPU control on this machine now: {cpu_control(args.workers):.2f}x)")


if __name__ == "__main__":
    main()
