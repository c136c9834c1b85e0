from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler

from training.base_model import BaseModel
from training.diffusion_objective import noise_scheduler, predicted_clean_latents, prediction_target
from training.dreamartist import (
    CfgSchedule,
    ExponentialMovingAverage,
    combined_prediction,
    negative_embedding_path,
    negative_name,
    parse_cfg_schedule,
    reconstruction_loss,
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
