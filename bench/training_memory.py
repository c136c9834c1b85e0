"""Peak memory of each training method and each memory-saving option, on the tiny model.

Run: `PYTHONPATH=. HF_HUB_OFFLINE=1 python bench/training_memory.py [--steps 4] [--side 128] [--batch-size 2]`

Each (method, options) pair trains in its own process, so its peak is its own: the figure is the growth of
the process's peak resident memory (max RSS, `resource.getrusage`) from after the model is loaded to the end
of training, i.e. what training itself needs (activations, gradients, optimizer state, caches). There is no
GPU here, so these are CPU figures; on CUDA the same options save device memory in the same direction,
and the ratios, not the megabytes, carry over. Options: gradient checkpointing (recompute activations in
the backward pass), bf16 autocast (half-width activations), and batch 1 with 2 accumulation steps instead
of batch 2 (the same effective batch).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OPTIONS = {
    "baseline": {},
    "gradient_checkpointing": {"gradient_checkpointing": True},
    "bf16": {"mixed_precision": "bf16"},
    "batch 1 x accumulation 2": {"batch_size": 1, "gradient_accumulation_steps": 2},
}
# Options only one method has.
METHOD_OPTIONS = {
    "dreamartist": {
        "reconstruction_weight 1": {"reconstruction_weight": 1.0},
        "reconstruction + gradient_checkpointing": {"reconstruction_weight": 1.0, "gradient_checkpointing": True},
    },
}


def options_of(method: str) -> dict[str, dict]:
    return {**OPTIONS, **METHOD_OPTIONS.get(method, {})}


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _trainers() -> dict[str, Callable]:
    """method -> train(base, examples, overrides, out_dir); each method's own entry point and defaults."""
    from training.dreamartist import DreamArtistSettings, train_dreamartist
    from training.hypernetwork_training import HypernetworkOptions, train_hypernetwork
    from training.textual_inversion import TextualInversionSettings, train_textual_inversion
    from training.training_loop import LoopSettings

    def textual_inversion(base, examples, overrides, out):
        settings = TextualInversionSettings(name="mycat", vectors_per_token=4, **overrides)
        return train_textual_inversion(base, examples, settings, out)

    def hypernetwork(base, examples, overrides, out):
        settings = LoopSettings(name="myhyper", learning_rate="1e-5", template="hypernetwork", **overrides)
        return train_hypernetwork(base, examples, settings, HypernetworkOptions(), out)

    def dreambooth(base, examples, overrides, out):
        """Prior preservation on: two class images sampled (without gradients) at the images' size first."""
        from PIL import Image

        from training.class_images import ClassImageSpec, generate_class_images
        from training.dreambooth import DreamBoothOptions, train_dreambooth

        with Image.open(examples[0].image_path) as image:
            side = image.width
        spec = ClassImageSpec(prompt="a photo of a round thing", size=side, count=2, steps=2, sampler="ddim")
        class_images = generate_class_images(base, spec, Path(out) / "class_images").paths
        settings = LoopSettings(name="sks", learning_rate="5e-6", template="subject", **overrides)
        return train_dreambooth(base, examples, settings, DreamBoothOptions(class_prompt=spec.prompt), out,
                                class_images=class_images)  # fmt: skip

    def lora(base, examples, overrides, out):
        from training.lora import LoraTraining, train_lora

        settings = LoopSettings(name="mylora", learning_rate="1e-4", **overrides)
        return train_lora(base, examples, settings, LoraTraining(), out)

    def dreamartist(base, examples, overrides, out):
        return train_dreamartist(base, examples, DreamArtistSettings(name="mycat", **overrides), out)

    return {"textual_inversion": textual_inversion, "hypernetwork": hypernetwork, "lora": lora,
            "dreambooth": dreambooth, "dreamartist": dreamartist}


def child(job: dict) -> None:
    """One measurement: load, then train, reporting the peak before and after training."""
    from bench.textual_inversion import write_images
    from training.base_model import load_base_model

    work = Path(job["work"])
    base = load_base_model(work / "model", device="cpu")
    examples = write_images(work / "images", job["images"], job["side"])
    loaded = _max_rss_mb()
    overrides = {"max_steps": job["steps"], "batch_size": job["batch_size"], **options_of(job["method"])[job["option"]]}
    _trainers()[job["method"]](base, examples, overrides, work / "out" / job["method"] / job["option"])
    print(json.dumps({"loaded_mb": loaded, "peak_mb": _max_rss_mb()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--side", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--methods", nargs="*", default=None, help="default: every method")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    from embedded.tiny_sd import build_tiny_sd

    methods = args.methods or list(_trainers())
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        build_tiny_sd(work / "model", seed=0)
        print(f"peak RSS growth during training, MB (tiny SD, {args.side} px, {args.steps} steps, "
              f"batch {args.batch_size}; each row its own process)")  # fmt: skip
        print(f"{'method':20s} {'option':26s} {'training MB':>12s} {'vs baseline':>12s}")
        for method in methods:
            baseline = None
            for option in options_of(method):
                job = {"work": str(work), "method": method, "option": option, "steps": args.steps,
                       "side": args.side, "batch_size": args.batch_size, "images": args.images}  # fmt: skip
                done = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True,
                                      text=True, cwd=ROOT, check=True)  # fmt: skip
                figures = json.loads(done.stdout.strip().splitlines()[-1])
                growth = figures["peak_mb"] - figures["loaded_mb"]
                baseline = growth if baseline is None else baseline
                print(f"{method:20s} {option:26s} {growth:12.1f} {growth / baseline:12.2f}x")


if __name__ == "__main__":
    main()
