from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from training.base_model import BaseModel
from training.diffusion_objective import noise_scheduler, predicted_clean_latents, prediction_target
from training.dreamartist import (
    CfgSchedule,
    DreamArtistMethod,
    DreamArtistSettings,
    ExponentialMovingAverage,
    NegativePrompts,
    combined_prediction,
    negative_embedding_path,
    negative_name,
    parse_cfg_schedule,
    reconstruction_loss,
    starting_pair,
    train_dreamartist,
    without_filewords,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3", CfgSchedule(3.0, 3.0, "linear")),
        (" 3.5 ", CfgSchedule(3.5, 3.5, "linear")),
        ("2.5-5", CfgSchedule(2.5, 5.0, "linear")),
        ("2.5 - 5 : cos", CfgSchedule(2.5, 5.0, "cos")),
        ("1-3:linear", CfgSchedule(1.0, 3.0, "linear")),
        ("1-3:ln", CfgSchedule(1.0, 3.0, "linear")),
        ("1e0-.5:cos2", CfgSchedule(1.0, 0.5, "cos2")),
        ("3:cos", CfgSchedule(3.0, 3.0, "cos")),
    ],
)
def test_cfg_schedules_parse(text: str, expected: CfgSchedule) -> None:
    assert parse_cfg_schedule(text) == expected


@pytest.mark.parametrize(
    "text", ["", "abc", "-3", "3-", "1-2-3", "1-3:sin", "1-3:", "1-3:COS", "3;import os", "__import__('os')",
             "1-3:cos:cos", "nan", "inf", "1,5", "t/999"],
)  # fmt: skip
def test_bad_cfg_schedules_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="CFG"):
        parse_cfg_schedule(text)


def test_cfg_values_along_each_shape() -> None:
    linear, cos, cos2 = (parse_cfg_schedule(f"1-3:{shape}") for shape in ("linear", "cos", "cos2"))
    for schedule in (linear, cos, cos2):
        assert schedule.value(0, 10).item() == pytest.approx(1.0)
        assert schedule.value(10, 10).item() == pytest.approx(3.0)
    assert linear.value(5, 10).item() == pytest.approx(2.0)
    assert cos.value(5, 10).item() == pytest.approx(1 + 2 * math.sin(math.pi / 4))  # above the line
    assert cos2.value(5, 10).item() == pytest.approx(1 + 2 * (1 - math.cos(math.pi / 4)))  # below it
    per_sample = linear.for_timesteps(torch.tensor([0, 999, 333]), 1000)
    assert per_sample.tolist() == pytest.approx([1.0, 3.0, 1 + 2 * 333 / 999])
    assert parse_cfg_schedule("3").for_timesteps(torch.tensor([0, 500]), 1000).tolist() == [3.0, 3.0]


def test_ema_follows_the_formula_and_round_trips_its_state() -> None:
    start = {"pos": torch.tensor([[0.0, 10.0]]), "neg": torch.tensor([[4.0]])}
    ema = ExponentialMovingAverage(start, decay=0.9)
    start["pos"].add_(100)  # the shadows are copies
    ema.update({"pos": torch.tensor([[1.0, 0.0]]), "neg": torch.tensor([[4.0]])})
    assert torch.allclose(ema.shadows["pos"], torch.tensor([[0.1, 9.0]]))
    ema.update({"pos": torch.tensor([[1.0, 0.0]]), "neg": torch.tensor([[0.0]])})
    assert torch.allclose(ema.shadows["pos"], torch.tensor([[0.9 * 0.1 + 0.1, 0.9 * 9.0]]))
    assert torch.allclose(ema.shadows["neg"], torch.tensor([[3.6]]))

    copy = ExponentialMovingAverage({"pos": torch.zeros(1, 2), "neg": torch.zeros(1, 1)}, decay=0.9)
    copy.load_state_tensors(ema.state_tensors())
    assert all(torch.equal(copy.shadows[key], ema.shadows[key]) for key in ema.shadows)
    frozen = ExponentialMovingAverage({"v": torch.ones(2)}, decay=1.0)
    frozen.update({"v": torch.zeros(2)})
    assert torch.equal(frozen.shadows["v"], torch.ones(2))
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="between 0 and 1"):
            ExponentialMovingAverage({"v": torch.ones(2)}, decay=bad)
    with pytest.raises(ValueError, match="no EMA of v"):
        frozen.load_state_tensors({})


