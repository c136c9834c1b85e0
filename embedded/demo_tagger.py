"""The demo tagger: a small CNN trained on the demo world (embedded/demo_world.py) to predict the world's tag
vocabulary, exported with the WD14 contract so the tagging stage loads it unchanged.

Why trained, not hand-set like tiny-wd14: the demo must show that tags are *right* (precision/recall against the
world's true tags, bench/demo_tagger.py) and later score generated images for the demo concept; only a model
that has learnt the world's shapes, colours, textures and characters can do that.

Contract (what tagging/wd14.py loads): a folder with `model.onnx` (input `input_1:0`, (N, 64, 64, 3) float32
BGR 0-255, as `tagging.pixels.wd14_pixels` prepares it; output: one sigmoid score per tag) and
`selected_tags.csv` (tag_id,name,category,count; count = training images carrying the tag). The training
images go through that same `wd14_pixels`, so the model sees at training time exactly what it sees when tagging.

Reproducible: the world is a function of its seed, the weights start from a fixed torch seed, batches come
from a seeded numpy generator, torch runs deterministic algorithms on a fixed number of threads. Same machine
and torch build -> the same bytes. `python -m embedded.demo_tagger [OUT_DIR]` rebuilds it.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.atomic import write_text
from common.hashing import file_sha256, json_sha256
from embedded.demo_world import ALL_CHARACTERS, WorldImage, vocabulary, world_images
from embedded.staging import staged_folder
from embedded.wd14_export import export_wd14_onnx, tags_csv
from tagging.pixels import wd14_pixels

TAGGER_SIDE = 64
TRAIN_WORLD_SEED = 1000  # the training images are world 1000; the benchmark holds out world 2000
BUILD_FILE = "build.json"  # what the folder was built from (settings + source hash), for rebuild decisions
SOURCES = ("embedded/demo_world.py", "embedded/demo_tagger.py", "embedded/wd14_export.py", "tagging/pixels.py")


@dataclass(frozen=True)
class TaggerSettings:
    """Everything the weights depend on besides the source code."""

    seed: int = 0  # torch initialisation and batch order
    world_seed: int = TRAIN_WORLD_SEED
    images: int = 8000
    sides: tuple[int, int] = (64, 128)  # each training image is rendered at a side in this range
    character_probability: float = 0.35
    epochs: int = 8
    batch_size: int = 64
    learning_rate: float = 4e-3
    weight_decay: float = 1e-4
    threads: int = 1  # fixed: one order of sums on any machine; 2 threads ran 7x slower on shared cores
    widths: tuple[int, int, int, int] = (16, 32, 64, 128)
    # Half the batches are blurred by a Gaussian of sigma up to this many pixels (at 64 px): generated images
    # are softer than drawn ones (the demo base model's VAE blurs edges), and the tagger judges those too.
    blur_probability: float = 0.5
    max_blur_sigma: float = 1.5


class DemoTaggerNet(nn.Module):
    """Four conv stages (64 -> 32 -> 16 -> 8 px), then mean- and max-pooled features into one linear layer.
    Max pooling answers "is there a red circle anywhere", mean pooling "how much of it" (counts)."""

    def __init__(self, tags: int, widths: Sequence[int] = TaggerSettings.widths) -> None:
        super().__init__()
        a, b, c, d = widths

        def conv(inputs: int, outputs: int, stride: int = 1) -> list[nn.Module]:
            return [nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU()]

        self.features = nn.Sequential(
            *conv(3, a), *conv(a, b, 2), *conv(b, b), nn.MaxPool2d(2),
            *conv(b, c), nn.MaxPool2d(2), *conv(c, d), *conv(d, d),
        )
        self.head = nn.Linear(2 * d, tags)

    def logits(self, rgb: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) RGB scaled to -1..1 -> (N, tags) logits (what training optimises)."""
        features = self.features(rgb)
        return self.head(torch.cat([features.mean(dim=(2, 3)), features.amax(dim=(2, 3))], dim=1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """The WD14 contract: (N, H, W, 3) BGR 0-255 -> (N, tags) sigmoid scores."""
        return torch.sigmoid(self.logits(to_network_input(pixels)))


def to_network_input(pixels: torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) BGR 0-255 -> (N, 3, H, W) RGB -1..1."""
    return torch.flip(pixels, dims=[3]).permute(0, 3, 1, 2) / 127.5 - 1.0


def gaussian_blur(batch: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur (N, 3, H, W) with a separable Gaussian of `sigma` pixels, edges replicated."""
    radius = max(1, int(math.ceil(3 * sigma)))
    offsets = torch.arange(-radius, radius + 1, dtype=batch.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).repeat(batch.shape[1], 1, 1, 1)
    padded = nn.functional.pad(batch, (radius, radius, radius, radius), mode="replicate")
    rows = nn.functional.conv2d(padded, kernel.view(batch.shape[1], 1, 1, -1), groups=batch.shape[1])
    return nn.functional.conv2d(rows, kernel.view(batch.shape[1], 1, -1, 1), groups=batch.shape[1])


def tagger_pixels(images: Sequence[WorldImage], side: int = TAGGER_SIDE) -> np.ndarray:
    """(N, side, side, 3) uint8 BGR, through the loader's own preprocessing (tagging.pixels.wd14_pixels)."""
    return np.stack([wd14_pixels(item.image, side) for item in images])


def tag_targets(images: Sequence[WorldImage], names: Sequence[str]) -> np.ndarray:
    """(N, len(names)) float32 multi-hot truth from the images' tags."""
    column = {name: i for i, name in enumerate(names)}
    targets = np.zeros((len(images), len(names)), dtype=np.float32)
    for row, item in enumerate(images):
        unknown = [tag for tag in item.tags if tag not in column]
        if unknown:
            raise ValueError(f"world image {item.seed}/{item.index} has tags outside the vocabulary: {unknown}")
        targets[row, [column[tag] for tag in item.tags]] = 1.0
    return targets


@contextmanager
def deterministic_torch(seed: int, threads: int) -> Iterator[None]:
    """Seed torch, force deterministic kernels and a fixed thread count for the block; restore all after, so a
    caller's (or a test session's) own torch settings are left as they were."""
    threads_before = torch.get_num_threads()
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(deterministic_before)
            torch.set_num_threads(threads_before)


def train_tagger(
    pixels: np.ndarray,
    targets: np.ndarray,
    settings: TaggerSettings,
    *,
    max_steps: int | None = None,
    log: Callable[[str], None] | None = None,
) -> DemoTaggerNet:
    """Train a DemoTaggerNet with BCE on (N, S, S, 3) BGR uint8 `pixels` and (N, tags) `targets`; AdamW with a
    one-cycle schedule over `settings.epochs` (or stop after `max_steps`, for smoke tests). Returns it in eval
    mode."""
    if len(pixels) != len(targets) or len(pixels) == 0:
        raise ValueError(f"train_tagger needs as many targets as images (got {len(pixels)} and {len(targets)})")
    with deterministic_torch(settings.seed, settings.threads):
        model = DemoTaggerNet(targets.shape[1], settings.widths)
        inputs = torch.from_numpy(pixels)  # uint8; each batch is converted when drawn (a quarter of the memory)
        truth = torch.from_numpy(targets)
        steps_per_epoch = max(1, len(pixels) // settings.batch_size)
        total = steps_per_epoch * settings.epochs
        optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate,
                                      weight_decay=settings.weight_decay)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings.learning_rate, total_steps=total)
        order = np.random.default_rng([settings.seed, 7])
        model.train()
        step = 0
        for epoch in range(settings.epochs):
            permutation = torch.from_numpy(order.permutation(len(pixels)))
            running = 0.0
            for batch in range(steps_per_epoch):
                chosen = permutation[batch * settings.batch_size : (batch + 1) * settings.batch_size]
                network_input = to_network_input(inputs[chosen].float())
                if order.random() < settings.blur_probability:
                    network_input = gaussian_blur(network_input, float(order.uniform(0.3, settings.max_blur_sigma)))
                logits = model.logits(network_input)
                loss = nn.functional.binary_cross_entropy_with_logits(logits, truth[chosen])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                running += float(loss.detach())
                step += 1
                if max_steps is not None and step >= max_steps:
                    return model.eval()
            if log is not None:
                log(f"epoch {epoch + 1}/{settings.epochs}: mean BCE {running / steps_per_epoch:.4f}")
        return model.eval()


def source_hash(root: Path = Path(__file__).resolve().parents[1]) -> str:
    """Hash of the code the weights come from: a changed world or tagger means a stale build."""
    return json_sha256([file_sha256(root / relative) for relative in SOURCES])


def build_record(settings: TaggerSettings) -> dict[str, object]:
    return {"settings": asdict(settings), "sources": source_hash(), "torch": torch.__version__}


def is_current(out_dir: Path, settings: TaggerSettings = TaggerSettings()) -> bool:
    """True when `out_dir` holds a build of these settings from the current code."""
    try:
        recorded = json.loads((Path(out_dir) / BUILD_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return False
    return recorded == json.loads(json.dumps(build_record(settings)))


def build_demo_tagger(
    out_dir: Path,
    settings: TaggerSettings = TaggerSettings(),
    *,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Render the training world, train the tagger, and write `model.onnx`, `selected_tags.csv` and
    `build.json` into the new folder `out_dir` (staged beside it and renamed into place)."""
    say = log or (lambda message: None)
    started = time.perf_counter()
    images = list(world_images(settings.world_seed, settings.images, side=settings.sides,
                               characters=ALL_CHARACTERS, character_probability=settings.character_probability))
    tags = vocabulary()
    names = [name for name, _ in tags]
    pixels, targets = tagger_pixels(images), tag_targets(images, names)
    say(f"rendered {len(images)} world images in {time.perf_counter() - started:.1f}s")
    trained_at = time.perf_counter()
    model = train_tagger(pixels, targets, settings, log=say)
    say(f"trained in {time.perf_counter() - trained_at:.1f}s")
    counts = targets.sum(axis=0).astype(int)
    with staged_folder(Path(out_dir), "demo tagger") as staging:
        staging.mkdir()
        with deterministic_torch(settings.seed, settings.threads):
            export_wd14_onnx(model, staging / "model.onnx", side=TAGGER_SIDE)
        write_text(staging / "selected_tags.csv",
                   tags_csv([(name, category, int(count)) for (name, category), count in zip(tags, counts)]))
        write_text(staging / BUILD_FILE, json.dumps(build_record(settings), indent=2, sort_keys=True) + "\n")
    say(f"demo tagger written to {out_dir} in {time.perf_counter() - started:.1f}s")
    return Path(out_dir)


def main(argv: list[str]) -> int:
    out_dir = Path(argv[0]) if argv else Path(__file__).resolve().parents[1] / "models" / "demo-tagger"
    build_demo_tagger(out_dir, log=lambda message: print(message, flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
