"""The demo world's dataset: images of the one character the demo base model was never trained on.

Why: `make demo` should show an embedding being learned, so its dataset is a concept the base model cannot
draw yet (`DEMO_CONCEPT`), drawn in varied scenes of the same world the base model and the demo tagger know.
The images carry no captions: the pipeline tags them with the demo tagger, as it would a user's folder.
"""

from __future__ import annotations

from pathlib import Path

from embedded.demo_world import DEMO_CONCEPT, concept_images
from embedded.staging import staged_folder

WORLD_SEED = 4000  # base model: world 3000; tagger: 1000 (held out: 2000)
EMBEDDING_NAME = "zuzu"

WORLD_DATASET_YAML = f"""\
# The demo world's new concept, {DEMO_CONCEPT}, drawn by embedded/world_dataset.py. The demo base model
# (models/demo-base) has never seen it; `make demo` teaches it as a textual-inversion embedding and the demo
# tagger (models/demo-tagger) scores how much of it the generated images show.

preprocess:
  size: 64             # the demo base model works at 64x64 (SD 1.5: 512)
  flip: true

tagging:
  tagger: wd14         # make demo points the tagger resource at models/demo-tagger

captions:
  exclude_tags: ["{DEMO_CONCEPT}"]   # the concept is [name], not a caption word

training:
  embedding_name: {EMBEDDING_NAME}
  initialization_text: character
  # 6 vectors, as many tokens as a base character's name (`bolt \\(world\\)`): the caption's other tags then
  # sit where the base model's small text encoder learned to read them (with 2, the background colours were lost)
  vectors_per_token: 6
  # A slow first 50 steps, so the first checkpoints show the base model before the concept forms
  learning_rate: "0.0005:50, 0.005"
  batch_size: 8
  max_steps: 150
  template: tags       # "[name], [filewords]": the base model was trained on tag captions, not sentences
  save_embedding_every: 25

evaluation:
  prompts:
    - "[name], solo, blue background, simple background"
    - "[name], hat, solo, pink background, gradient background"
  seeds: [1, 2]
  steps: 20
  cfg_scale: 5
  tagger_scores: true  # the demo tagger's concept tags on the generated images, per checkpoint
"""


def build_world_dataset(out_dir: Path, *, count: int = 40, side: int = 96, seed: int = WORLD_SEED) -> Path:
    """Write `count` PNGs of the demo concept and its dataset.yaml into the new folder `out_dir`."""
    if count < 1:
        raise ValueError(f"world dataset count must be at least 1, got {count}")
    with staged_folder(Path(out_dir), "demo world dataset") as staging:
        staging.mkdir()
        for item in concept_images(seed, count, side=side):
            item.image.save(staging / f"{EMBEDDING_NAME}_{item.index:03d}.png", format="PNG")
        (staging / "dataset.yaml").write_text(WORLD_DATASET_YAML, encoding="utf-8")
    return Path(out_dir)
