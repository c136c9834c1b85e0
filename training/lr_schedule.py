"""The webui's learning-rate schedule syntax: `0.005` or `0.005:100, 1e-3:1000, 1e-5`.

Each `rate:step` pair holds until that (1-based) optimizer step; a bare rate, or a step of -1, runs to
max_steps. As in the webui, a schedule whose last step is before max_steps ends training there, and steps
beyond max_steps are cut to it. Unlike the webui, a malformed schedule is an error quoting the bad part
rather than a generic message, and pairs after a run-to-the-end rate are rejected instead of ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

_SYNTAX = 'expected a number or "rate:step" pairs such as "0.005:100, 1e-3:1000, 1e-5"'


@dataclass(frozen=True)
class LearningRateSchedule:
    rates: tuple[tuple[float, int], ...]  # (rate, last step it applies to), last steps increasing

    @property
    def end_step(self) -> int:
        """The last optimizer step the schedule covers: training stops there."""
        return self.rates[-1][1]

    def rate_at(self, step: int) -> float:
        """The rate for the `step`-th optimizer step (1-based)."""
        if not 1 <= step <= self.end_step:
            raise ValueError(f"step {step} is outside the schedule (steps 1 to {self.end_step})")
        return next(rate for rate, last in self.rates if step <= last)


def _parse_rate(text: str, fragment: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        raise ValueError(f"learning rate {fragment!r}: {text!r} is not a number; {_SYNTAX}") from None
    if not math.isfinite(rate) or rate <= 0:
        raise ValueError(f"learning rate {fragment!r}: the rate must be a positive finite number")
    return rate


def _parse_step(text: str, fragment: str) -> int | None:
    """The pair's last step, or None for -1 (to the end)."""
    try:
        step = int(text)
    except ValueError:
        raise ValueError(f"learning rate {fragment!r}: step {text!r} is not a whole number; {_SYNTAX}") from None
    if step == -1:
        return None
    if step < 1:
        raise ValueError(f"learning rate {fragment!r}: the step must be at least 1 (or -1 for max steps)")
    return step


def _parse_pairs(text: str) -> list[tuple[float, int | None]]:
    """Every fragment is checked, even ones max_steps will cut off, so a typo never hides."""
    fragments = [fragment.strip() for fragment in text.split(",") if fragment.strip()]
    if not fragments:
        raise ValueError(f"learning rate {text!r} is empty; {_SYNTAX}")
    pairs: list[tuple[float, int | None]] = []
    for index, fragment in enumerate(fragments):
        parts = fragment.split(":")
        if len(parts) > 2:
            raise ValueError(f"learning rate {fragment!r}: more than one ':'; {_SYNTAX}")
        rate = _parse_rate(parts[0].strip(), fragment)
        step = _parse_step(parts[1].strip(), fragment) if len(parts) == 2 else None
        if step is None and index != len(fragments) - 1:
            raise ValueError(f"learning rate {fragment!r}: it runs to the last step, so it must come last; {_SYNTAX}")
        if pairs and step is not None and step <= pairs[-1][1]:
            raise ValueError(f"learning rate {fragment!r}: steps must increase (previous pair ends at step {pairs[-1][1]})")
        pairs.append((rate, step))
    return pairs


def _clip_to(pairs: list[tuple[float, int | None]], max_steps: int) -> tuple[tuple[float, int], ...]:
    rates: list[tuple[float, int]] = []
    for rate, step in pairs:
        rates.append((rate, max_steps if step is None else min(step, max_steps)))
        if rates[-1][1] == max_steps:
            break
    return tuple(rates)


def parse_schedule(text: str | float, max_steps: int) -> LearningRateSchedule:
    if max_steps < 1:
        raise ValueError(f"max_steps must be at least 1, got {max_steps}")
    if isinstance(text, Real) and not isinstance(text, bool):
        return LearningRateSchedule(((_parse_rate(str(text), str(text)), max_steps),))
    if not isinstance(text, str):
        raise ValueError(f"learning rate {text!r}: {_SYNTAX}")
    return LearningRateSchedule(_clip_to(_parse_pairs(text), max_steps))
