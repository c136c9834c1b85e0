from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from training.plots import moving_average, plot_loss, plot_metrics


def test_moving_average_is_a_trailing_mean_over_what_exists() -> None:
    values = np.array([1.0, 3.0, 5.0, 7.0])
    np.testing.assert_allclose(moving_average(values, 2), [1.0, 2.0, 4.0, 6.0])
    np.testing.assert_allclose(moving_average(values, 10), [1.0, 2.0, 3.0, 4.0])


def test_plot_from_a_list_and_from_the_csv_are_the_same_png(tmp_path: Path) -> None:
    losses = [1.0 / (step + 1) + 0.05 * float(np.sin(step)) for step in range(40)]
    csv = tmp_path / "loss.csv"
    csv.write_text("step,loss\n" + "".join(f"{i + 1},{loss!r}\n" for i, loss in enumerate(losses)))
    with_rates = tmp_path / "rates.csv"
    with_rates.write_text(
        "step,loss,learning_rate\n" + "".join(f"{i + 1},{loss!r},{0.005 if i < 20 else 0.001}\n" for i, loss in enumerate(losses))
    )
    from_list = plot_loss(losses, tmp_path / "a.png", "mycat")
    from_csv = plot_loss(csv, tmp_path / "b.png", "mycat")
    assert from_list.read_bytes() == from_csv.read_bytes()
    with Image.open(from_list) as image:
        assert image.format == "PNG" and image.width > 300
    assert plot_loss(with_rates, tmp_path / "c.png", "mycat").read_bytes() != from_csv.read_bytes()  # the rate curve
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png", "c.png", "loss.csv", "rates.csv"]


def test_bad_loss_input_is_a_clear_error(tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="wrong.csv: the loss table needs 'step' and 'loss'"):
        plot_loss(wrong, tmp_path / "out.png", "x")
    text = tmp_path / "text.csv"
    text.write_text("step,loss\n1,high\n")
    with pytest.raises(ValueError, match="text.csv: the loss table's step and loss columns must be numbers"):
        plot_loss(text, tmp_path / "out.png", "x")
    with pytest.raises(ValueError, match="missing.csv: cannot read the loss table"):
        plot_loss(tmp_path / "missing.csv", tmp_path / "out.png", "x")
    with pytest.raises(ValueError, match="no loss values"):
        plot_loss([], tmp_path / "out.png", "x")
    assert not (tmp_path / "out.png").exists()


def test_the_metrics_chart_draws_the_concept_tag_score_on_the_score_axis(tmp_path: Path) -> None:
    metrics = pd.DataFrame({"step": [2, 4, 6], "training_loss": [0.5, 0.4, 0.3], "validation_loss": [0.5, 0.3, 0.4],
                            "concept_tag_score": [0.1, 0.8, 0.7]})  # fmt: skip
    with_score = plot_metrics(metrics, tmp_path / "with.png", "pip", best_step=4)
    without = plot_metrics(metrics.drop(columns=["concept_tag_score"]), tmp_path / "without.png", "pip", best_step=4)
    assert with_score.is_file() and with_score.read_bytes() != without.read_bytes()
