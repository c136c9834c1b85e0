"""The demo base model: a small SD-1.x-architecture model trained on captioned images of the demo world.

Why: a random tiny model runs the pipeline but cannot learn anything a person can see. This one is trained
(on the CPU) to draw the world's shapes, colours, backgrounds and characters from their tags, so that a
textual-inversion embedding of a character it has never seen (`DEMO_CONCEPT`) can appear in the evaluation
grid, and the demo tagger can measure it. Its training scenes hold one object each: a shape, a named base
character, or an unnamed "figure" of random parts captioned by them (`demo_world.sample_base_scene`), so the
model learns how characters are composed, which an embedding of a new one relies on.

Architecture: SD 1.x's components and folder layout (a CLIP text encoder, a cross-attention
`UNet2DConditionModel`, a KL `AutoencoderKL`, a CLIP BPE tokenizer), at small widths. Two departures, both
settings other SD checkpoints use too: the VAE has a 4x spatial factor rather than 8 (64 px images keep a
16x16 latent), and the noise schedule is SD 2.x's v-prediction with a zero-terminal-SNR rescale (so the
prompt, not the starting noise, decides an image's colours; "Common Diffusion Noise Schedules and Sample
Steps are Flawed", Lin et al. 2024). The text encoder is trained with the UNet: there is no pretrained CLIP
to start from offline.

Reproducible: every random draw comes from the seeds in `BaseSettings`, kernels are deterministic, and the
thread count is fixed, so the same torch build on the same CPU rewrites the same bytes (`--verify FOLDER`
rebuilds and checks the weights against FOLDER's `build.json`).

The build takes most of an hour on one core, longer than setup may take, so its output is shipped in git
(`models/demo-base`); how well it draws is measured by bench/demo_base.py and reported in the README.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from common.atomic import write_text
from common.hashing import file_sha256, json_sha256
from embedded.corpus import WORDS as CORPUS_WORDS
from embedded.demo_tagger import deterministic_torch
from embedded.demo_world import caption_of, base_world_images, vocabulary
from embedded.staging import staged_folder
from embedded.tiny_sd import write_tokenizer

BUILD_FILE = "build.json"
SOURCES = ("embedded/demo_world.py", "embedded/demo_base.py", "embedded/tiny_sd.py", "embedded/corpus.py")
SIDE = 64  # image side the model is trained at (the demo dataset's preprocess.size)


@dataclass(frozen=True)
class BaseSettings:
    seed: int = 0
    world_seed: int = 3000  # the tagger trains on world 1000 and is benchmarked on 2000
    images: int = 8000  # drawn by demo_world.sample_base_scene: one shape, figure or base character each
    threads: int = 1  # one order of sums on any machine, and no oversubscription on shared cores
    vae_steps: int = 3000
    vae_batch: int = 16
    vae_crop: int = 32  # the VAE is fully convolutional: it trains on crops, 4x cheaper than whole images
    vae_learning_rate: float = 1e-3
    vae_kl_weight: float = 1e-6
    vae_loss: str = "l1"  # "l1" keeps edges sharper than "mse" (SD's autoencoder also trains on L1)
    unet_width: int = 32  # channels of the first level (the two lower levels have twice as many)
    unet_layers: int = 1  # ResNet (+ transformer) layers per level
    unet_steps: int = 9000
    unet_batch: int = 16
    unet_learning_rate: float = 1e-3
    warmup_steps: int = 200
    caption_dropout: float = 0.1  # empty captions, so classifier-free guidance has an unconditional model
    ema_decay: float = 0.999


def world_words() -> list[str]:
    """Every word of every world tag as the caption stage spells it, plus the small prompt corpus."""
    words: list[str] = []
    for tag, _ in vocabulary():
        words += tag.replace("(", " ").replace(")", " ").replace("_", " ").split()
    return list(dict.fromkeys(words + list(CORPUS_WORDS)))


def _text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
    ))


def _unet(cross_attention_dim: int, width: int, layers: int) -> UNet2DConditionModel:
    # SD 1.x's blocks (ResNet + cross-attention transformer levels, a cross-attention mid block), 3 levels. The
    # attention sits on the two lower levels rather than the upper ones: at 16x16 it would cost a CPU build
    # most of its time, and shapes of this world span a few latent pixels, which the 8x8 level sees whole.
    return UNet2DConditionModel(
        sample_size=SIDE // 4, in_channels=4, out_channels=4, layers_per_block=layers,
        block_out_channels=(width, 2 * width, 2 * width),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=4, norm_num_groups=16,
    )


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 64), layers_per_block=1,
        latent_channels=4, norm_num_groups=16, sample_size=SIDE, mid_block_add_attention=False,
    )


def _schedule() -> dict[str, object]:
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
                clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def _warmup_cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _to_pixels(images: np.ndarray) -> torch.Tensor:
    """(N, S, S, 3) uint8 -> (N, 3, S, S) in [-1, 1], the VAE's input range."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def train_vae(images: np.ndarray, settings: BaseSettings, log: Callable[[str], None]) -> AutoencoderKL:
    """L1 (or MSE) reconstruction of random crops with a small KL term: SD's autoencoder loss minus its
    perceptual and adversarial terms, which the world's flat colours and hard edges do not need."""
    vae = _vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.vae_learning_rate, weight_decay=0.0)
    rng = np.random.default_rng([settings.seed, 1])
    crop = settings.vae_crop
    vae.train()
    running = 0.0
    for step in range(settings.vae_steps):
        for group in optimizer.param_groups:
            group["lr"] = settings.vae_learning_rate * _warmup_cosine(step, 100, settings.vae_steps)
        chosen = rng.integers(len(images), size=settings.vae_batch)
        top, left = (int(v) for v in rng.integers(0, SIDE - crop + 1, size=2))
        batch = _to_pixels(images[chosen, top:top + crop, left:left + crop])
        posterior = vae.encode(batch).latent_dist
        latents = posterior.mean + posterior.std * torch.from_numpy(
            rng.standard_normal(posterior.mean.shape, dtype=np.float32))
        reconstruction = vae.decode(latents).sample
        distance = nn.functional.l1_loss if settings.vae_loss == "l1" else nn.functional.mse_loss
        loss = distance(reconstruction, batch) + settings.vae_kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running += float(loss.detach())
        if (step + 1) % 250 == 0:
            log(f"vae step {step + 1}/{settings.vae_steps}: loss {running / 250:.4f}")
            running = 0.0
    return vae.eval()


