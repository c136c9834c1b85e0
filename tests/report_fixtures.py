"""A small but complete set of report inputs on disk (tiny PNGs, a validation table, metrics with a best row,
tag frequencies, a manifest with skipped files), laid out as the pipeline lays out `data/<dataset>/`."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from PIL import Image, ImageDraw

from training.report import ReportInputs

HOSTILE_TAG = "<script>alert('tag')</script>"
HOSTILE_FILE = "bad <b>name</b> & co.png"
METRIC_STEPS = (10, 20, 30)
BEST_STEP = 20


def _picture(path: Path, size: tuple[int, int], colour: tuple[int, int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, (250, 250, 250))
    draw = ImageDraw.Draw(image)
    draw.rectangle((4, 4, size[0] // 2, size[1] - 4), fill=colour)
    draw.ellipse((size[0] // 2, 4, size[0] - 4, size[1] // 2), fill=(20, 20, 20))
    image.save(path)
    return path


def report_inputs(root: Path, *, dataset: str = "demo") -> ReportInputs:
    """Every input of the report, written under `root` (the dataset's data folder)."""
    grid = _picture(root / "evaluation_grid" / "pip_grid.png", (192, 128), (200, 40, 40))
    loss = _picture(root / "textual_inversion" / "loss.png", (160, 90), (40, 40, 200))
    validation = root / "textual_inversion" / "validation.csv"
    pd.DataFrame({"step": [10, 20, 30], "validation_loss": [0.30, 0.21, 0.25],
                  "training_loss": [0.33, 0.22, 0.18]}).to_csv(validation, index=False)
    metrics = root / "evaluation_metrics" / "metrics.parquet"
    metrics.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({
        "method": ["textual_inversion"] * 3,
        "step": list(METRIC_STEPS),
        "checkpoint": [f"checkpoints/pip-{step}.pt" for step in METRIC_STEPS],
        "training_loss": [0.33, 0.22, 0.18],
        "validation_loss": [0.30, 0.21, 0.25],
        "clip_image_similarity": [0.5, 0.7, float("nan")],
        "best": [step == BEST_STEP for step in METRIC_STEPS],
    }).to_parquet(metrics, index=False)
    tables = root / "tables"
    tables.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"tag": ["solo", HOSTILE_TAG, "smile", "blue sky"], "images": [4, 2, 2, 1],
                  "fraction": [1.0, 0.5, 0.5, 0.25], "dropped": [True, False, False, False]}
                 ).to_parquet(tables / "tag_frequency.parquet", index=False)
    pd.DataFrame({
        "source": ["a.png", "b.png", HOSTILE_FILE, "empty.png"],
        "output": ["a.png", "b.png", None, None],
        "status": ["processed", "reused", "skipped", "skipped"],
        "reason": [None, None, "corrupt: cannot identify image <file>", "zero-byte file"],
    }).to_parquet(tables / "prepared_manifest.parquet", index=False)
    return ReportInputs(
        dataset=dataset,
        base_model="models/tiny-sd",
        methods=("textual_inversion",),
        grids={"pip_grid": grid},
        loss_curves={"textual_inversion": loss},
        validation={"textual_inversion": validation},
        metrics=metrics,
        metrics_chart=_picture(root / "evaluation_metrics" / "metrics.png", (120, 80), (40, 160, 40)),
        settings={"captions": {"general_threshold": 0.35, "exclude_tags": [HOSTILE_TAG]},
                  "evaluation": {"prompts": ["a photo of [name] <i>"], "seeds": [1, 2]}},
        tag_frequency=tables / "tag_frequency.parquet",
        manifest=tables / "prepared_manifest.parquet",
    )
