"""Demo base model benchmark: does text-conditioned generation draw what the prompt asks for?

Run from the project root: `PYTHONPATH=. .venv/bin/python -m bench.demo_base [--model models/demo-base]
[--tagger models/demo-tagger] [--seeds 8] [--steps 20] [--cfg 5]`

For each prompt (a coloured shape on a coloured simple background, each base character, and the demo concept
described by its parts as the base model's figures are captioned), images are
generated with the evaluation grid's own pipeline (training.evaluation.build_pipeline, DPM-Solver) and tagged
by the demo tagger through the project's WD14 loader. A prompt counts as recognised in an image when the tagger
scores its asked tags above the caption thresholds (general 0.35, character 0.85). The same images generated
from the empty prompt give the chance level: how often the asked tags show up when nothing is asked.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import torch

from embedded.demo_world import BASE_CHARACTERS, DEMO_CONCEPT, caption_of, character
from tagging.captions import DEFAULT_THRESHOLDS
from tagging.categories import CHARACTER_CATEGORY
from tagging.wd14 import WD14Tagger
from training.base_model import load_base_model
from training.evaluation import build_pipeline

SHAPE_PROMPTS = (
    ("red", "circle", "blue"), ("blue", "square", "yellow"), ("yellow", "star", "purple"),
    ("green", "triangle", "white"), ("purple", "ring", "orange"), ("orange", "square", "green"),
    ("pink", "circle", "black"), ("white", "star", "red"),
)


@dataclass(frozen=True)
class Probe:
    prompt: str
    asked: tuple[str, ...]  # tags that must all be recognised


def probes() -> list[Probe]:
    found = [Probe(caption_of([f"{c}_{s}", s, "1_shape", f"{b}_background", "simple_background"]),
                   (f"{c}_{s}",)) for c, s, b in SHAPE_PROMPTS]
    found += [Probe(caption_of([name, "solo", "simple_background"]), (name,)) for name in BASE_CHARACTERS]
    # The demo concept described by its parts, as the base model's figures are captioned: it was never drawn
    # under any caption, so this shows whether the model composes characters (what textual inversion needs).
    zuzu = character(DEMO_CONCEPT)
    found.append(Probe(caption_of([f"{zuzu.body_colour}_{zuzu.body}", f"{zuzu.head_colour}_{zuzu.head}",
                                   zuzu.accessory, "solo", "simple_background"]), (DEMO_CONCEPT,)))
    return found


def recognised(scores: np.ndarray, names: list[str], categories: list[int], asked: tuple[str, ...]) -> np.ndarray:
    thresholds = DEFAULT_THRESHOLDS["wd14"]
    ok = np.ones(len(scores), dtype=bool)
    for tag in asked:
        column = names.index(tag)
        threshold = thresholds["character"] if categories[column] == CHARACTER_CATEGORY else thresholds["general"]
        ok &= scores[:, column] > threshold
    return ok


def generate_images(pipeline, prompt: str, seeds: int, *, steps: int, cfg: float) -> list:
    """One 64 px image per seed 0..seeds-1, each from its own CPU generator (the grid's seeding)."""
    return [pipeline(prompt, num_inference_steps=steps, guidance_scale=cfg, height=64, width=64,
                     generator=torch.Generator().manual_seed(seed)).images[0] for seed in range(seeds)]


def tag_images(tagger: WD14Tagger, images: list) -> np.ndarray:
    return tagger.predict(np.stack([tagger.preprocess(image) for image in images]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/demo-base")
    parser.add_argument("--tagger", default="models/demo-tagger")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--save", default="", help="write a contact sheet PNG here")
    args = parser.parse_args()

    base = load_base_model(args.model)
    pipeline = build_pipeline(base, "dpm")
    tagger = WD14Tagger(args.tagger)
    names = [tag.name for tag in tagger.tags]
    categories = [tag.category for tag in tagger.tags]
    started = time.perf_counter()

    def generate(prompt: str) -> list:
        return generate_images(pipeline, prompt, args.seeds, steps=args.steps, cfg=args.cfg)

    unconditional = tag_images(tagger, generate(""))
    sheet = []
    hits = chance = total = 0
    print(f"{'prompt':70s} recognised  chance")
    for probe in probes():
        images = generate(probe.prompt)
        sheet.append(images)
        found = recognised(tag_images(tagger, images), names, categories, probe.asked)
        base_rate = recognised(unconditional, names, categories, probe.asked)
        hits += int(found.sum())
        chance += int(base_rate.sum())
        total += len(found)
        print(f"{probe.prompt[:70]:70s} {found.sum():3d}/{len(found):<3d}    {base_rate.sum():3d}/{len(found)}")
    print(f"\nall prompts: recognised in {hits}/{total} images ({hits / total:.0%}); "
          f"chance (empty prompt) {chance}/{total} ({chance / total:.0%}); "
          f"{time.perf_counter() - started:.0f}s")
    if args.save:
        from PIL import Image

        canvas = Image.new("RGB", (64 * args.seeds, 64 * len(sheet)))
        for row, images in enumerate(sheet):
            for column, image in enumerate(images):
                canvas.paste(image, (64 * column, 64 * row))
        canvas.save(args.save)
        print(f"contact sheet: {args.save}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