@torch.no_grad()
def encode_all(vae: AutoencoderKL, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and standard deviations of every image (the UNet samples latents from them)."""
    means, stds = [], []
    for start in range(0, len(images), 64):
        posterior = vae.encode(_to_pixels(images[start:start + 64])).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def _tokenize(tokenizer: CLIPTokenizer, captions: Sequence[str]) -> torch.Tensor:
    return tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def train_unet(
    means: torch.Tensor, stds: torch.Tensor, input_ids: torch.Tensor, empty_ids: torch.Tensor,
    text_encoder: CLIPTextModel, scaling_factor: float, settings: BaseSettings, log: Callable[[str], None],
) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    """Train the UNet and the text encoder together on the unweighted v-prediction loss (which keeps the
    pure-noise end of the zero-terminal-SNR schedule, where the prompt sets the colours and layout, fully in
    the loss); return their exponential moving averages (what sampling uses)."""
    torch.manual_seed(settings.seed + 3)
    unet = _unet(text_encoder.config.hidden_size, settings.unet_width, settings.unet_layers)
    scheduler = DDPMScheduler.from_config(DDIMScheduler(**_schedule()).config)
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=settings.unet_learning_rate, weight_decay=0.01)
    averages = [p.detach().clone() for p in parameters]
    generator = torch.Generator().manual_seed(settings.seed + 2)
    rng = np.random.default_rng([settings.seed, 2])
    unet.train()
    text_encoder.train()
    running = 0.0
    for step in range(settings.unet_steps):
        for group in optimizer.param_groups:
            group["lr"] = settings.unet_learning_rate * _warmup_cosine(step, settings.warmup_steps, settings.unet_steps)
        chosen = torch.from_numpy(rng.integers(len(means), size=settings.unet_batch))
        ids = input_ids[chosen].clone()
        dropped = torch.from_numpy(rng.random(settings.unet_batch) < settings.caption_dropout)
        ids[dropped] = empty_ids
        latents = (means[chosen] + stds[chosen] * torch.randn(means[chosen].shape, generator=generator)) * scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(chosen),), generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = scheduler.get_velocity(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, text_encoder(ids).last_hidden_state).sample
        loss = nn.functional.mse_loss(prediction, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        decay = min(settings.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for average, parameter in zip(averages, parameters):
                average.lerp_(parameter.detach(), 1 - decay)
        running += float(loss.detach())
        if (step + 1) % 250 == 0:
            log(f"unet step {step + 1}/{settings.unet_steps}: loss {running / 250:.4f}")
            running = 0.0
    with torch.no_grad():
        for average, parameter in zip(averages, parameters):
            parameter.copy_(average)
    return unet.eval(), text_encoder.eval()


def _cached_vae(cache: Path | None, images: np.ndarray, settings: BaseSettings,
                log: Callable[[str], None]) -> AutoencoderKL:
    key = json_sha256([asdict(settings)[k] for k in sorted(asdict(settings)) if k.startswith("vae") or k in
                       ("seed", "world_seed", "images", "threads")])
    if cache is not None and Path(cache).is_file():
        saved = torch.load(cache, weights_only=True)
        if saved.get("key") == key:
            vae = _vae()
            vae.load_state_dict(saved["weights"])
            log(f"vae loaded from {cache}")
            return vae.eval()
    vae = train_vae(images, settings, log)
    if cache is not None:
        torch.save({"key": key, "weights": vae.state_dict()}, cache)
    return vae


def source_hash(root: Path = Path(__file__).resolve().parents[1]) -> str:
    return json_sha256([file_sha256(root / relative) for relative in SOURCES])


def build_record(settings: BaseSettings) -> dict[str, object]:
    return {"settings": asdict(settings), "sources": source_hash(), "torch": torch.__version__}


def weight_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): file_sha256(p) for p in sorted(folder.rglob("*.safetensors"))}


def build_demo_base(out_dir: Path, settings: BaseSettings = BaseSettings(), *,
                    log: Callable[[str], None] | None = None, vae_cache: Path | None = None) -> Path:
    """Render the world (without the demo concept), train the VAE, then the UNet with the text encoder, and
    write a diffusers SD folder plus `build.json` (settings, source hash, weight hashes) into `out_dir`.

    `vae_cache`: a file holding the VAE these settings train (written when missing), for trying UNet changes
    without retraining it; every later step seeds itself, so the result is the same either way."""
    say = log or (lambda message: None)
    started = time.perf_counter()
    record = build_record(settings)  # the code as it is now, not as it may be edited during the build
    world = list(base_world_images(settings.world_seed, settings.images, side=SIDE))
    images = np.stack([np.asarray(item.image) for item in world])
    captions = [caption_of(item.tags) for item in world]
    say(f"rendered {len(world)} world images in {time.perf_counter() - started:.1f}s")
    with staged_folder(Path(out_dir), "demo base model") as staging:
        write_tokenizer(staging / "tokenizer", world_words(), whole_words=True)
        tokenizer = CLIPTokenizer.from_pretrained(staging / "tokenizer", local_files_only=True)
        with deterministic_torch(settings.seed, settings.threads):
            vae = _cached_vae(vae_cache, images, settings, say)
            means, stds = encode_all(vae, images)
            scaling_factor = float(1.0 / means.std())
            vae.register_to_config(scaling_factor=scaling_factor)
            say(f"vae trained at {time.perf_counter() - started:.0f}s; latent scaling factor {scaling_factor:.4f}")
            torch.manual_seed(settings.seed + 2)
            text_encoder = _text_encoder(tokenizer)
            unet, text_encoder = train_unet(means, stds, _tokenize(tokenizer, captions), _tokenize(tokenizer, [""])[0],
                                            text_encoder, scaling_factor, settings, say)
        pipeline = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
            scheduler=DDIMScheduler(**_schedule()), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
        pipeline.save_pretrained(staging, safe_serialization=True)
        shutil.rmtree(staging / "tokenizer")  # our tokenizer files are the source of truth, as in tiny_sd
        write_tokenizer(staging / "tokenizer", world_words(), whole_words=True)
        record["weights"] = weight_hashes(staging)
        write_text(staging / BUILD_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")
    say(f"demo base model written to {out_dir} in {time.perf_counter() - started:.0f}s")
    return Path(out_dir)


def read_record(folder: Path) -> dict[str, object]:
    try:
        return json.loads((Path(folder) / BUILD_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder} has no {BUILD_FILE}: it is not a demo base model build") from None


def verify(folder: Path, log: Callable[[str], None]) -> list[str]:
    """Rebuild `folder` from its recorded settings in a temporary folder and list what differs: weights whose
    bytes differ, or a source/torch mismatch that explains why they might. Empty means bit for bit."""
    import tempfile

    recorded = read_record(folder)
    settings = BaseSettings(**recorded["settings"])
    problems = [f"{key}: recorded {recorded[key]}, now {value}" for key, value in build_record(settings).items()
                if key != "settings" and recorded.get(key) != value]
    with tempfile.TemporaryDirectory() as tmp:
        rebuilt = build_demo_base(Path(tmp) / "demo-base", settings, log=log)
        ours = weight_hashes(rebuilt)
    problems += [f"{name}: recorded {recorded['weights'].get(name)}, rebuilt {digest}"
                 for name, digest in ours.items() if recorded["weights"].get(name) != digest]
    return problems


def main(argv: list[str]) -> int:
    say = lambda message: print(message, flush=True)  # noqa: E731
    if argv[:1] == ["--verify"]:
        folder = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parents[1] / "models" / "demo-base"
        problems = verify(folder, say)
        print("\n".join(problems) if problems else f"{folder}: rebuilt bit for bit")
        return 1 if problems else 0
    out_dir = Path(argv[0]) if argv else Path(__file__).resolve().parents[1] / "models" / "demo-base"
    build_demo_base(out_dir, log=say, vae_cache=Path(argv[1]) if len(argv) > 1 else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
