"""A CUDA out-of-memory is retried once with half the batch and twice the accumulation, and logged."""

from __future__ import annotations

import logging

import pytest
import torch

from assets.oom_retry import GPU_RETRY, is_cuda_oom, run_with_oom_retry, smaller_batch
from assets.textual_inversion import textual_inversion


class Attempts:
    """A training run that fails with the given errors first, recording the settings of each attempt."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors, self.calls = list(errors), []

    def __call__(self, batch_size: int, accumulation: int) -> str:
        self.calls.append((batch_size, accumulation))
        if self.errors:
            raise self.errors.pop(0)
        return "trained"


LOG = logging.getLogger("oom-test")


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 3.82 GiB total capacity)"),
])
def test_oom_retries_once_with_the_same_effective_batch(error, caplog) -> None:
    attempts = Attempts(error)
    with caplog.at_level(logging.WARNING, logger="oom-test"):
        result, used = run_with_oom_retry(attempts, 8, 2, LOG)
    assert result == "trained" and used == (4, 4)
    assert attempts.calls == [(8, 2), (4, 4)]
    assert all(batch * accumulation == 16 for batch, accumulation in attempts.calls)
    assert "CUDA out of memory with batch_size 8 x accumulation 2" in caplog.text
    assert "batch_size 4 x accumulation 4" in caplog.text


def test_a_second_oom_is_not_retried_again() -> None:
    attempts = Attempts(torch.OutOfMemoryError("CUDA out of memory"), torch.OutOfMemoryError("CUDA out of memory"))
    with pytest.raises(torch.OutOfMemoryError):
        run_with_oom_retry(attempts, 4, 1, LOG)
    assert attempts.calls == [(4, 1), (2, 2)]


def test_other_errors_and_unhalvable_batches_are_raised_at_once(caplog) -> None:
    attempts = Attempts(RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_with_oom_retry(attempts, 4, 1, LOG)
    assert attempts.calls == [(4, 1)]

    for batch in (1, 3):
        attempts = Attempts(torch.OutOfMemoryError("CUDA out of memory"))
        with caplog.at_level(logging.ERROR, logger="oom-test"), pytest.raises(torch.OutOfMemoryError):
            run_with_oom_retry(attempts, batch, 1, LOG)
        assert attempts.calls == [(batch, 1)]
        assert f"batch_size {batch}, which cannot be halved" in caplog.text


def test_oom_detection_and_halving() -> None:
    assert is_cuda_oom(torch.OutOfMemoryError("x"))
    assert not is_cuda_oom(RuntimeError("out of memory on the host"))
    assert not is_cuda_oom(ValueError("CUDA out of memory"))  # only torch's error types
    assert smaller_batch(6, 3) == (3, 6) and smaller_batch(3, 1) is None and smaller_batch(1, 4) is None


def test_gpu_assets_carry_the_retry_policy() -> None:
    from assets import evaluation_grid, tag_scores

    for asset in (tag_scores, textual_inversion, evaluation_grid):
        assert asset.op.retry_policy == GPU_RETRY
        assert asset.op.pool == "gpu"


@pytest.mark.slow
def test_the_training_asset_retries_a_fake_oom_with_half_the_batch(project, monkeypatch) -> None:
    import importlib

    module = importlib.import_module("assets.textual_inversion")
    from dagster import AssetKey, instance_for_test

    from assets.partitions import datasets_partitions
    from tests.helpers import edit_settings

    defs, paths = project
    edit_settings(paths.dataset_dir("demo"), "training", max_steps=2, batch_size=2, gradient_accumulation_steps=1)
    real, seen = module.train_textual_inversion, []

    def runs_out_of_memory_at_batch_2(base, examples, settings, *args, **kwargs):
        seen.append((settings.batch_size, settings.gradient_accumulation_steps))
        if settings.batch_size == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return real(base, examples, settings, *args, **kwargs)

    monkeypatch.setattr(module, "train_textual_inversion", runs_out_of_memory_at_batch_2)
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(datasets_partitions.name, ["demo"])
        job = defs.resolve_implicit_global_asset_job_def()
        for keys in (["prepared_images", "tag_scores", "tag_table"], ["textual_inversion"]):
            result = job.execute_in_process(instance=instance, partition_key="demo",
                                            asset_selection=[AssetKey(key) for key in keys])
            assert result.success
        logs = [record.user_message for record in instance.all_logs(result.run_id)]
        event = instance.get_latest_materialization_event(AssetKey("textual_inversion"))
    metadata = {key: getattr(value, "value", value) for key, value in event.asset_materialization.metadata.items()}
    assert seen == [(2, 1), (1, 2)]
    assert (metadata["batch_size"], metadata["gradient_accumulation_steps"], metadata["oom_retried"]) == (1, 2, True)
    assert any("retrying once with batch_size 1 x accumulation 2" in message for message in logs)
