"""The seeds' rules of thumb about the training loss, as plain functions the asset checks call.

"If the Loss does not decrease in 10 rounds, you can stop. If the Loss is greater than 0.3, the results
are not very good" (and for characters above 0.2 is basically a failure). The raw per-step loss is
dominated by the random timestep, so both rules look at averages: the smoothed final loss, and the mean
loss per round (a checkpoint interval).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from training.plots import default_window, moving_average


def final_smoothed_loss(losses: Sequence[float]) -> float:
    """The last point of the curve the loss chart draws in red."""
    values = np.asarray(losses, dtype=float)
    if values.size == 0:
        raise ValueError("no loss values")
    return float(moving_average(values, default_window(values.size))[-1])


def round_means(losses: Sequence[float], round_steps: int) -> list[float]:
    """Mean loss per round of `round_steps` steps; a last partial round counts only if at least half full."""
    if round_steps < 1:
        raise ValueError(f"round_steps must be at least 1, got {round_steps}")
    values = np.asarray(losses, dtype=float)
    rounds = [values[start : start + round_steps] for start in range(0, values.size, round_steps)]
    return [float(chunk.mean()) for chunk in rounds if chunk.size * 2 >= round_steps]


def rounds_without_improvement(losses: Sequence[float], round_steps: int) -> int:
    """How many rounds have passed since the round with the lowest mean loss (0: the last round is the best)."""
    means = round_means(losses, round_steps)
    if not means:
        return 0
    return len(means) - 1 - int(np.argmin(means))


def should_stop_early(evaluation_losses: Sequence[float], patience: int) -> bool:
    """The seeds' "if the loss does not decrease in 10 rounds, stop", a round being one evaluation (checkpoint):
    true once the best loss is `patience` or more evaluations old; never with patience 0 (off)."""
    if patience < 0:
        raise ValueError(f"patience must be at least 0, got {patience}")
    return patience > 0 and rounds_without_improvement(evaluation_losses, 1) >= patience
