"""Never lose progress: a run killed mid-way resumes to the very same bytes, and only the same run resumes."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.training.conftest import stop_after
from training.base_model import BaseModel
from training.textual_inversion import TextualInversionSettings, train_textual_inversion

ROOT = Path(__file__).resolve().parents[2]


def run_settings(**overrides) -> TextualInversionSettings:
    """Every source of randomness on: tag shuffle and dropout, random latents, batches across epoch ends."""
    values = dict(
        name="mycat", vectors_per_token=2, learning_rate="0.02:3, 0.01", max_steps=7, batch_size=2,
        gradient_accumulation_steps=2, save_every=2, shuffle_tags=True, tag_dropout=0.2, latent_sampling_method="random",
    )  # fmt: skip
    return TextualInversionSettings(**{**values, **overrides})


def kill_during_training(model: Path, examples, settings: TextualInversionSettings, out: Path, kill_at: int) -> None:
    job = out.parent / f"{out.name}-job.json"
    job.write_text(json.dumps({
        "model": str(model), "out": str(out), "kill_at": kill_at, "settings": dataclasses.asdict(settings),
        "examples": [[str(example.image_path), example.filewords] for example in examples],
    }))  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run(
        [sys.executable, "-m", "tests.training.train_until_killed", str(job)], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == -signal.SIGKILL, done.stderr


def test_a_run_killed_with_sigkill_resumes_to_identical_bytes(
    tiny_sd_dir: Path, tiny_base: BaseModel, subject_examples, tmp_path: Path
) -> None:
    examples, settings = subject_examples[:5], run_settings()
    whole = train_textual_inversion(tiny_base, examples, settings, tmp_path / "whole")

    interrupted = tmp_path / "interrupted"
    kill_during_training(tiny_sd_dir, examples, settings, interrupted, kill_at=5)
    assert not (interrupted / "mycat.pt").exists()
    state = torch.load(interrupted / "checkpoints" / "training_state.pt", weights_only=True)
    assert state["step"] == 4 and len(state["losses"]) == 4

    resumed = train_textual_inversion(tiny_base, examples, settings, interrupted)
    assert resumed.resumed_from == 4
    assert torch.equal(resumed.vectors, whole.vectors)
    assert resumed.losses == whole.losses
    assert set(resumed.files) == set(whole.files)
    for key in ("webui_pt", "diffusers", "loss_csv", "checkpoint_2_webui_pt", "checkpoint_6_diffusers"):
        assert resumed.files[key].read_bytes() == whole.files[key].read_bytes(), key
    assert not (interrupted / "checkpoints" / "training_state.pt").exists()  # finished: nothing left to resume


def test_only_the_same_run_resumes(tiny_base: BaseModel, subject_examples, tmp_path: Path) -> None:
    examples, settings = subject_examples[:4], run_settings(latent_sampling_method="once")
    with pytest.raises(KeyboardInterrupt):
        train_textual_inversion(tiny_base, examples, settings, tmp_path, progress=stop_after(3))
    changed = dataclasses.replace(settings, learning_rate="0.03")
    assert train_textual_inversion(tiny_base, examples, changed, tmp_path / "other").resumed_from == 0
    with pytest.raises(KeyboardInterrupt):
        train_textual_inversion(tiny_base, examples, settings, tmp_path, progress=stop_after(3))
    assert train_textual_inversion(tiny_base, examples, changed, tmp_path).resumed_from == 0  # other settings: fresh

    with pytest.raises(KeyboardInterrupt):
        train_textual_inversion(tiny_base, examples, settings, tmp_path, progress=stop_after(3))
    fresh = train_textual_inversion(tiny_base, examples, dataclasses.replace(settings, resume=False), tmp_path)
    assert fresh.resumed_from == 0
    with pytest.raises(KeyboardInterrupt):
        train_textual_inversion(tiny_base, examples, settings, tmp_path, progress=stop_after(3))
    resumed = train_textual_inversion(tiny_base, examples, dataclasses.replace(settings, save_every=3), tmp_path)
    assert resumed.resumed_from == 2  # the checkpoint cadence is not part of what defines the run
    assert torch.equal(resumed.vectors, fresh.vectors)


def test_a_damaged_state_is_an_error_naming_the_file(tiny_base: BaseModel, subject_examples, tmp_path: Path) -> None:
    state = tmp_path / "checkpoints" / "training_state.pt"
    state.parent.mkdir(parents=True)
    state.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"training_state.pt: cannot read the training state"):
        train_textual_inversion(tiny_base, subject_examples[:2], run_settings(batch_size=1), tmp_path)
