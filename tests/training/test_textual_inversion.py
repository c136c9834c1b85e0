from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from training import training_loop
from training.base_model import BaseModel, load_base_model
from training.embedding_formats import load_embedding, webui_checksum
from training.evaluation import build_pipeline, embedding_tokens
from training.textual_inversion import (
    TextualInversionSettings,
    TrainingDivergedError,
    TrainingExample,
    train_textual_inversion,
)
from training.training_loop import EpochSampler, caption_for_step


def settings(**overrides) -> TextualInversionSettings:
    values = dict(name="mycat", vectors_per_token=2, learning_rate="0.01", max_steps=4)
    return TextualInversionSettings(**{**values, **overrides})


def test_training_writes_every_file_in_loadable_formats(tiny_base: BaseModel, subject_examples, tmp_path: Path) -> None:
    calls: list[tuple[int, float]] = []
    run = settings(batch_size=2, gradient_accumulation_steps=2, max_steps=6, save_every=3)
    result = train_textual_inversion(tiny_base, subject_examples[:8], run, tmp_path, progress=lambda s, l: calls.append((s, l)))

    assert result.steps == 6 and len(result.losses) == 6
    assert calls == list(zip(range(1, 7), result.losses))
    assert result.vectors.shape == (2, 32) and result.vectors.dtype == torch.float32
    assert set(result.files) == {
        "webui_pt", "webui_optim", "diffusers", "kohya", "png_embedding", "loss_csv", "loss_png",
        "checkpoint_3_webui_pt", "checkpoint_3_diffusers", "checkpoint_6_webui_pt", "checkpoint_6_diffusers",
    }  # fmt: skip
    for key in ("kohya", "png_embedding", "checkpoint_3_webui_pt"):
        assert torch.equal(load_embedding(result.files[key])[1], result.vectors) == (key != "checkpoint_3_webui_pt"), key
    assert (tmp_path / "checkpoints" / "mycat-3.pt.optim").is_file()
    optim = torch.load(result.files["webui_optim"], weights_only=True)
    assert optim["hash"] == webui_checksum(result.vectors) and optim["optimizer_state_dict"]["state"][0]["step"] == 6
    assert result.files["webui_pt"] == tmp_path / "mycat.pt"
    assert result.files["checkpoint_3_webui_pt"] == tmp_path / "checkpoints" / "mycat-3.pt"
    assert all(path.is_file() for path in result.files.values())
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]  # no temp files left behind

    webui = torch.load(result.files["webui_pt"], map_location="cpu", weights_only=True)
    assert (webui["name"], webui["step"]) == ("mycat", 6)
    assert (webui["sd_checkpoint"], webui["sd_checkpoint_name"]) == (tiny_base.short_hash, tiny_base.name)
    assert torch.equal(webui["string_to_param"]["*"], result.vectors)
    assert torch.equal(safetensors.torch.load_file(result.files["diffusers"])["mycat"], result.vectors)
    assert torch.equal(load_embedding(result.files["checkpoint_6_diffusers"])[1], result.vectors)
    assert not torch.equal(load_embedding(result.files["checkpoint_3_webui_pt"])[1], result.vectors)

    rows = result.files["loss_csv"].read_text().splitlines()
    assert rows[0] == "step,loss,learning_rate" and len(rows) == 7
    assert [float(row.split(",")[1]) for row in rows[1:]] == result.losses
    with Image.open(result.files["loss_png"]) as image:
        assert image.format == "PNG"


def test_diffusers_loads_both_trained_files(tiny_base: BaseModel, subject_examples, tmp_path: Path) -> None:
    result = train_textual_inversion(tiny_base, subject_examples[:4], settings(max_steps=2), tmp_path)
    pipeline = build_pipeline(tiny_base)
    for key in ("webui_pt", "diffusers"):
        pipeline.load_textual_inversion(str(result.files[key]), token="mycat")
        try:
            ids = pipeline.tokenizer.convert_tokens_to_ids(embedding_tokens("mycat", 2))
            table = pipeline.text_encoder.get_input_embeddings().weight
            assert torch.equal(table[ids], result.vectors)
        finally:
            pipeline.unload_textual_inversion(embedding_tokens("mycat", 2))
            pipeline.text_encoder.requires_grad_(False)


