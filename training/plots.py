"""The training-loss chart: raw per-step loss is noisy (random timesteps), so a moving average shows the trend.

Drawn on a bare matplotlib Figure with the Agg canvas, not pyplot, so concurrent runs in one process share
no global figure state and nothing needs a display.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from common.atomic import atomic_path


def _read_losses(csv_or_losses: str | os.PathLike[str] | Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(csv_or_losses, (str, os.PathLike)):
        path = Path(csv_or_losses)
        try:
            frame = pd.read_csv(path)
        except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
            raise ValueError(f"{path}: cannot read the loss table ({error})") from error
        if not {"step", "loss"} <= set(frame.columns):
            raise ValueError(f"{path}: the loss table needs 'step' and 'loss' columns, found {list(frame.columns)}")
        try:
            return frame["step"].to_numpy(dtype=float), frame["loss"].to_numpy(dtype=float)
        except ValueError as error:
            raise ValueError(f"{path}: the loss table's step and loss columns must be numbers ({error})") from error
    losses = np.asarray(list(csv_or_losses), dtype=float)
    return np.arange(1, len(losses) + 1, dtype=float), losses


def _read_rates(csv_or_losses: str | os.PathLike[str] | Sequence[float]) -> np.ndarray | None:
    """The learning_rate column of a loss table, when it has one (the trainer's loss.csv does)."""
    if not isinstance(csv_or_losses, (str, os.PathLike)):
        return None
    frame = pd.read_csv(Path(csv_or_losses))
    if "learning_rate" not in frame.columns:
        return None
    return frame["learning_rate"].to_numpy(dtype=float)


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to `window` values, so the first points are averages of what exists so far."""
    sums = np.cumsum(np.concatenate([[0.0], values]))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(0, ends - window)
    return (sums[ends] - sums[starts]) / (ends - starts)


def default_window(n_points: int) -> int:
    return max(1, min(50, n_points // 10))


def _save(figure: Figure, out_path: str | os.PathLike[str]) -> Path:
    figure.tight_layout()
    with atomic_path(out_path) as tmp:
        figure.savefig(tmp, format="png")
    return Path(out_path)


def plot_loss(
    csv_or_losses: str | os.PathLike[str] | Sequence[float], out_path: str | os.PathLike[str], title: str
) -> Path:
    steps, losses = _read_losses(csv_or_losses)
    if len(losses) == 0:
        raise ValueError(f"{title}: no loss values to plot")
    window = default_window(len(losses))
    figure = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=1, label="loss")
    axes.plot(steps, moving_average(losses, window), color="tab:red", linewidth=2, label=f"moving average ({window} steps)")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left")
    rates = _read_rates(csv_or_losses)
    if rates is not None:
        rate_axes = axes.twinx()
        rate_axes.step(steps, rates, where="post", color="tab:green", linewidth=1, label="learning rate")
        rate_axes.set_ylabel("learning rate")
        rate_axes.legend(loc="upper right")
    return _save(figure, out_path)


def plot_metrics(metrics: pd.DataFrame, out_path: str | os.PathLike[str], title: str, best_step: int | None = None) -> Path:
    """Per-checkpoint training and validation loss (left axis), CLIP similarities and the concept tag score when
    measured (right axis), the checkpoint to keep marked: the one chart that answers "which checkpoint"."""
    if metrics.empty:
        raise ValueError(f"{title}: no checkpoints to plot")
    figure = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    steps = metrics["step"].to_numpy(dtype=float)
    for column, colour in (("training_loss", "tab:blue"), ("validation_loss", "tab:orange")):
        if column in metrics and metrics[column].notna().any():
            axes.plot(steps, metrics[column].to_numpy(dtype=float), marker="o", color=colour, label=column.replace("_", " "))
    axes.set_xlabel("checkpoint step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if best_step is not None:
        axes.axvline(best_step, color="tab:red", linestyle="--", linewidth=1, label=f"best: step {best_step}")
    axes.legend(loc="upper left")
    scores = ("clip_image_similarity", "clip_text_similarity", "concept_tag_score")
    score_columns = [c for c in scores if c in metrics and metrics[c].notna().any()]
    if score_columns:
        score_axes = axes.twinx()
        colours = dict(zip(scores, ("tab:green", "tab:purple", "tab:brown")))
        for column in score_columns:
            score_axes.plot(steps, metrics[column].to_numpy(dtype=float), marker="s", linestyle=":",
                            color=colours[column], label=column.replace("_", " "))  # fmt: skip
        names = (["CLIP cosine similarity"] if any(c.startswith("clip") for c in score_columns) else []) + (
            ["concept tag probability"] if "concept_tag_score" in score_columns else [])
        score_axes.set_ylabel(" / ".join(names))
        score_axes.legend(loc="upper right")
    return _save(figure, out_path)
