from __future__ import annotations

import pytest

from training.lr_schedule import parse_schedule


def test_a_single_number_holds_for_every_step() -> None:
    for text in ("0.005", 0.005, " 5e-3 "):
        schedule = parse_schedule(text, max_steps=50)
        assert schedule.end_step == 50
        assert schedule.rate_at(1) == schedule.rate_at(50) == 0.005


def test_pairs_hold_until_their_step_and_a_bare_rate_runs_to_the_end() -> None:
    schedule = parse_schedule("0.005:100, 1e-3:1000, 1e-5", max_steps=3000)
    assert [schedule.rate_at(step) for step in (1, 100, 101, 1000, 1001, 3000)] == [0.005, 0.005, 1e-3, 1e-3, 1e-5, 1e-5]
    assert schedule.end_step == 3000


def test_minus_one_means_max_steps() -> None:
    schedule = parse_schedule("0.1:10, 0.01:-1", max_steps=40)
    assert schedule.rates == ((0.1, 10), (0.01, 40))


def test_steps_beyond_max_steps_are_cut_and_later_pairs_never_apply() -> None:
    schedule = parse_schedule("0.1:500, 0.01:1000, 0.001:10000", max_steps=700)
    assert schedule.rates == ((0.1, 500), (0.01, 700))
    assert schedule.rate_at(700) == 0.01


def test_a_schedule_that_ends_early_ends_training_there() -> None:
    schedule = parse_schedule("0.1:20, 0.05:30", max_steps=100)
    assert schedule.end_step == 30
    with pytest.raises(ValueError, match="step 31 is outside the schedule"):
        schedule.rate_at(31)
    with pytest.raises(ValueError, match="step 0 is outside"):
        schedule.rate_at(0)


def test_empty_fragments_are_ignored() -> None:
    assert parse_schedule("0.1:10,, 0.01 ,", max_steps=20).rates == ((0.1, 10), (0.01, 20))


@pytest.mark.parametrize(
    ("text", "quoted"),
    [
        ("fast", "'fast'"),
        ("0.1:abc", "'0.1:abc'"),
        ("0.1:10.5", "'0.1:10.5'"),
        ("0.1:10:20", "'0.1:10:20'"),
        ("0.1:0", "'0.1:0'"),
        ("0.1:-5", "'0.1:-5'"),
        ("-0.1", "'-0.1'"),
        ("nan", "'nan'"),
        ("0.1:100, 0.01:50", "'0.01:50'"),
        ("0.1, 0.01:100", "'0.1'"),
        ("0.1:-1, 0.01:100", "'0.1:-1'"),
        ("0.1:100, 0.01:200, oops:300", "'oops:300'"),
    ],
)
def test_bad_schedules_quote_the_bad_fragment(text: str, quoted: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_schedule(text, max_steps=100)
    assert quoted in str(caught.value)


def test_empty_schedule_and_bad_max_steps_are_errors() -> None:
    with pytest.raises(ValueError, match="is empty"):
        parse_schedule(" , ", max_steps=10)
    with pytest.raises(ValueError, match="max_steps must be at least 1"):
        parse_schedule("0.1", max_steps=0)
    with pytest.raises(ValueError, match="must be a positive finite number"):
        parse_schedule(0.0, max_steps=10)
