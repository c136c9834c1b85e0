"""Tagging benchmark: does `tag_scores` keep the model busy, and is a caption-setting change free?

Run from the project root: `PYTHONPATH=. .venv/bin/python -m bench.tagging [--images 1000] [--side 448] [--cached 10000]`
(as a module: run as a script, this file would shadow the `tagging` package)

It builds, in a temporary folder, a CPU-sized WD14-contract tagger (a random-weight ConvNeXt-atto-sized
network exported with torch.onnx at `--side` px, dynamic batch, 1,000 tags) and `--images` JPEGs, then reports:

  (a) the model's raw throughput on pre-made tensors (the ceiling),
  (b) our end-to-end throughput (score_with_cache: decode + preprocess in workers, overlapped with inference),
  (c) a naive loop that opens, preprocesses and runs one image at a time,
  (d) the cost of a threshold change on `--cached` cached images (read the score table + build every caption).

Ratios (b/a and b/c) come from one run on the same machine.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from tagging.captions import CaptionOptions, build_captions
from tagging.images import load_rgb
from tagging.inference_pipeline import default_workers
from tagging.score_cache import ImageToScore, ScoreStore, score_with_cache
from tagging.wd14 import WD14Tagger

TAGS = 1000


def build_convnext_tagger(folder: Path, *, side: int, tags: int = TAGS, seed: int = 0) -> Path:
    """A ConvNeXt-atto-sized tagger (stages of 2, 2, 6, 2 blocks, widths 40-320; the block layout of the
    ConvNeXt WD14 models, about 1/25 of their compute) with random weights and the SmilingWolf I/O contract
    (NHWC BGR 0-255 in, sigmoid scores out), exported with a dynamic batch like the v3 models."""
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class Block(nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.depthwise = nn.Conv2d(width, width, 7, padding=3, groups=width)
            self.norm = nn.LayerNorm(width)
            self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.depthwise(x).permute(0, 2, 3, 1)
            return x + self.mlp(self.norm(y)).permute(0, 3, 1, 2)

    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            widths, depths = [40, 80, 160, 320], [2, 2, 6, 2]
            layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 4, stride=4)]
            for stage, (width, depth) in enumerate(zip(widths, depths)):
                if stage:
                    layers.append(nn.Conv2d(widths[stage - 1], width, 2, stride=2))
                layers += [Block(width) for _ in range(depth)]
            self.features = nn.Sequential(*layers)
            self.norm = nn.LayerNorm(widths[-1])
            self.head = nn.Linear(widths[-1], tags)

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            x = pixels.permute(0, 3, 1, 2) / 255.0
            return torch.sigmoid(self.head(self.norm(self.features(x).mean(dim=(2, 3)))))

    folder.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        Tagger().eval(), (torch.zeros(1, side, side, 3),), str(folder / "model.onnx"),
        input_names=["input_1:0"], output_names=["predictions_sigmoid"],
        dynamic_axes={"input_1:0": {0: "batch"}, "predictions_sigmoid": {0: "batch"}}, dynamo=False,
    )
    categories = [9] * 4 + [0] * (tags - 104) + [4] * 100
    rows = [f"{i},tag_{i},{category},0" for i, category in enumerate(categories)]
    (folder / "selected_tags.csv").write_text("tag_id,name,category,count\n" + "\n".join(rows) + "\n")
    return folder


def write_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """Photo-sized JPEGs (640 x 480 and portrait 480 x 640) with some structure, so decoding costs what it does."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    base = rng.integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
    paths = []
    for index in range(count):
        pixels = np.roll(base, index * 7, axis=1) // 2 + rng.integers(0, 128, size=3, dtype=np.uint8)
        image = Image.fromarray(pixels if index % 2 else pixels.transpose(1, 0, 2).copy())
        path = folder / f"{index:05d}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return paths


