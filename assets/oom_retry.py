"""Retry a GPU stage once after a CUDA out-of-memory with half the batch and twice the accumulation.

Why in-step rather than a Dagster retry: a RetryPolicy re-runs the step with the same settings, which runs
out of memory again. Halving the batch while doubling gradient accumulation keeps the effective batch
(batch x accumulation), so the optimisation is the same; only peak memory drops. Other failures are
left to the asset's RetryPolicy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import torch
from dagster import Backoff, RetryPolicy

T = TypeVar("T")
OOM_TEXT = "CUDA out of memory"
# GPU steps also fail for passing reasons (a driver reset, another process holding the memory): retry twice,
# after 30 s then 60 s. Settings and model-folder errors raise Failure(allow_retries=False) and fail at once.
GPU_RETRY = RetryPolicy(max_retries=2, delay=30, backoff=Backoff.EXPONENTIAL)


def is_cuda_oom(error: BaseException) -> bool:
    """torch.OutOfMemoryError, or the RuntimeError older code paths raise with CUDA's message."""
    return isinstance(error, torch.OutOfMemoryError) or (isinstance(error, RuntimeError) and OOM_TEXT in str(error))


def smaller_batch(batch_size: int, accumulation: int) -> tuple[int, int] | None:
    """(batch / 2, accumulation x 2), or None when the batch cannot be halved exactly."""
    if batch_size < 2 or batch_size % 2:
        return None
    return batch_size // 2, accumulation * 2


def _free_cuda_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_with_oom_retry(
    run: Callable[[int, int], T], batch_size: int, accumulation: int, log: logging.Logger | logging.LoggerAdapter
) -> tuple[T, tuple[int, int]]:
    """`run(batch_size, accumulation)`; after a CUDA OOM once more with the halved batch.

    Returns the result and the (batch_size, accumulation) that produced it.
    """
    try:
        return run(batch_size, accumulation), (batch_size, accumulation)
    except Exception as error:  # noqa: BLE001 - only CUDA OOM is handled, everything else re-raised
        if not is_cuda_oom(error):
            raise
        smaller = smaller_batch(batch_size, accumulation)
        if smaller is None:
            log.error(f"CUDA out of memory with batch_size {batch_size}, which cannot be halved; "
                      "lower the resolution or use a smaller model")
            raise
        log.warning(
            f"CUDA out of memory with batch_size {batch_size} x accumulation {accumulation}; retrying once with "
            f"batch_size {smaller[0]} x accumulation {smaller[1]} (same effective batch {batch_size * accumulation})"
        )
    _free_cuda_memory()  # outside the except block, so the failed attempt's tensors are released
    return run(*smaller), smaller
