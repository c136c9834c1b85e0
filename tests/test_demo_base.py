"""The demo base model builder (embedded/demo_base.py), on a smoke-sized build: the same settings give the same
bytes, the folder is an SD folder our loader and the grid's pipeline use, and its schedule is what the text
says. Whether a full build draws what it is asked is bench/demo_base.py's measurement, not a test's."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.demo_base import generate_images, probes, recognised, tag_images
from embedded import DEMO_BASE
from embedded.demo_base import (
    BUILD_FILE,
    BaseSettings,
    build_demo_base,
    read_record,
    source_hash,
    weight_hashes,
    world_words,
)
from embedded.tiny_sd import write_tokenizer
from tagging.categories import CHARACTER_CATEGORY, GENERAL_CATEGORY
from training.base_model import load_base_model
from training.evaluation import build_pipeline

SHIPPED = Path(__file__).resolve().parents[1] / DEMO_BASE
SMOKE = BaseSettings(images=48, vae_steps=3, vae_batch=4, unet_steps=3, unet_batch=4, warmup_steps=2)


@pytest.fixture(scope="module")
def smoke_base(tmp_path_factory) -> Path:
    return build_demo_base(tmp_path_factory.mktemp("demo_base") / "base", SMOKE)


def test_the_build_is_deterministic_and_records_itself(smoke_base: Path, tmp_path: Path) -> None:
    again = build_demo_base(tmp_path / "again", SMOKE, vae_cache=tmp_path / "vae.pt")
    assert weight_hashes(again) == weight_hashes(smoke_base) != {}
    # The cached VAE gives the same model as training it: every later stage seeds itself.
    cached = build_demo_base(tmp_path / "cached", SMOKE, vae_cache=tmp_path / "vae.pt")
    assert weight_hashes(cached) == weight_hashes(smoke_base)
    record = read_record(smoke_base)
    assert record["settings"]["images"] == 48 and record["weights"] == weight_hashes(smoke_base)
    assert sorted(p.name for p in smoke_base.iterdir()) == sorted(
        [BUILD_FILE, "model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae"])
    with pytest.raises(FileNotFoundError, match="not a demo base model build"):
        read_record(tmp_path)


def test_folder_loads_and_generates_through_the_grid_pipeline(smoke_base: Path) -> None:
    base = load_base_model(smoke_base)
    config = base.scheduler_config
    assert config["prediction_type"] == "v_prediction" and config["rescale_betas_zero_snr"]
    assert base.vae.config.scaling_factor != 0.18215  # measured on its own latents, as SD's was
    image = build_pipeline(base, "dpm")("red circle, circle", num_inference_steps=3, height=64, width=64,
                                        generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    # Every word of the world's tags is one token, and captions round-trip through the tokenizer.
    text = " ".join(world_words())
    ids = base.tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) == len(world_words()) and base.tokenizer.decode(ids) == text
    assert json.loads((smoke_base / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"


def test_recognised_needs_every_asked_tag_above_its_category_threshold() -> None:
    names = ["red_circle", "circle", "bolt_(world)"]
    categories = [GENERAL_CATEGORY, GENERAL_CATEGORY, CHARACTER_CATEGORY]
    scores = np.array([[0.9, 0.9, 0.9], [0.3, 0.9, 0.9], [0.9, 0.9, 0.8]], dtype=np.float32)
    assert recognised(scores, names, categories, ("red_circle", "circle")).tolist() == [True, False, True]
    assert recognised(scores, names, categories, ("bolt_(world)",)).tolist() == [True, True, False]
    assert all(probe.asked and "[" not in probe.prompt for probe in probes())


def test_the_shipped_model_is_what_the_builder_writes_today(tmp_path: Path) -> None:
    """models/demo-base is shipped (its build takes most of an hour); its record must say it was built by
    today's sources with today's default settings, and its bytes must be the recorded ones, so that
    `python -m embedded.demo_base --verify` is a claim about this very code. A change to the world or the
    builder fails here until the model is rebuilt."""
    record = read_record(SHIPPED)
    assert record["weights"] == weight_hashes(SHIPPED) and len(record["weights"]) == 3
    assert record["settings"] == asdict(BaseSettings())
    assert record["sources"] == source_hash(), "demo world or builder changed: rebuild models/demo-base"
    write_tokenizer(tmp_path / "tokenizer", world_words(), whole_words=True)
    for written in sorted((tmp_path / "tokenizer").iterdir()):
        assert (SHIPPED / "tokenizer" / written.name).read_bytes() == written.read_bytes()


def test_the_shipped_model_draws_the_colour_and_shape_it_is_asked_for() -> None:
    """bench/demo_base.py's first probe on four seeds, with its settings: the demo tagger finds the asked red
    circle in most images, and never in the images of the empty prompt (the full figures are the benchmark's)."""
    from embedded import DEMO_TAGGER
    from tagging.wd14 import WD14Tagger

    tagger = WD14Tagger(SHIPPED.parents[1] / DEMO_TAGGER)
    names, categories = [t.name for t in tagger.tags], [t.category for t in tagger.tags]
    pipeline = build_pipeline(load_base_model(SHIPPED), "dpm")
    probe = probes()[0]
    assert probe.asked == ("red_circle",)
    asked = recognised(tag_images(tagger, generate_images(pipeline, probe.prompt, 4, steps=20, cfg=5.0)),
                       names, categories, probe.asked)
    unasked = recognised(tag_images(tagger, generate_images(pipeline, "", 4, steps=20, cfg=5.0)),
                         names, categories, probe.asked)
    assert asked.sum() >= 3 and unasked.sum() == 0