def test_negative_name() -> None:
    assert negative_name("mycat") == "mycat-neg"


def _conditioning(base: BaseModel, generator: torch.Generator, batch: int) -> torch.Tensor:
    hidden = base.text_encoder.config.hidden_size
    return torch.randn(batch, base.tokenizer.model_max_length, hidden, generator=generator)


@torch.no_grad()
def test_combined_prediction_equals_separate_unet_calls(tiny_base: BaseModel) -> None:
    generator = torch.Generator().manual_seed(0)
    channels, size = tiny_base.unet.config.in_channels, tiny_base.unet.config.sample_size
    noisy = torch.randn(3, channels, size, size, generator=generator)
    timesteps = torch.tensor([5, 500, 990])
    positive, negative = _conditioning(tiny_base, generator, 3), _conditioning(tiny_base, generator, 3)
    from_positive = tiny_base.unet(noisy, timesteps, encoder_hidden_states=positive).sample
    from_negative = tiny_base.unet(noisy, timesteps, encoder_hidden_states=negative).sample
    for cfg in (3.0, torch.tensor([1.0, 2.5, 5.0])):
        expected = from_negative + torch.as_tensor(cfg).view(-1, 1, 1, 1) * (from_positive - from_negative)
        combined = combined_prediction(tiny_base.unet, noisy, timesteps, positive, negative, cfg)
        torch.testing.assert_close(combined, expected, rtol=1e-4, atol=1e-5)
    # cfg 1 is the positive prediction alone; the halves are not swapped
    single = combined_prediction(tiny_base.unet, noisy, timesteps, positive, negative, 1.0)
    torch.testing.assert_close(single, from_positive, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_clean_latents_invert_the_noising(prediction_type: str) -> None:
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    generator = torch.Generator().manual_seed(1)
    latents, noise = torch.randn(4, 4, 8, 8, generator=generator), torch.randn(4, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([0, 10, 500, 999])
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = prediction_target(scheduler, latents, noise, timesteps)
    torch.testing.assert_close(predicted_clean_latents(scheduler, noisy, target, timesteps), latents, rtol=1e-3, atol=2e-3)


def test_reconstruction_loss_reaches_the_prediction_through_the_vae(tiny_base: BaseModel) -> None:
    scheduler = noise_scheduler(tiny_base)
    generator = torch.Generator().manual_seed(2)
    channels, size = tiny_base.unet.config.in_channels, tiny_base.unet.config.sample_size
    noisy = torch.randn(2, channels, size, size, generator=generator)
    prediction = torch.randn(2, channels, size, size, generator=generator, requires_grad=True)
    images = torch.rand(2, 3, size * tiny_base.vae_scale_factor, size * tiny_base.vae_scale_factor) * 2 - 1
    timesteps = torch.tensor([100, 800])
    loss = reconstruction_loss(tiny_base.vae, scheduler, noisy, prediction, timesteps, images)
    loss.backward()
    assert loss.ndim == 0 and loss.item() > 0
    assert prediction.grad is not None and prediction.grad.abs().sum() > 0
    assert all(parameter.grad is None for parameter in tiny_base.vae.parameters())  # the VAE stays frozen


# --- evaluation: the negative embedding goes into the negative prompt -----------------------------------------


def _pair(folder, tiny_base: BaseModel, seed: int) -> tuple[Path, torch.Tensor, torch.Tensor]:
    from training.embedding_formats import save_diffusers_embedding

    generator = torch.Generator().manual_seed(seed)
    positive, negative = torch.randn(3, 32, generator=generator) * 0.5, torch.randn(6, 32, generator=generator) * 0.5
    path = save_diffusers_embedding(folder / "mycat.safetensors", "mycat", positive)
    save_diffusers_embedding(negative_embedding_path(path), "mycat-neg", negative)
    return path, positive, negative


def test_dreamartist_cells_put_the_negative_embedding_in_the_negative_prompt(tiny_base: BaseModel, tmp_path: Path) -> None:
    from training.evaluation import AppliedMethod, build_pipeline, dreamartist_applied, prompt_embeddings
    from training.prompt_encoding import encode_prompts, tokenize_with_placeholder
    from training.xyz_grid import Checkpoint

    path, positive, negative = _pair(tmp_path, tiny_base, 0)
    assert negative_embedding_path(path) == tmp_path / "mycat-neg.safetensors"
    pipeline = build_pipeline(tiny_base)
    vocabulary = len(tiny_base.tokenizer)
    with torch.no_grad():
        expected_positive = encode_prompts(
            tiny_base.text_encoder, tokenize_with_placeholder(tiny_base.tokenizer, ["a photo of mycat"], "mycat", 3), positive
        )
        expected_negative = encode_prompts(
            tiny_base.text_encoder,
            tokenize_with_placeholder(tiny_base.tokenizer, ["mycat-neg, lowres"], "mycat-neg", 6), negative,
        )
        with dreamartist_applied(pipeline, Checkpoint("dreamartist", 5, path, "mycat"), 1.0, 1) as applied:
            assert isinstance(applied, AppliedMethod)
            conditioning = applied.encode("a photo of mycat")
            negative_conditioning = applied.negative("lowres")
            bare = applied.negative("")
        plain = prompt_embeddings(pipeline, "lowres", 1)
    torch.testing.assert_close(conditioning, expected_positive, rtol=0, atol=1e-5)
    torch.testing.assert_close(negative_conditioning, expected_negative, rtol=0, atol=1e-5)
    assert not torch.allclose(negative_conditioning, plain)
    assert not torch.allclose(bare, negative_conditioning)
    assert len(tiny_base.tokenizer) == vocabulary  # both embeddings unloaded
    assert not any(parameter.requires_grad for parameter in tiny_base.text_encoder.parameters())


def test_dreamartist_grid_cells_depend_on_the_negative_file(tiny_base: BaseModel, tmp_path: Path) -> None:
    from training.embedding_formats import save_diffusers_embedding
    from training.evaluation import RenderSettings, build_pipeline, render_xyz_grid
    from training.xyz_grid import Checkpoint, GridPlan

    (tmp_path / "run").mkdir()
    path, _, negative = _pair(tmp_path / "run", tiny_base, 1)
    checkpoint = Checkpoint("dreamartist", 5, path, "mycat", final=True)
    values = {"checkpoint": (5,), "prompt": ("a photo of [name]",), "seed": (1,), "cfg_scale": (5.0,), "steps": (3,),
              "strength": (1.0,), "method": ("dreamartist",)}  # fmt: skip
    plan = GridPlan("checkpoint", "prompt", None, values=values, checkpoints={("dreamartist", 5): checkpoint})
    pipeline = build_pipeline(tiny_base)
    render = RenderSettings("dpm", negative_prompt="blurry")
    first = render_xyz_grid(pipeline, plan, render, tmp_path / "a_grid.png", tmp_path / "cache", title="t")
    assert first.cells[0].rendered
    save_diffusers_embedding(negative_embedding_path(path), "mycat-neg", negative * -1)  # only the negative changes
    second = render_xyz_grid(pipeline, plan, render, tmp_path / "b_grid.png", tmp_path / "cache", title="t")
    assert second.cells[0].rendered and second.cells[0].key != first.cells[0].key
    assert second.cells[0].cache_path.read_bytes() != first.cells[0].cache_path.read_bytes()
    negative_embedding_path(path).unlink()
    with pytest.raises(ValueError, match=r"mycat-neg.safetensors: the dreamartist checkpoint at step 5 no longer exists"):
        render_xyz_grid(pipeline, plan, render, tmp_path / "c_grid.png", tmp_path / "cache", title="t")


# --- training: the pair in the shared loop ---------------------------------------------------------------------


SUBJECT_LINES = ("a photo of a [name], [filewords]", "[filewords], art by [name]", "a [name] among [filewords] and [filewords]",
                 "a plain [name]")  # fmt: skip


@pytest.mark.parametrize(
    ("prompt", "full", "positive_only"),
    [
        ("a photo of a mycat, red, round", "a photo of a mycat-neg, red, round", "a photo of a mycat-neg"),
        ("red, round, art by mycat", "red, round, art by mycat-neg", "art by mycat-neg"),
        ("a mycat among red and red", "a mycat-neg among red and red", "a mycat-neg among and"),
        ("a plain mycat", "a plain mycat-neg", "a plain mycat-neg"),
        ("a photo of a mycat, ", "a photo of a mycat-neg, ", "a photo of a mycat-neg"),  # an empty caption
    ],
)
def test_negative_prompts_follow_the_template_line(prompt: str, full: str, positive_only: str) -> None:
    assert NegativePrompts(SUBJECT_LINES, "mycat")(prompt) == full
    assert NegativePrompts(SUBJECT_LINES, "mycat", positive_only_filewords=True)(prompt) == positive_only


def test_negative_prompts_refuse_a_prompt_of_no_line() -> None:
    with pytest.raises(ValueError, match="matches no line"):
        NegativePrompts(SUBJECT_LINES, "mycat")("a painting of mycat")


def test_filewords_are_removed_with_their_separator() -> None:
    assert without_filewords("a photo of a [name], [filewords]") == "a photo of a [name]"
    assert without_filewords("[filewords], art by [name]") == "art by [name]"
    assert without_filewords("x, [filewords], y [name]") == "x, y [name]"
    assert without_filewords("a [filewords] photo of [name]") == "a photo of [name]"


def da_settings(**overrides) -> DreamArtistSettings:
    values = dict(name="mycat", vectors_per_token=2, negative_vectors=3, learning_rate="0.01", max_steps=4,
                  template="subject_filewords")  # fmt: skip
    return DreamArtistSettings(**{**values, **overrides})


def test_bad_dreamartist_settings_are_clear_errors() -> None:
    for overrides, message in [
        ({"cfg_scale": "3-x"}, "CFG scale '3-x'"), ({"ema": 1.5}, "ema must be between 0 and 1"),
        ({"negative_vectors": 0}, "negative_vectors must be between 1 and 75"),
        ({"negative_lr_scale": 0.0}, "negative_lr_scale must be above 0"),
        ({"reconstruction_weight": -1.0}, "reconstruction_weight must be at least 0"),
        ({"ema_replace_every": -1}, "ema_replace_every must be at least 0"),
    ]:  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(message)):
            da_settings(**overrides)
    assert DreamArtistSettings(name="x").vectors_per_token == 3 and DreamArtistSettings(name="x").negative_vectors == 6


@pytest.mark.slow
def test_dreamartist_writes_both_embeddings_in_every_format(tiny_base: BaseModel, subject_examples, tmp_path: Path) -> None:
    from training.embedding_formats import read_embedding, webui_checksum

    run = da_settings(max_steps=4, save_every=2, ema=0.9, ema_replace_every=3)
    result = train_dreamartist(tiny_base, subject_examples[:4], run, tmp_path)
    assert result.positive.shape == (2, 32) and result.negative.shape == (3, 32)
    expected = {
        "webui_pt": "mycat.pt", "webui_optim": "mycat.pt.optim", "diffusers": "learned_embeds.safetensors",
        "kohya": "kohya/mycat.safetensors", "negative_webui_pt": "mycat-neg.pt",
        "negative_webui_optim": "mycat-neg.pt.optim", "negative_diffusers": "learned_embeds-neg.safetensors",
        "negative_kohya": "kohya/mycat-neg.safetensors", "loss_csv": "loss.csv", "loss_png": "loss.png",
    }  # fmt: skip
    for step in (2, 4):
        expected |= {f"checkpoint_{step}_webui_pt": f"checkpoints/mycat-{step}.pt",
                     f"checkpoint_{step}_diffusers": f"checkpoints/mycat-{step}.safetensors",
                     f"checkpoint_{step}_negative_webui_pt": f"checkpoints/mycat-{step}-neg.pt",
                     f"checkpoint_{step}_negative_diffusers": f"checkpoints/mycat-{step}-neg.safetensors"}  # fmt: skip
    assert {key: str(path.relative_to(tmp_path)) for key, path in result.files.items()} == expected
    for key in ("webui_pt", "diffusers", "kohya", "checkpoint_4_webui_pt", "checkpoint_4_diffusers"):
        embedding = read_embedding(result.files[key])
        assert torch.equal(embedding.vectors, result.positive), key
        negative = read_embedding(result.files[key.replace("webui", "negative_webui").replace("diffusers", "negative_diffusers")
                                                if key.startswith("checkpoint") else f"negative_{key}"])
        assert torch.equal(negative.vectors, result.negative), key
    assert read_embedding(result.files["webui_pt"]).name == "mycat"
    assert read_embedding(result.files["negative_webui_pt"]).name == "mycat-neg"
    assert read_embedding(result.files["negative_diffusers"]).name == "mycat-neg"
    assert read_embedding(result.files["negative_webui_pt"]).step == 4
    for key, vectors in (("webui_optim", result.positive), ("negative_webui_optim", result.negative)):
        optim = torch.load(result.files[key], weights_only=True)
        assert optim["hash"] == webui_checksum(vectors)
        state = optim["optimizer_state_dict"]
        assert len(state["param_groups"]) == 1 and list(state["state"]) == [0]  # loads into a one-tensor AdamW
        assert state["state"][0]["exp_avg"].shape == vectors.shape
        torch.optim.AdamW([torch.nn.Parameter(vectors.clone())]).load_state_dict(state)
    assert not torch.equal(read_embedding(result.files["checkpoint_2_webui_pt"]).vectors, result.positive)
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]