def test_same_seed_same_bytes_other_seed_other_vectors(tiny_base: BaseModel, subject_examples, tmp_path: Path) -> None:
    run = settings(max_steps=5, shuffle_tags=True, tag_dropout=0.3, batch_size=2)
    first = train_textual_inversion(tiny_base, subject_examples[:6], run, tmp_path / "a")
    second = train_textual_inversion(tiny_base, subject_examples[:6], run, tmp_path / "b")
    assert torch.equal(first.vectors, second.vectors) and first.losses == second.losses
    for key in ("webui_pt", "diffusers", "loss_csv", "loss_png"):
        assert first.files[key].read_bytes() == second.files[key].read_bytes(), key
    other = train_textual_inversion(tiny_base, subject_examples[:6], dataclasses.replace(run, seed=1), tmp_path / "c")
    assert not torch.equal(first.vectors, other.vectors)


def test_the_loss_falls_against_an_untrained_control(tiny_base: BaseModel, subject_examples, tmp_path: Path) -> None:
    """Demo-like run: 32 images of one subject, lr 0.05, 120 steps.

    Why a control run rather than "first 10 steps vs last 10": on the random tiny model the text
    conditioning can move the loss by only ~2.5% (full-batch optimisation of the vectors goes from
    1.113 to 1.086), while the per-sample loss spread from random timesteps is ~9%, so two 10-step
    means differ mostly by chance, and most of the drop happens within the first ten steps anyway.
    The same seed with a negligible learning rate draws the same timesteps, noise and prompts, so the
    step-by-step difference isolates what training the vectors did.
    """
    demo = settings(vectors_per_token=4, learning_rate="0.05", max_steps=120)
    trained = np.array(train_textual_inversion(tiny_base, subject_examples, demo, tmp_path / "trained").losses)
    control_run = dataclasses.replace(demo, learning_rate="1e-12")
    control = np.array(train_textual_inversion(tiny_base, subject_examples, control_run, tmp_path / "control").losses)
    assert trained[0] == control[0]  # same samples: the first step sees identical vectors
    improvement = control[-30:] - trained[-30:]
    assert improvement.mean() > 0.01
    assert (improvement > 0).mean() >= 0.75


def test_v_prediction_models_train_against_the_velocity(tiny_base: BaseModel, subject_examples, tmp_path: Path) -> None:
    v_base = dataclasses.replace(tiny_base, scheduler_config={**tiny_base.scheduler_config, "prediction_type": "v_prediction"})
    run = settings(max_steps=2)
    v_losses = train_textual_inversion(v_base, subject_examples[:4], run, tmp_path / "v").losses
    epsilon_losses = train_textual_inversion(tiny_base, subject_examples[:4], run, tmp_path / "eps").losses
    assert all(np.isfinite(v_losses)) and v_losses != epsilon_losses


def test_half_precision_models_keep_float32_vectors(tiny_sd_dir: Path, subject_examples, tmp_path: Path) -> None:
    """CPU has no autocast here: the frozen model computes in bfloat16, the vectors and AdamW stay float32."""
    half = load_base_model(tiny_sd_dir, dtype=torch.bfloat16)
    result = train_textual_inversion(half, subject_examples[:4], settings(max_steps=3), tmp_path)
    assert result.vectors.dtype == torch.float32 and all(np.isfinite(result.losses))
    assert load_embedding(result.files["webui_pt"])[1].dtype == torch.float32


