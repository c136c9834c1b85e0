"""The seeds' rules on the per-checkpoint metrics, as evaluation_metrics' asset checks."""

from __future__ import annotations

import pandas as pd
from dagster import AssetCheckSeverity

from assets.dataset_settings import EvaluationSettings
from assets.evaluation_metrics import metric_checks
from training.checkpoint_selection import best_row


def _frame(training: list[float], validation: list[float], method: str = "textual_inversion") -> pd.DataFrame:
    frame = pd.DataFrame({"method": method, "step": range(100, 100 * (len(training) + 1), 100),
                          "training_loss": training, "validation_loss": validation, "checkpoint": "x.safetensors"})  # fmt: skip
    frame["best"] = [index == best_row(frame) for index in range(len(frame))]
    return frame


def _checks(training: list[float], validation: list[float], **settings) -> dict:
    frame = _frame(training, validation)
    return {check.check_name: check for check in metric_checks(frame, EvaluationSettings(**settings))}


def test_with_several_methods_the_worst_one_decides_and_is_named() -> None:
    good = _frame([0.5, 0.4, 0.3, 0.2], [0.50, 0.45, 0.40, 0.35])
    overfit = _frame([0.5, 0.4, 0.3, 0.2], [0.50, 0.45, 0.47, 0.49], method="hypernetwork")
    checks = {c.check_name: c for c in metric_checks(pd.concat([good, overfit], ignore_index=True), EvaluationSettings())}
    assert not checks["not_overfitting"].passed
    assert checks["not_overfitting"].metadata["method"].value == "hypernetwork"
    assert checks["not_overfitting"].metadata["keep_checkpoint_step"].value == 200
    assert metric_checks(good, EvaluationSettings())[2].passed


def test_overfitting_names_the_checkpoint_to_keep() -> None:
    checks = _checks([0.5, 0.4, 0.3, 0.2], [0.50, 0.45, 0.47, 0.49])
    overfit = checks["not_overfitting"]
    assert not overfit.passed and overfit.severity == AssetCheckSeverity.WARN
    assert overfit.metadata["keep_checkpoint_step"].value == 200
    assert "keep step 200" in overfit.description
    assert checks["metrics_are_finite"].passed
    assert checks["validation_still_improving"].passed  # 2 evaluations since the best; patience is 3
    assert not _checks([0.5, 0.4, 0.3, 0.2], [0.50, 0.45, 0.47, 0.49], patience_evaluations=2)["validation_still_improving"].passed
    assert _checks([0.5, 0.4, 0.3, 0.2], [0.50, 0.45, 0.47, 0.49], overfitting_evaluations=3)["not_overfitting"].passed


def test_a_nan_loss_fails_and_no_validation_split_watches_the_training_loss() -> None:
    checks = _checks([0.5, float("nan")], [0.4, 0.3])
    assert not checks["metrics_are_finite"].passed and checks["metrics_are_finite"].severity == AssetCheckSeverity.ERROR
    plain = _checks([0.3, 0.2, 0.25, 0.26, 0.27], [float("nan")] * 5)
    assert plain["validation_still_improving"].metadata["watched"].value == "training_loss"
    assert not plain["validation_still_improving"].passed and plain["not_overfitting"].passed