def test_diffusers_loads_both_embeddings(tiny_base: BaseModel, subject_examples, tmp_path: Path) -> None:
    from training.evaluation import build_pipeline, embedding_tokens

    result = train_dreamartist(tiny_base, subject_examples[:2], da_settings(max_steps=2), tmp_path)
    pipeline = build_pipeline(tiny_base)
    for positive_key, negative_key in (("webui_pt", "negative_webui_pt"), ("diffusers", "negative_diffusers")):
        pipeline.load_textual_inversion(str(result.files[positive_key]), token="mycat")
        pipeline.load_textual_inversion(str(result.files[negative_key]), token="mycat-neg")
        try:
            table = pipeline.text_encoder.get_input_embeddings().weight
            positive_ids = pipeline.tokenizer.convert_tokens_to_ids(embedding_tokens("mycat", 2))
            negative_ids = pipeline.tokenizer.convert_tokens_to_ids(embedding_tokens("mycat-neg", 3))
            assert torch.equal(table[positive_ids], result.positive)
            assert torch.equal(table[negative_ids], result.negative)
            tokens = pipeline.tokenizer.tokenize("mycat-neg, mycat")  # the longer name wins where both match
            assert (tokens[0], tokens[-1], len(tokens)) == ("mycat-neg", "mycat", 3)
        finally:
            pipeline.unload_textual_inversion([*embedding_tokens("mycat", 2), *embedding_tokens("mycat-neg", 3)])
            pipeline.text_encoder.requires_grad_(False)


