"""Which checkpoint to keep: the seeds' advice ("if it overfits, go back to an earlier one") as rules over the
per-checkpoint metrics table, so a user reads the answer instead of squinting at curves.

The table has one row per evaluated checkpoint (a saved step), ordered by step, with `training_loss` (mean
training loss since the previous checkpoint), `validation_loss` (held-out images, fixed noise) and, when a
CLIP model is configured, `clip_image_similarity` / `clip_text_similarity` of the generated cells.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

# Checkpoints whose validation loss is within this fraction of the lowest are "as good"; CLIP then decides.
BEST_TOLERANCE = 0.05


def interval_means(loss_csv: Path, steps: Sequence[int]) -> list[float]:
    """Mean training loss over (previous step, step] for each checkpoint step: the loss *at* that checkpoint,
    without the noise of single steps (each step's loss depends on its random timestep)."""
    frame = pd.read_csv(loss_csv)
    means, previous = [], 0
    for step in steps:
        window = frame.loc[(frame["step"] > previous) & (frame["step"] <= step), "loss"]
        means.append(float(window.mean()) if len(window) else float("nan"))
        previous = step
    return means


def overfitting_run(training: Sequence[float], validation: Sequence[float]) -> int:
    """How many of the latest consecutive evaluations had the validation loss rise while the training loss fell."""
    run = 0
    for index in range(len(validation) - 1, 0, -1):
        if validation[index] > validation[index - 1] and training[index] < training[index - 1]:
            run += 1
        else:
            break
    return run


def best_row(metrics: pd.DataFrame, tolerance: float = BEST_TOLERANCE) -> int:
    """The position of the checkpoint to keep: the lowest validation loss (training loss without a validation
    split); among those within `tolerance` of it, the highest CLIP image similarity when it was measured."""
    if metrics.empty:
        raise ValueError("no checkpoints were evaluated")
    column = "validation_loss" if metrics.get("validation_loss", pd.Series(dtype=float)).notna().any() else "training_loss"
    losses = metrics[column].to_numpy(dtype=float)
    if not np.isfinite(losses).any():
        return len(metrics) - 1
    lowest = np.nanmin(np.where(np.isfinite(losses), losses, np.nan))
    close = np.flatnonzero(np.isfinite(losses) & (losses <= lowest + abs(lowest) * tolerance))
    clip = metrics.get("clip_image_similarity")
    if clip is not None and clip.iloc[close].notna().any():
        return int(close[int(np.nanargmax(clip.iloc[close].to_numpy(dtype=float)))])
    return int(close[int(np.argmin(losses[close]))])
