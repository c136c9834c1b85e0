"""Demo tagger benchmark: precision and recall of models/demo-tagger against the demo world's true tags.

Run from the project root: `PYTHONPATH=. .venv/bin/python -m bench.demo_tagger [--model models/demo-tagger]
[--images 1000] [--seed 2000] [--min-side 64] [--max-side 512]`

The held-out images come from another world seed than the training images (2000 vs 1000) and are rendered at
mixed sizes, then tagged through the project's own WD14 loader (tagging.wd14.WD14Tagger: its preprocessing,
its ONNX session). A tag counts as predicted when its score is above the caption stage's default threshold
for its category (tagging.captions.DEFAULT_THRESHOLDS["wd14"]: general 0.35, character 0.85). Printed: one
row per tag (support, predicted, precision, recall), then micro-averaged precision and recall over the
attribute (general) tags, the character tags, and all of them.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedded.demo_tagger import tag_targets
from embedded.demo_world import ALL_CHARACTERS, world_images
from tagging.captions import DEFAULT_THRESHOLDS
from tagging.categories import CHARACTER_CATEGORY, GENERAL_CATEGORY
from tagging.wd14 import WD14Tagger

HELD_OUT_SEED = 2000


@dataclass(frozen=True)
class Counts:
    true_positive: int
    false_positive: int
    false_negative: int

    @property
    def precision(self) -> float:
        predicted = self.true_positive + self.false_positive
        return self.true_positive / predicted if predicted else float("nan")

    @property
    def recall(self) -> float:
        actual = self.true_positive + self.false_negative
        return self.true_positive / actual if actual else float("nan")


def predictions(tagger: WD14Tagger, scores: np.ndarray) -> np.ndarray:
    """(N, tags) bool: above the caption stage's default threshold of each tag's category."""
    defaults = DEFAULT_THRESHOLDS["wd14"]
    thresholds = np.array(
        [defaults["character"] if tag.category == CHARACTER_CATEGORY else defaults["general"] for tag in tagger.tags],
        dtype=np.float32,
    )
    return scores > thresholds


def counts(predicted: np.ndarray, truth: np.ndarray) -> list[Counts]:
    """Per tag (column) true positives, false positives and false negatives."""
    actual = truth > 0.5
    return [
        Counts(int((p & a).sum()), int((p & ~a).sum()), int((~p & a).sum()))
        for p, a in zip(predicted.T, actual.T)
    ]


def micro(rows: list[Counts]) -> Counts:
    return Counts(*(sum(getattr(row, field) for row in rows) for field in ("true_positive", "false_positive",
                                                                             "false_negative")))


def evaluate(model: Path, *, images: int, seed: int, sides: tuple[int, int], batch: int = 64
             ) -> tuple[WD14Tagger, list[Counts]]:
    tagger = WD14Tagger(model)
    names = [tag.name for tag in tagger.tags]
    truth_rows, score_rows = [], []
    for start in range(0, images, batch):
        chunk = list(world_images(seed, min(batch, images - start), start=start, side=sides,
                                  characters=ALL_CHARACTERS))
        truth_rows.append(tag_targets(chunk, names))
        score_rows.append(tagger.predict(np.stack([tagger.preprocess(item.image) for item in chunk])))
    truth, scores = np.concatenate(truth_rows), np.concatenate(score_rows)
    return tagger, counts(predictions(tagger, scores), truth)


def report(tagger: WD14Tagger, rows: list[Counts]) -> str:
    lines = [f"{'tag':<24} {'cat':>3} {'support':>7} {'predicted':>9} {'precision':>9} {'recall':>7}"]
    for tag, row in zip(tagger.tags, rows):
        support = row.true_positive + row.false_negative
        lines.append(f"{tag.name:<24} {tag.category:>3} {support:>7} {row.true_positive + row.false_positive:>9} "
                     f"{row.precision:>9.3f} {row.recall:>7.3f}")
    lines.append("")
    groups = {
        "attribute (general) tags": [r for t, r in zip(tagger.tags, rows) if t.category == GENERAL_CATEGORY],
        "character tags": [r for t, r in zip(tagger.tags, rows) if t.category == CHARACTER_CATEGORY],
        "all tags": rows,
    }
    for label, group in groups.items():
        total = micro(group)
        lines.append(f"micro-averaged, {label:<25} precision {total.precision:.3f}  recall {total.recall:.3f}  "
                     f"({len(group)} tags, {total.true_positive + total.false_negative} true labels)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/demo-tagger"))
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=HELD_OUT_SEED)
    parser.add_argument("--min-side", type=int, default=64)
    parser.add_argument("--max-side", type=int, default=512)
    args = parser.parse_args()
    tagger, rows = evaluate(args.model, images=args.images, seed=args.seed, sides=(args.min_side, args.max_side))
    print(f"{args.images} held-out world images (seed {args.seed}, {args.min_side}-{args.max_side} px), "
          f"model {args.model}")
    print(report(tagger, rows))


if __name__ == "__main__":
    main()