def test_the_loss_is_the_cfg_combination_of_both_embeddings(tiny_base: BaseModel, subject_examples) -> None:
    """One step's loss by hand: separate UNet calls on the positive and negative prompts, combined."""
    from training.training_loop import Batch

    positive, negative = starting_pair(tiny_base, da_settings(), Path("unused"))
    method = DreamArtistMethod(tiny_base, da_settings(cfg_scale="2-4"), subject_examples[:2], positive, negative)
    method.check_prompts(subject_examples[:2], list(SUBJECT_LINES))
    generator = torch.Generator().manual_seed(0)
    channels, size = tiny_base.unet.config.in_channels, tiny_base.unet.config.sample_size
    latents, noise = torch.randn(2, channels, size, size, generator=generator), torch.randn(2, channels, size, size, generator=generator)
    timesteps = torch.tensor([100, 900])
    noisy = method.scheduler.add_noise(latents, noise, timesteps)
    prompts = ["a photo of a mycat, red", "a plain mycat"]
    batch = Batch(step=1, indices=[0, 1], latents=latents, noise=noise, timesteps=timesteps, noisy=noisy, target=noise,
                  prompts=prompts, generator=generator, compute_dtype=None)  # fmt: skip
    with torch.no_grad():
        loss = method.loss(batch, tiny_base.unet)
        from_positive = tiny_base.unet(noisy, timesteps, encoder_hidden_states=method.encode(prompts)).sample
        negative_prompts = ["a photo of a mycat-neg, red", "a plain mycat-neg"]
        from_negative = tiny_base.unet(noisy, timesteps, encoder_hidden_states=method.encode_negative(negative_prompts)).sample
    cfg = torch.tensor([2 + 2 * 100 / 999, 2 + 2 * 900 / 999]).view(-1, 1, 1, 1)
    expected = torch.nn.functional.mse_loss(from_negative + cfg * (from_positive - from_negative), noise)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.slow
