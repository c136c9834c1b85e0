"""Run textual inversion in this process and SIGKILL it from inside at a given step: a crash with no cleanup.

Used by test_resume.py as `python -m tests.training.train_until_killed <job.json>`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
from pathlib import Path

import torch

from training.base_model import load_base_model
from training.previews import PreviewSettings
from training.textual_inversion import TextualInversionSettings, TrainingExample, train_textual_inversion


def main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    base = load_base_model(job["model"], device="cpu", dtype=torch.float32)
    examples = [TrainingExample(Path(path), caption) for path, caption in job["examples"]]
    settings = TextualInversionSettings(**{**job["settings"], "previews": PreviewSettings(**job["settings"]["previews"])})
    assert dataclasses.asdict(settings) == job["settings"]

    def die_at(step: int, loss: float) -> None:
        if step == job["kill_at"]:
            os.kill(os.getpid(), signal.SIGKILL)

    train_textual_inversion(base, examples, settings, Path(job["out"]), progress=die_at)


if __name__ == "__main__":
    main(sys.argv[1])
