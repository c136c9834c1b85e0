"""Benchmark: our textual-inversion trainer vs a re-implementation of diffusers' example training loop.

Run: `PYTHONPATH=. HF_HUB_OFFLINE=1 python bench/textual_inversion.py [--steps 40] [--batch-size 2] [--images 8]`

The reference follows diffusers' examples/textual_inversion/textual_inversion.py step for step: the
placeholder tokens are added to the tokenizer and the token-embedding matrix is resized, the WHOLE
matrix is the AdamW parameter, the VAE encodes the batch's pixels every step, the text encoder runs on
token ids, and after each step every row but the placeholder rows is restored from a saved copy.
Where the example draws from Python's `random` or torch's global RNG, the reference draws from one
seeded generator in the order our trainer does (batch order, latent sample, noise, timesteps, template
line, caption), and AdamW's weight decay is 0 as in the webui; that is what makes the two loss curves
comparable step by step. Ours runs with latent_sampling_method="random" (a fresh latent sample per step,
as the example does) so the only differences are the work per step.

Each side runs in its own process so peak memory (max RSS) is its own. The table prints steps/s
(timed from the end of step 1 to the last step, so setup and the one-off latent caching are excluded;
the total wall time including them is printed too), peak RSS, and the largest loss difference. The
sides alternate for a few rounds and each keeps its fastest round, since the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from embedded.tiny_sd import build_tiny_sd  # noqa: E402
from training.base_model import BaseModel, load_base_model  # noqa: E402
from training.diffusion_objective import noise_scheduler, prediction_target  # noqa: E402
from training.latent_cache import load_training_image  # noqa: E402
from training.textual_inversion import TextualInversionSettings, TrainingExample, train_textual_inversion  # noqa: E402
from training.training_loop import EpochSampler, caption_for_step, training_template  # noqa: E402
from training.templates import render_prompt  # noqa: E402

CAPTION = "red, round, simple background"


def write_images(folder: Path, count: int, side: int) -> list[TrainingExample]:
    """Discs of varied place and size: a small stand-in for a subject dataset."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:side, :side]
    examples = []
    for index in range(count):
        image = np.full((side, side, 3), 30, dtype=np.uint8)
        cy, cx = rng.integers(side // 4, 3 * side // 4, size=2)
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < rng.integers(side // 8, side // 4) ** 2] = (200, 50, 40)
        path = folder / f"{index:03d}.png"
        Image.fromarray(image).save(path)
        examples.append(TrainingExample(path, CAPTION))
    return examples


def settings_for(args: argparse.Namespace) -> TextualInversionSettings:
    return TextualInversionSettings(
        name="mycat", vectors_per_token=args.vectors, learning_rate="0.005", batch_size=args.batch_size,
        max_steps=args.steps, template="subject_filewords", latent_sampling_method="random",
    )  # fmt: skip


def run_ours(base: BaseModel, examples: list[TrainingExample], settings: TextualInversionSettings, out: Path) -> dict:
    times: list[float] = []
    started = time.perf_counter()
    result = train_textual_inversion(base, examples, settings, out, progress=lambda step, loss: times.append(time.perf_counter()))
    return {"losses": result.losses, "times": times, "total": time.perf_counter() - started}


def run_reference(base: BaseModel, examples: list[TrainingExample], settings: TextualInversionSettings) -> dict:
    """diffusers' example loop (see the module docstring for the two changes that make curves comparable)."""
    started = time.perf_counter()
    tokenizer, text_encoder, vae, unet = base.tokenizer, base.text_encoder, base.vae, base.unet
    tokens = [settings.name] + [f"{settings.name}_{i}" for i in range(1, settings.vectors_per_token)]
    if tokenizer.add_tokens(tokens) != len(tokens):
        raise ValueError("the placeholder tokens already exist in the tokenizer")
    token_ids = tokenizer.convert_tokens_to_ids(tokens)
    init_ids = tokenizer(settings.initialization_text, add_special_tokens=False).input_ids
    text_encoder.resize_token_embeddings(len(tokenizer))
    embeddings = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for index, token_id in enumerate(token_ids):
            embeddings[token_id] = embeddings[init_ids[index % len(init_ids)]].clone()
    vae.requires_grad_(False)
    unet.requires_grad_(False)
    text_encoder.encoder.requires_grad_(False)
    text_encoder.final_layer_norm.requires_grad_(False)
    text_encoder.embeddings.position_embedding.requires_grad_(False)
    text_encoder.get_input_embeddings().requires_grad_(True)
    optimizer = torch.optim.AdamW(text_encoder.get_input_embeddings().parameters(), lr=0.005, weight_decay=0.0)
    original = text_encoder.get_input_embeddings().weight.data.clone()
    text_encoder.train()
    unet.train()  # the example trains with unet.train() too (dropout 0 here, so it only matters for cost)

    scheduler = noise_scheduler(base)
    lines = training_template(settings)
    pixels = torch.stack([load_training_image(example.image_path, base.vae_scale_factor) for example in examples])
    generator = torch.Generator().manual_seed(settings.seed)
    batches = EpochSampler(len(examples), settings.batch_size, generator)
    placeholder = " ".join(tokens)
    losses, times = [], []
    for _ in range(settings.max_steps):
        indices = next(batches)
        latents = vae.encode(pixels[indices]).latent_dist.sample(generator=generator).detach()
        latents = latents * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(scheduler.config.num_train_timesteps, (len(indices),), generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prompts = []
        for index in indices:
            line = lines[int(torch.randint(len(lines), (1,), generator=generator))]
            prompts.append(render_prompt(line, placeholder, caption_for_step(examples[index].filewords, settings, generator)))
        input_ids = tokenizer(
            prompts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt"
        ).input_ids
        hidden = text_encoder(input_ids)[0]
        prediction = unet(noisy, timesteps, hidden).sample
        target = prediction_target(scheduler, latents, noise, timesteps)
        loss = F.mse_loss(prediction.float(), target.float(), reduction="mean")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        keep = torch.ones(len(tokenizer), dtype=torch.bool)
        keep[min(token_ids) : max(token_ids) + 1] = False
        with torch.no_grad():
            text_encoder.get_input_embeddings().weight[keep] = original[keep]
        losses.append(loss.item())
        times.append(time.perf_counter())
    return {"losses": losses, "times": times, "total": time.perf_counter() - started}


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    base = load_base_model(work / "model", device="cpu", dtype=torch.float32)
    examples = write_images(work / "images", args.images, args.side)
    settings = settings_for(args)
    if args.worker == "ours":
        result = run_ours(base, examples, settings, work / "out")
    else:
        result = run_reference(base, examples, settings)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(args.result).write_text(json.dumps(result))


def run_side(side: str, args: argparse.Namespace, work: Path) -> dict:
    out = work / f"{side}.json"
    command = [sys.executable, __file__, "--worker", side, "--work", str(work), "--result", str(out)]
    command += ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--images", str(args.images)]
    command += ["--side", str(args.side), "--vectors", str(args.vectors), "--threads", str(args.threads)]
    subprocess.run(command, check=True)
    return json.loads(out.read_text())


def steps_per_second(times: list[float]) -> float:
    return (len(times) - 1) / (times[-1] - times[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--vectors", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per side (the machine may be shared)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs per side; the fastest of each is kept")
    parser.add_argument("--worker", choices=("ours", "reference"))
    parser.add_argument("--work")
    parser.add_argument("--result")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        build_tiny_sd(work / "model", seed=0)
        rounds = [{side: run_side(side, args, work) for side in ("reference", "ours")} for _ in range(args.rounds)]
    results = {
        side: max((one[side] for one in rounds), key=lambda result: steps_per_second(result["times"]))
        for side in ("reference", "ours")
    }
    ours, reference = results["ours"], results["reference"]
    print(f"tiny SD, CPU ({args.threads} thread), batch {args.batch_size}, {args.steps} steps, "
          f"{args.images} images {args.side}px, best of {args.rounds} alternating rounds")
    print(f"{'':10} {'steps/s':>8} {'total s':>8} {'peak RSS MB':>12}")
    for side, result in results.items():
        print(f"{side:10} {steps_per_second(result['times']):8.2f} {result['total']:8.2f} {result['peak_rss_mb']:12.1f}")
    ratio = steps_per_second(ours["times"]) / steps_per_second(reference["times"])
    difference = np.abs(np.array(ours["losses"]) - np.array(reference["losses"]))
    print(f"speed ratio (ours / reference): {ratio:.2f}x")
    print(f"peak RSS ratio (ours / reference): {ours['peak_rss_mb'] / reference['peak_rss_mb']:.2f}")
    print(f"loss curves: max |difference| {difference.max():.2e}, mean loss {np.mean(ours['losses']):.4f}")


if __name__ == "__main__":
    main()
