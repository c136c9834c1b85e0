import numpy as np
import pytest

from training.loss_checks import final_smoothed_loss, round_means, rounds_without_improvement


def test_final_smoothed_loss_averages_the_tail() -> None:
    losses = [1.0] * 90 + [0.1, 0.5] * 5  # window 10: the last ten values
    assert final_smoothed_loss(losses) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="no loss values"):
        final_smoothed_loss([])


def test_rounds_without_improvement_counts_since_the_best_round() -> None:
    falling = list(np.linspace(1.0, 0.1, 100))
    assert rounds_without_improvement(falling, 10) == 0
    stalled = falling[:30] + [0.9] * 70  # the best round is the third (mean ~0.78)
    assert rounds_without_improvement(stalled, 10) == 7
    assert round_means([1.0, 1.0, 1.0, 0.0], 3) == [1.0]  # a round of 1 step out of 3 is too short to judge
    assert round_means([1.0, 1.0, 0.0, 0.0], 3) == [pytest.approx(2 / 3)]
    with pytest.raises(ValueError, match="round_steps must be at least 1"):
        round_means([1.0], 0)
