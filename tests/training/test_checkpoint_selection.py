from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from training.checkpoint_selection import best_row, interval_means, overfitting_run
from training.plots import plot_metrics


def test_interval_means_average_the_steps_since_the_previous_checkpoint(tmp_path: Path) -> None:
    csv = tmp_path / "loss.csv"
    csv.write_text("step,loss,learning_rate\n" + "".join(f"{s},{s / 10},0.1\n" for s in range(1, 7)))
    assert interval_means(csv, [2, 6]) == pytest.approx([0.15, 0.45])
    assert math.isnan(interval_means(csv, [2, 2])[1])


def test_overfitting_runs() -> None:
    training = [0.5, 0.4, 0.3, 0.2]
    assert overfitting_run(training, [0.6, 0.5, 0.55, 0.6]) == 2
    assert overfitting_run(training, [0.6, 0.7, 0.5, 0.6]) == 1  # only the latest consecutive rise counts
    assert overfitting_run([0.5, 0.6, 0.7], [0.5, 0.6, 0.7]) == 0  # both rising is not overfitting


def test_best_prefers_validation_then_clip_within_tolerance() -> None:
    frame = pd.DataFrame({"training_loss": [0.3, 0.2, 0.1], "validation_loss": [0.5, 0.40, 0.41]})
    assert best_row(frame) == 1
    assert best_row(frame.assign(validation_loss=float("nan"))) == 2  # no validation split: training loss
    with_clip = frame.assign(clip_image_similarity=[0.9, 0.5, 0.7])
    assert best_row(with_clip) == 2  # 0.41 is within 5% of 0.40 and looks more like the training images
    assert best_row(with_clip, tolerance=0.0) == 1
    with pytest.raises(ValueError, match="no checkpoints"):
        best_row(frame.iloc[:0])


def test_metrics_chart_is_written(tmp_path: Path) -> None:
    frame = pd.DataFrame({"step": [10, 20], "training_loss": [0.3, 0.2], "validation_loss": [0.4, 0.35],
                          "clip_image_similarity": [0.5, 0.6], "clip_text_similarity": [float("nan")] * 2})
    path = plot_metrics(frame, tmp_path / "m.png", "t", best_step=20)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