def test_a_schedule_that_ends_early_stops_training_and_is_logged(tiny_base: BaseModel, subject_examples, tmp_path: Path) -> None:
    run = settings(learning_rate="0.02:3, 0.01:5", max_steps=10)
    result = train_textual_inversion(tiny_base, subject_examples[:4], run, tmp_path)
    assert result.steps == 5
    rates = [float(row.split(",")[2]) for row in result.files["loss_csv"].read_text().splitlines()[1:]]
    assert rates == [0.02, 0.02, 0.02, 0.01, 0.01]


def test_divergence_stops_with_the_step_and_writes_no_bad_embedding(tiny_base: BaseModel, subject_examples, tmp_path: Path) -> None:
    run = settings(learning_rate="1e30", max_steps=20, save_every=1)
    with pytest.raises(TrainingDivergedError, match=r"diverged at step \d+: .*lower learning rate"):
        train_textual_inversion(tiny_base, subject_examples[:4], run, tmp_path)
    assert not (tmp_path / "mycat.pt").exists() and not (tmp_path / "learned_embeds.safetensors").exists()
    checkpoints = sorted(tmp_path.glob("checkpoints/mycat-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
    for checkpoint in checkpoints:
        assert torch.isfinite(load_embedding(checkpoint)[1]).all()
    state = torch.load(tmp_path / "checkpoints" / "training_state.pt", weights_only=True)
    assert torch.isfinite(state["weights"]["vectors"]).all()  # the last finite state survives for inspection
    assert state["step"] == int(checkpoints[-1].stem.split("-")[1])


def test_an_infinite_loss_is_caught_before_the_update(tiny_base: BaseModel, subject_examples, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(training_loop._Trainer, "micro_batch_loss", lambda self, step, indices: torch.tensor(float("inf")))
    with pytest.raises(TrainingDivergedError, match="diverged at step 1: the loss is inf"):
        train_textual_inversion(tiny_base, subject_examples[:4], settings(), tmp_path)
    assert list(tmp_path.iterdir()) == []


def _image(path: Path, size: tuple[int, int]) -> TrainingExample:
    Image.new("RGB", size, (10, 20, 30)).save(path)
    return TrainingExample(path, "red")


def test_bad_training_images_are_named(tiny_base: BaseModel, subject_examples, tmp_path: Path) -> None:
    out = tmp_path / "out"
    wide = _image(tmp_path / "wide.png", (64, 32))
    with pytest.raises(ValueError, match=r"wide.png: training images must be square"):
        train_textual_inversion(tiny_base, [wide], settings(), out)
    small = _image(tmp_path / "small.png", (32, 32))
    with pytest.raises(ValueError, match=r"small.png: all training images must be 64x64"):
        train_textual_inversion(tiny_base, [subject_examples[0], small], settings(), out)
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    with pytest.raises(ValueError, match=r"broken.png: cannot read the training image"):
        train_textual_inversion(tiny_base, [TrainingExample(broken, "red")], settings(), out)
    assert not out.exists()


def test_bad_settings_and_prompts_are_clear_errors(tiny_base: BaseModel, subject_examples, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="embedding name 'my cat'"):
        settings(name="my cat")
    with pytest.raises(ValueError, match="'0.1:fast'"):
        settings(learning_rate="0.1:fast")
    with pytest.raises(ValueError, match="tag_dropout must be in"):
        settings(tag_dropout=1.0)
    with pytest.raises(ValueError, match="vectors_per_token must be between 1 and 75"):
        settings(vectors_per_token=0)
    long_caption = TrainingExample(subject_examples[0].image_path, ", ".join(["red"] * 70))
    cases = [
        ([], settings(), "at least one training example"),
        (subject_examples[:2], settings(batch_size=3), "batch_size 3 is larger than the 2"),
        (subject_examples[:2], settings(clip_skip=4), "clip_skip must be between 1 and 3"),
        (subject_examples[:2], settings(template="hypernetwork"), "has no \\[name\\] line"),
        (subject_examples[:2], settings(name="mycat!"), "00.png: the name 'mycat!' tokenizes differently"),
        ([long_caption], settings(template="style_filewords"), "00.png: .*beyond CLIP's 75-token limit"),
    ]
    for examples, run, message in cases:
        with pytest.raises(ValueError, match=message):
            train_textual_inversion(tiny_base, examples, run, tmp_path)
    unknown = dataclasses.replace(tiny_base, scheduler_config={**tiny_base.scheduler_config, "prediction_type": "flow"})
    with pytest.raises(ValueError, match="unsupported prediction_type 'flow'"):
        train_textual_inversion(unknown, subject_examples[:2], settings(), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_caption_augmentation_is_seeded_and_off_by_default() -> None:
    caption = "red, round, simple background, solo, flat"
    assert caption_for_step(caption, settings(), torch.Generator().manual_seed(0)) == caption
    shuffled = caption_for_step(caption, settings(shuffle_tags=True), torch.Generator().manual_seed(0))
    assert sorted(shuffled.split(", ")) == sorted(caption.split(", ")) and shuffled != caption
    assert shuffled == caption_for_step(caption, settings(shuffle_tags=True), torch.Generator().manual_seed(0))
    dropped = [caption_for_step(caption, settings(tag_dropout=0.5), torch.Generator().manual_seed(s)) for s in range(10)]
    assert all(set(d.split(", ")) - {""} <= set(caption.split(", ")) for d in dropped)
    assert len({d for d in dropped}) > 1


def test_batches_cover_each_epoch_once_and_drop_the_remainder() -> None:
    batches = EpochSampler(5, 2, torch.Generator().manual_seed(0))
    epoch = [next(batches) for _ in range(2)]
    assert all(len(batch) == 2 for batch in epoch)
    assert len(set(epoch[0] + epoch[1])) == 4
    assert all(len(next(batches)) == 2 for _ in range(10))



def test_keep_tokens_hold_the_first_tags_in_place() -> None:
    caption = "trigger, red, round, simple background, solo, flat"
    for seed in range(8):
        run = settings(shuffle_tags=True, tag_dropout=0.5, keep_tokens=1)
        assert caption_for_step(caption, run, torch.Generator().manual_seed(seed)).startswith("trigger")
    unkept = [caption_for_step(caption, settings(shuffle_tags=True), torch.Generator().manual_seed(s)) for s in range(8)]
    assert not all(text.startswith("trigger") for text in unkept)


def test_gradient_clipping_follows_its_schedule(tiny_base: BaseModel, subject_examples, tmp_path: Path, monkeypatch) -> None:
    norms: list[float] = []
    original = training_loop.clip_gradients

    def record(parameters, mode, limit):
        original(parameters, mode, limit)
        (vectors,) = parameters
        norms.append((mode, limit, float(vectors.grad.norm()), float(vectors.grad.abs().max())))

    monkeypatch.setattr(training_loop, "clip_gradients", record)
    run = settings(clip_grad_mode="norm", clip_grad_value="1e-6:2, 1e-5:3", max_steps=4)
    clipped = train_textual_inversion(tiny_base, subject_examples[:4], run, tmp_path / "norm")
    assert [limit for _, limit, _, _ in norms] == [1e-6, 1e-6, 1e-5, 1e-5]  # a schedule ending early keeps its last value
    assert all(norm <= limit * 1.0001 for _, limit, norm, _ in norms)
    free = train_textual_inversion(tiny_base, subject_examples[:4], settings(max_steps=4), tmp_path / "free")
    assert not torch.equal(clipped.vectors, free.vectors)

    norms.clear()
    train_textual_inversion(tiny_base, subject_examples[:4], settings(clip_grad_mode="value", clip_grad_value="1e-7"), tmp_path / "v")
    assert all(largest <= 1e-7 * 1.0001 for _, _, _, largest in norms) and len(norms) == 4
    with pytest.raises(ValueError, match="clip_grad_value: '0.1:x'"):
        settings(clip_grad_mode="norm", clip_grad_value="0.1:x")
    with pytest.raises(ValueError, match="clip_grad_mode must be one of disabled, value, norm"):
        settings(clip_grad_mode="sometimes")
