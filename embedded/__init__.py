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
DEMO_TAGGER = "models/demo-tagger"  # trained on the demo world (embedded/demo_tagger.py), not random
# Trained on the demo world by `python -m embedded.demo_base` (most of an hour on one core: too long for setup, so
# shipped in git; `python -m embedded.demo_base --verify` rebuilds it and compares the bytes).
DEMO_BASE = "models/demo-base"
WORLD_DATASET = "datasets/zuzu"  # the demo world's new concept, what `make demo` trains


def build_missing(root: Path, *, trained: bool = False) -> dict[str, Path]:
    """Build whichever of the tiny SD model, the tiny tagger, the tiny BLIP captioner, the tiny CLIP, the demo
    dataset and the demo world's dataset is not there yet; with `trained`, also the models trained on the demo world (minutes, not seconds,
    so test sessions leave them out), rebuilt when their build record no longer matches the code."""
    # Imported here so that importing one builder does not pull in torch, diffusers and onnx for all.
    from embedded.demo_dataset import build_demo_dataset
    from embedded.tiny_blip import build_tiny_blip
    from embedded.tiny_clip import build_tiny_clip
    from embedded.tiny_sd import build_tiny_sd
    from embedded.tiny_wd14 import build_tiny_wd14
    from embedded.world_dataset import build_world_dataset

    builders = {TINY_SD: build_tiny_sd, TINY_WD14: build_tiny_wd14, TINY_BLIP: build_tiny_blip,
                TINY_CLIP: build_tiny_clip, DEMO_DATASET: build_demo_dataset, WORLD_DATASET: build_world_dataset}
    built = {}
    for relative, build in builders.items():
        target = root / relative
        if not target.exists():
            build(target)
            built[relative] = target
    if trained:
        built.update(_build_stale_trained(root))
    return built


def _build_stale_trained(root: Path) -> dict[str, Path]:
    import shutil

    from embedded.demo_tagger import BUILD_FILE, build_demo_tagger, is_current

    target = root / DEMO_TAGGER
    if is_current(target):
        return {}
    if target.exists():
        ours = {"model.onnx", "selected_tags.csv", BUILD_FILE}
        foreign = sorted(p.name for p in target.iterdir() if p.name not in ours)
        if foreign:
            raise FileExistsError(f"{target} is out of date but holds files the demo tagger build did not write "
                                  f"({', '.join(foreign[:5])}); move them away to rebuild it")
        shutil.rmtree(target)
    build_demo_tagger(target, log=lambda message: print(message, flush=True))
    return {DEMO_TAGGER: target}
