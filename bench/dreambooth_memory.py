"""Peak memory of DreamBooth's memory options on the tiny model (CPU: `torch.cuda` is absent here).

Run: `PYTHONPATH=. HF_HUB_OFFLINE=1 python bench/dreambooth_memory.py [--steps 4] [--side 64] [--images 8]`

How it measures: each configuration runs in its own process, which builds the tiny model and images, loads
the model, encodes the latents and then reads its peak resident set size (`resource.getrusage(RUSAGE_SELF)
.ru_maxrss`) before training; after `--steps` DreamBooth steps (batch 2, prior preservation with 2 class
images) it reads the peak again. The table prints the difference: the extra memory training took (the
trainable UNet copy, gradients, AdamW moments and activations), in MiB. On the tiny model the numbers are
small and include allocator noise of a few MiB; they show the direction of each option, not SD 1.5's
sizes. 8-bit AdamW is measured only where bitsandbytes can run (CUDA); elsewhere the row says why not.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from embedded.tiny_sd import build_tiny_sd  # noqa: E402
from training.base_model import load_base_model  # noqa: E402
from training.class_images import ClassImageSpec, generate_class_images  # noqa: E402
from training.dreambooth import DreamBoothOptions, train_dreambooth  # noqa: E402
from training.latent_cache import latent_distributions  # noqa: E402
from training.optimizers import available_adamw  # noqa: E402
from training.training_loop import LoopSettings, TrainingExample  # noqa: E402

CONFIGS = {
    "adamw, fp32": {},
    "+ gradient_checkpointing": {"gradient_checkpointing": True},
    "+ mixed_precision bf16": {"mixed_precision": "bf16"},
    "+ both": {"gradient_checkpointing": True, "mixed_precision": "bf16"},
    "train_text_encoder": {"train_text_encoder": True},
    "adamw8bit": {"optimizer": "adamw8bit"},
}


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(config: str, steps: int, side: int, images: int) -> dict:
    """One configuration in this process: the peak RSS growth over the training steps."""
    from tests.training.conftest import write_subject_image

    overrides = dict(CONFIGS[config])
    train_text_encoder = overrides.pop("train_text_encoder", False)
    work = Path(tempfile.mkdtemp())
    base = load_base_model(build_tiny_sd(work / "model", seed=0))
    if overrides.get("optimizer") == "adamw8bit":
        chosen, why = available_adamw(base.device)
        if chosen != "adamw8bit":
            return {"config": config, "skipped": why.split(";")[0]}
    rng = np.random.default_rng(0)
    (work / "images").mkdir()
    examples = [
        TrainingExample(write_subject_image(work / "images" / f"{index}.png", rng, side), "red, round")
        for index in range(images)
    ]
    spec = ClassImageSpec(prompt="a photo of a round thing", size=side, count=2, steps=2, sampler="ddim")
    class_images = generate_class_images(base, spec, work / "class").paths
    cache = work / "latents"
    latent_distributions(base.vae, [example.image_path for example in examples] + class_images, 8, cache)
    before = peak_mib()
    settings = LoopSettings(name="sks", learning_rate="1e-4", batch_size=2, max_steps=steps, template="subject",
                            **overrides)  # fmt: skip
    options = DreamBoothOptions(class_prompt=spec.prompt, train_text_encoder=train_text_encoder)
    train_dreambooth(base, examples, settings, options, work / "out", class_images=class_images, latent_cache=cache)
    return {"config": config, "before_mib": before, "training_mib": peak_mib() - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        torch.manual_seed(0)
        print(json.dumps(run_one(args.one, args.steps, args.side, args.images)))
        return
    print(f"DreamBooth on the tiny model, {args.side}px, batch 2 + 2 class images, {args.steps} steps, CPU")
    print(f"{'configuration':28} {'peak RSS growth (MiB)':>22}")
    for config in CONFIGS:
        command = [sys.executable, __file__, "--one", config, "--steps", str(args.steps), "--side", str(args.side),
                   "--images", str(args.images)]  # fmt: skip
        output = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT).stdout
        result = json.loads(output.strip().splitlines()[-1])
        shown = f"{result['training_mib']:.1f}" if "training_mib" in result else f"n/a ({result['skipped']})"
        print(f"{config:28} {shown:>22}")


if __name__ == "__main__":
    main()
