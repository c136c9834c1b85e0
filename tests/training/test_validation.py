"""Validation loss, evaluation rows and early stopping (issue 8, "Metrics"/"Checks")."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.training.conftest import stop_after
from training import training_loop
from training.base_model import BaseModel
from training.diffusion_objective import noise_scheduler
from training.embedding_formats import load_embedding
from training.prompt_encoding import encode_prompts, tokenize_with_placeholder
from training.textual_inversion import TextualInversionSettings, train_textual_inversion
from training.validation import build_validation_set, validation_loss

LINES = ["a photo of [name], [filewords]", "a picture of [name]"]


def run_settings(**overrides) -> TextualInversionSettings:
    values = dict(name="mycat", vectors_per_token=2, learning_rate="0.02", max_steps=5, save_every=2, batch_size=2,
                  shuffle_tags=True, latent_sampling_method="random")
    return TextualInversionSettings(**{**values, **overrides})


def fixed_set(base: BaseModel, examples, seed: int = 5):
    return build_validation_set(base.vae, base.vae_scale_factor, examples, LINES, "mycat",
                                noise_scheduler(base).config.num_train_timesteps, seed=seed)


def loss_of(base: BaseModel, validation, vectors: torch.Tensor, batch_size: int = 1, scheduler=None) -> float:
    def encode(prompts: list[str]) -> torch.Tensor:
        return encode_prompts(base.text_encoder, tokenize_with_placeholder(base.tokenizer, prompts, "mycat", 2), vectors)

    return validation_loss(validation, base.unet, encode, scheduler or noise_scheduler(base), device=base.device,
                           dtype=base.dtype, batch_size=batch_size)


def test_validation_loss_is_fixed_deterministic_and_leaves_every_generator_alone(tiny_base: BaseModel, subject_examples) -> None:
    examples = subject_examples[:3]
    first, again = fixed_set(tiny_base, examples), fixed_set(tiny_base, examples)
    assert first.key == again.key and first.prompts == again.prompts
    assert torch.equal(first.noise, again.noise) and torch.equal(first.timesteps, again.timesteps)
    assert all(prompt.startswith(("a photo of mycat", "a picture of mycat")) for prompt in first.prompts)
    assert fixed_set(tiny_base, examples, seed=6).key != first.key

    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(123)
    global_state = torch.get_rng_state()
    value = loss_of(tiny_base, first, vectors)
    assert torch.equal(torch.get_rng_state(), global_state)
    assert loss_of(tiny_base, first, vectors) == value  # the same samples every time
    assert loss_of(tiny_base, first, vectors, batch_size=3) == pytest.approx(value, rel=1e-5)
    assert loss_of(tiny_base, first, vectors * 3) != value  # it does measure the vectors
    v_scheduler = noise_scheduler(dataclasses.replace(
        tiny_base, scheduler_config={**tiny_base.scheduler_config, "prediction_type": "v_prediction"}))
    assert loss_of(tiny_base, first, vectors, scheduler=v_scheduler) != value  # the velocity target
    assert not tiny_base.unet.training and math.isfinite(value) and value > 0
    with pytest.raises(ValueError, match="at least one image"):
        fixed_set(tiny_base, [])


def test_validation_changes_neither_the_vectors_nor_the_random_stream(tiny_base: BaseModel, subject_examples, tmp_path: Path) -> None:
    train, held_out = subject_examples[:4], subject_examples[4:7]
    plain = train_textual_inversion(tiny_base, train, run_settings(), tmp_path / "plain")
    validated = train_textual_inversion(tiny_base, train, run_settings(), tmp_path / "validated",
                                        validation_examples=held_out)
    assert torch.equal(plain.vectors, validated.vectors) and plain.losses == validated.losses
    assert "validation_csv" not in plain.files and not (tmp_path / "plain" / "validation.csv").exists()
    assert [row.step for row in plain.validations] == [2, 4, 5] and math.isnan(plain.validations[0].validation_loss)

    table = pd.read_csv(validated.files["validation_csv"])
    assert list(table.columns) == ["step", "validation_loss", "training_loss"]
    assert table["step"].tolist() == [2, 4, 5] == [row.step for row in validated.validations]
    losses = validated.losses
    assert table["training_loss"].tolist() == pytest.approx([sum(losses[:2]) / 2, sum(losses[2:4]) / 2, losses[4]])
    assert table["validation_loss"].tolist() == [row.validation_loss for row in validated.validations]
    assert table["validation_loss"].gt(0).all() and table["validation_loss"].nunique() == 3
    # The row at step 2 is the loss of the checkpoint written at step 2, recomputed from its file.
    checkpoint = load_embedding(validated.files["checkpoint_2_webui_pt"])[1]
    lines = training_loop.training_template(run_settings())
    fixed = build_validation_set(tiny_base.vae, tiny_base.vae_scale_factor, held_out, lines, "mycat",
                                 noise_scheduler(tiny_base).config.num_train_timesteps)
    assert loss_of(tiny_base, fixed, checkpoint, batch_size=2) == pytest.approx(table["validation_loss"][0], rel=1e-5)


def test_early_stopping_stops_at_the_checkpoint_and_writes_the_final_files(
    tiny_base: BaseModel, subject_examples, tmp_path: Path, monkeypatch
) -> None:
    values = iter([0.5, 0.4, 0.45, 0.41, 0.3])  # best at the 2nd evaluation, then two without improvement
    monkeypatch.setattr(training_loop, "validation_loss", lambda *args, **kwargs: next(values))
    messages: list[str] = []
    run = run_settings(max_steps=10, save_every=1, early_stopping_patience=2)
    result = train_textual_inversion(tiny_base, subject_examples[:4], run, tmp_path, log=messages.append,
                                     validation_examples=subject_examples[4:6])
    assert result.stopped_early_at == 4 and result.steps == 4 and len(result.losses) == 4
    assert [row.validation_loss for row in result.validations] == [0.5, 0.4, 0.45, 0.41]
    assert any("stopping early at step 4" in message and "0.40000 at step 2" in message for message in messages)
    assert len(result.files["loss_csv"].read_text().splitlines()) == 5
    assert pd.read_csv(result.files["validation_csv"])["step"].tolist() == [1, 2, 3, 4]
    webui = torch.load(result.files["webui_pt"], weights_only=True)
    assert webui["step"] == 4 and torch.equal(load_embedding(result.files["checkpoint_4_webui_pt"])[1], result.vectors)
    assert "checkpoint_5_webui_pt" not in result.files and result.files["loss_png"].is_file()
    assert not (tmp_path / "checkpoints" / "training_state.pt").exists()


def test_without_a_validation_split_early_stopping_judges_training_rounds(tiny_base: BaseModel, subject_examples, tmp_path: Path) -> None:
    """A negligible learning rate: the round losses only wander, so some round soon fails to beat the best."""
    run = run_settings(learning_rate="1e-12", max_steps=20, save_every=1, early_stopping_patience=1)
    result = train_textual_inversion(tiny_base, subject_examples[:4], run, tmp_path)
    rounds = [row.training_loss for row in result.validations]
    assert result.stopped_early_at is not None and result.steps == result.stopped_early_at < 20
    assert rounds == result.losses  # one step per round
    assert all(later < earlier for earlier, later in zip(rounds[:-2], rounds[1:-1]))  # it improved until then
    assert rounds[-1] >= min(rounds[:-1])
    full = train_textual_inversion(tiny_base, subject_examples[:4], dataclasses.replace(run, early_stopping_patience=0),
                                   tmp_path / "full")
    assert full.stopped_early_at is None and full.steps == 20 and full.losses[: result.steps] == result.losses
    with pytest.raises(ValueError, match="early_stopping_patience needs save_embedding_every"):
        run_settings(save_every=0, early_stopping_patience=3)


def test_resume_keeps_the_earlier_rows(tiny_base: BaseModel, subject_examples, tmp_path: Path) -> None:
    train, held_out = subject_examples[:4], subject_examples[4:6]
    whole = train_textual_inversion(tiny_base, train, run_settings(), tmp_path / "whole", validation_examples=held_out)
    with pytest.raises(KeyboardInterrupt):
        train_textual_inversion(tiny_base, train, run_settings(), tmp_path / "cut", progress=stop_after(3),
                                validation_examples=held_out)
    state_path = tmp_path / "cut" / "checkpoints" / "training_state.pt"
    assert torch.load(state_path, weights_only=True)["evaluations"] == [[2, whole.validations[0].validation_loss,
                                                                          whole.validations[0].training_loss]]
    resumed = train_textual_inversion(tiny_base, train, run_settings(), tmp_path / "cut", validation_examples=held_out)
    assert resumed.resumed_from == 2 and resumed.validations == whole.validations
    assert (tmp_path / "cut" / "validation.csv").read_bytes() == whole.files["validation_csv"].read_bytes()

    # Other validation images: the rows measured on the old ones are dropped, the training itself resumes.
    with pytest.raises(KeyboardInterrupt):
        train_textual_inversion(tiny_base, train, run_settings(), tmp_path / "cut", progress=stop_after(3),
                                validation_examples=held_out)
    messages: list[str] = []
    changed = train_textual_inversion(tiny_base, train, run_settings(), tmp_path / "cut", log=messages.append,
                                      validation_examples=subject_examples[6:8])
    assert changed.resumed_from == 2 and [row.step for row in changed.validations] == [4, 5]
    assert torch.equal(changed.vectors, whole.vectors)
    assert any("validation images changed" in message for message in messages)


def test_a_state_of_the_previous_format_resumes_without_rows(tiny_base: BaseModel, subject_examples, tmp_path: Path) -> None:
    train, held_out = subject_examples[:4], subject_examples[4:6]
    with pytest.raises(KeyboardInterrupt):
        train_textual_inversion(tiny_base, train, run_settings(), tmp_path, progress=stop_after(3),
                                validation_examples=held_out)
    state_path = tmp_path / "checkpoints" / "training_state.pt"
    old = torch.load(state_path, weights_only=True)
    old = {key: value for key, value in old.items() if key not in ("evaluations", "validation_key", "weights")}
    old |= {"format": 1, "vectors": torch.load(state_path, weights_only=True)["weights"]["vectors"]}  # format 1's layout
    torch.save(old, state_path)
    resumed = train_textual_inversion(tiny_base, train, run_settings(), tmp_path, validation_examples=held_out)
    assert resumed.resumed_from == 2 and [row.step for row in resumed.validations] == [4, 5]
    torch.save(old | {"format": 7}, state_path)
    with pytest.raises(ValueError, match="not a training state of format 3"):
        train_textual_inversion(tiny_base, train, run_settings(), tmp_path, validation_examples=held_out)
