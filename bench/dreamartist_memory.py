"""Peak memory of DreamArtist training on the tiny model, per memory option.

Run: `PYTHONPATH=. HF_HUB_OFFLINE=1 python bench/dreamartist_memory.py [--steps 4] [--side 128]`

There is no CUDA here, so memory is the process's CPU peak resident set (`ru_maxrss`): each configuration
runs in its own fresh process, which loads the model and encodes the latents into the cache, notes its current
resident set, trains `--steps` steps and reports the peak minus that baseline: the memory training adds
(activations kept for the backward pass, gradients, AdamW state).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = {
    "default (reconstruction off)": {},
    "reconstruction_weight 1": {"reconstruction_weight": 1.0},
    "gradient_checkpointing": {"gradient_checkpointing": True},
    "reconstruction + gradient_checkpointing": {"reconstruction_weight": 1.0, "gradient_checkpointing": True},
    "batch_size 2": {"batch_size": 2},
}


def _current_rss_mb() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def measure(overrides: dict, steps: int, side: int) -> dict:
    import numpy as np
    from PIL import Image

    from embedded.tiny_sd import build_tiny_sd
    from training.base_model import load_base_model
    from training.dreamartist import DreamArtistSettings, train_dreamartist
    from training.latent_cache import latent_distributions
    from training.training_loop import TrainingExample

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        model = build_tiny_sd(root / "model", seed=0)
        base = load_base_model(model)
        rng = np.random.default_rng(0)
        examples = []
        for index in range(4):
            path = root / f"{index}.png"
            Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(path)
            examples.append(TrainingExample(path, "red, round"))
        cache = root / "latents"
        latent_distributions(base.vae, [example.image_path for example in examples], base.vae_scale_factor, cache)
        baseline = _current_rss_mb()
        train_dreamartist(base, examples, DreamArtistSettings(name="mycat", max_steps=steps, **overrides), root / "run",
                          latent_cache=cache)  # fmt: skip
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"baseline_mb": round(baseline, 1), "peak_mb": round(peak, 1), "added_mb": round(peak - baseline, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--side", type=int, default=128)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(json.loads(args.one), args.steps, args.side)))
        return
    print(f"| option (tiny model, {args.side} px, {args.steps} steps) | baseline RSS MB | peak RSS MB | added by training MB |")
    print("|---|---|---|---|")
    for label, overrides in CONFIGS.items():
        done = subprocess.run(
            [sys.executable, __file__, "--steps", str(args.steps), "--side", str(args.side), "--one", json.dumps(overrides)],
            capture_output=True, text=True, check=True, cwd=ROOT,
        )  # fmt: skip
        row = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"| {label} | {row['baseline_mb']} | {row['peak_mb']} | {row['added_mb']} |")


if __name__ == "__main__":
    main()