def test_the_loss_falls_against_an_untrained_control(tiny_base: BaseModel, subject_examples, tmp_path: Path) -> None:
    """As textual inversion's test: the same seed with a negligible rate sees the same samples, so the
    step-by-step difference is what training the pair did (both embeddings move; no EMA to isolate it)."""
    demo = da_settings(vectors_per_token=3, negative_vectors=3, learning_rate="0.05", max_steps=60, ema=1.0)
    trained = train_dreamartist(tiny_base, subject_examples, demo, tmp_path / "trained")
    control = train_dreamartist(tiny_base, subject_examples, replace(demo, learning_rate="1e-12"), tmp_path / "control")
    assert trained.loop.losses[0] == control.loop.losses[0]
    improvement = np.array(control.loop.losses[-20:]) - np.array(trained.loop.losses[-20:])
    assert improvement.mean() > 0.01 and (improvement > 0).mean() >= 0.75
    assert not torch.equal(trained.negative, control.negative)  # the negative embedding trains too


@pytest.mark.slow
def test_ema_is_what_is_saved_and_replaces_the_vectors(tiny_base: BaseModel, subject_examples, tmp_path: Path) -> None:
    run = da_settings(max_steps=3, ema=0.5, ema_replace_every=0, learning_rate="0.05")
    method_results = []
    original = DreamArtistMethod.after_step

    def spy(self, step):
        before = {name: tensor.detach().clone() for name, tensor in self._live().items()}
        shadows = {name: tensor.clone() for name, tensor in self.ema.shadows.items()}
        original(self, step)
        method_results.append((before, shadows, {name: tensor.clone() for name, tensor in self.ema.shadows.items()}))

    DreamArtistMethod.after_step = spy
    try:
        result = train_dreamartist(tiny_base, subject_examples[:2], run, tmp_path / "a")
    finally:
        DreamArtistMethod.after_step = original
    for before, shadows, after in method_results:  # shadow = 0.5 * shadow + 0.5 * trained, every step
        for name in ("positive", "negative"):
            torch.testing.assert_close(after[name], 0.5 * shadows[name] + 0.5 * before[name])
    assert torch.equal(result.positive, method_results[-1][2]["positive"])  # the saved result is the average
    assert not torch.equal(result.positive, method_results[-1][0]["positive"])
    replaced = train_dreamartist(tiny_base, subject_examples[:2], replace(run, ema_replace_every=1), tmp_path / "b")
    off = train_dreamartist(tiny_base, subject_examples[:2], replace(run, ema=1.0), tmp_path / "c")
    assert not torch.equal(replaced.positive, result.positive) and not torch.equal(off.positive, result.positive)