def raw_throughput(tagger: WD14Tagger, count: int, batch_size: int) -> float:
    pixels = np.random.default_rng(0).uniform(0, 255, (batch_size, tagger.input_size, tagger.input_size, 3))
    pixels = pixels.astype(np.float32)
    tagger.predict(pixels)  # warm-up
    started = time.perf_counter()
    for _ in range(count // batch_size):
        tagger.predict(pixels)
    return (count // batch_size) * batch_size / (time.perf_counter() - started)


def end_to_end(tagger: WD14Tagger, paths: list[Path], store_dir: Path, batch_size: int, workers: int) -> float:
    images = [ImageToScore(name=path.name, path=path, sha256=f"{index:064d}") for index, path in enumerate(paths)]
    started = time.perf_counter()
    score_with_cache(tagger, images, ScoreStore(store_dir, tagger.fingerprint, 0.01), batch_size=batch_size,
                     workers=workers)
    return len(paths) / (time.perf_counter() - started)


def naive(tagger: WD14Tagger, paths: list[Path]) -> float:
    started = time.perf_counter()
    for path in paths:
        tagger.predict(tagger.preprocess(load_rgb(path))[None])
    return len(paths) / (time.perf_counter() - started)


def cached_scores(images: int, vocabulary: int = 10_000, per_image: int = 60, seed: int = 0) -> pd.DataFrame:
    """A score table shaped like a real WD14 run above a 0.01 floor: ~60 of 10,000 tags per image."""
    rng = np.random.default_rng(seed)
    names = np.array([f"tag_{i}" for i in range(vocabulary)], dtype=object)
    categories = np.where(np.arange(vocabulary) < 4, 9, np.where(np.arange(vocabulary) >= vocabulary - 500, 4, 0))
    popular = rng.zipf(1.3, size=images * per_image) % vocabulary
    frame = pd.DataFrame({"image_index": np.repeat(np.arange(images), per_image), "tag_index": popular})
    frame = frame.drop_duplicates().reset_index(drop=True)
    image_names = [f"{i:05d}.png" for i in range(images)]
    return pd.DataFrame({
        "image": pd.Categorical.from_codes(frame["image_index"], categories=image_names),
        "tag": pd.Categorical.from_codes(frame["tag_index"], categories=names),
        "category": categories[frame["tag_index"]].astype(np.int32),
        "score": rng.beta(0.5, 2.0, size=len(frame)).astype(np.float32),
    })


def threshold_change(images: int, folder: Path) -> dict[str, float]:
    path = folder / "tag_scores.parquet"
    cached_scores(images).to_parquet(path)
    timings = {}
    variants = {
        "threshold only": CaptionOptions(0.5, 0.85),
        "every option": CaptionOptions(
            0.35, 0.85, general_mcut=True, max_tags=30, include_rating=True, character_first=True,
            exclude_tags=("tag_5",), exclude_regex=("tag_1.*7",), replace_tags={"tag_9": "nine"},
            always_first=("tag_4",), keep_tokens=1, drop_frequent_above=0.5, existing_caption="prepend"),
    }
    for label, options in variants.items():
        started = time.perf_counter()
        scores = pd.read_parquet(path)
        build_captions(scores, options, existing={"00001.png": "a photo"})
        timings[label] = time.perf_counter() - started
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--side", type=int, default=448)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=0, help="decoding processes; 0: cores - 1")
    parser.add_argument("--cached", type=int, default=10_000, help="images in the threshold-change test")
    args = parser.parse_args()
    workers = args.workers or default_workers()
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        tagger = WD14Tagger(build_convnext_tagger(root / "tagger", side=args.side))
        paths = write_images(root / "images", args.images)
        print(f"{args.images} images, {args.side} px ConvNeXt-atto-sized tagger with {TAGS} tags on {tagger.provider}, "
              f"batch {args.batch_size}, {workers} decoding workers")
        a = raw_throughput(tagger, args.images, args.batch_size)
        b = end_to_end(tagger, paths, root / "store", args.batch_size, workers)
        c = naive(tagger, paths)
        print(f"(a) raw model on pre-made tensors: {a:8.1f} images/s")
        print(f"(b) end-to-end tag_scores:         {b:8.1f} images/s   b/a = {b / a:.2f}")
        print(f"(c) naive one-at-a-time loop:      {c:8.1f} images/s   b/c = {b / c:.2f}")
        for label, seconds in threshold_change(args.cached, root).items():
            print(f"(d) caption change on {args.cached} cached images ({label}): {seconds * 1000:.0f} ms")


if __name__ == "__main__":
    main()
