"""The embedded default: tiny models and a demo dataset the project builds itself, offline and deterministic.

They have the same file layout and I/O contract as the real ones (a diffusers SD 1.x folder, a WD14 tagger
folder, a dataset folder with dataset.yaml), so every loading path the pipeline uses is exercised on them.
"""

from __future__ import annotations

from pathlib import Path

TINY_SD = "models/tiny-sd"
TINY_WD14 = "models/tiny-wd14"
TINY_BLIP = "models/tiny-blip"
TINY_CLIP = "models/tiny-clip"
DEMO_DATASET = "datasets/demo"


def build_missing(root: Path) -> dict[str, Path]:
    """Build whichever of the tiny SD model, the tiny tagger, the tiny BLIP captioner, the tiny CLIP and the demo
    dataset is not there yet."""
    # Imported here so that importing one builder does not pull in torch, diffusers and onnx for all.
    from embedded.demo_dataset import build_demo_dataset
    from embedded.tiny_blip import build_tiny_blip
    from embedded.tiny_clip import build_tiny_clip
    from embedded.tiny_sd import build_tiny_sd
    from embedded.tiny_wd14 import build_tiny_wd14

    builders = {TINY_SD: build_tiny_sd, TINY_WD14: build_tiny_wd14, TINY_BLIP: build_tiny_blip,
                TINY_CLIP: build_tiny_clip, DEMO_DATASET: build_demo_dataset}
    built = {}
    for relative, build in builders.items():
        target = root / relative
        if not target.exists():
            build(target)
            built[relative] = target
    return built