@pytest.mark.slow
def test_reconstruction_and_positive_only_filewords_change_the_training(tiny_base: BaseModel, subject_examples, tmp_path: Path) -> None:
    run = da_settings(max_steps=2)
    plain = train_dreamartist(tiny_base, subject_examples[:2], run, tmp_path / "plain")
    rebuilt = train_dreamartist(tiny_base, subject_examples[:2], replace(run, reconstruction_weight=0.5), tmp_path / "rec")
    positive_only = train_dreamartist(tiny_base, subject_examples[:2], replace(run, positive_only_filewords=True), tmp_path / "pos")
    assert rebuilt.loop.losses[0] > plain.loop.losses[0]  # the L1 term is added to the same first sample's MSE
    assert not torch.equal(rebuilt.positive, plain.positive)
    assert not torch.equal(positive_only.negative, plain.negative)


@pytest.mark.slow
def test_a_stopped_run_resumes_to_identical_bytes(tiny_base: BaseModel, subject_examples, tmp_path: Path) -> None:
    from tests.training.conftest import stop_after

    run = da_settings(max_steps=6, save_every=2, batch_size=2, shuffle_tags=True, tag_dropout=0.2,
                      latent_sampling_method="random", ema=0.8, ema_replace_every=3, reconstruction_weight=0.1,
                      cfg_scale="2-4:cos", negative_lr_scale=2.0)  # fmt: skip
    examples = subject_examples[:5]
    whole = train_dreamartist(tiny_base, examples, run, tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        train_dreamartist(tiny_base, examples, run, tmp_path / "stopped", progress=stop_after(5))
    assert (tmp_path / "stopped" / "checkpoints" / "training_state.pt").is_file()
    resumed = train_dreamartist(tiny_base, examples, run, tmp_path / "stopped")
    assert resumed.loop.resumed_from == 4
    assert torch.equal(resumed.positive, whole.positive) and torch.equal(resumed.negative, whole.negative)
    assert resumed.loop.losses == whole.loop.losses
    for key in ("webui_pt", "negative_webui_pt", "diffusers", "negative_diffusers", "loss_csv", "checkpoint_6_negative_webui_pt"):
        assert resumed.files[key].read_bytes() == whole.files[key].read_bytes(), key
