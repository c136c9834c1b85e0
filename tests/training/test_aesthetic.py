"""Aesthetic embeddings: the extension's `.pt` layout, and its generation-time application on a copy of the
text encoder (the shared base encoder stays bit-identical)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.training.test_clip_scores import disc, noise
from training.aesthetic import (
    EMBEDDINGS_DIR,
    AestheticGradients,
    AestheticOptions,
    aesthetic_conditioning,
    create_aesthetic_embedding,
    load_aesthetic_embedding,
    optimised_text_encoder,
    save_aesthetic_embedding,
    slerp,
)
from training.clip_scores import ClipScorer, normalized
from training.evaluation import build_pipeline, prompt_embeddings

PROMPT = "a photo of a cat"
FAST = AestheticOptions(aesthetic_steps=5, aesthetic_lr=0.01)


@pytest.fixture(scope="module")
def scorer(tiny_clip_dir: Path) -> ClipScorer:
    return ClipScorer.load(tiny_clip_dir, "cpu")


@pytest.fixture(scope="module")
def embedding_file(scorer: ClipScorer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    images = [disc((220, 40, 40), side) for side in (48, 64, 80)] + [noise(3)]
    path = tmp_path_factory.mktemp("aesthetic") / EMBEDDINGS_DIR / "reds.pt"
    save_aesthetic_embedding(path, create_aesthetic_embedding(scorer, images))
    return path


@pytest.fixture(scope="module")
def pipeline(tiny_base):
    return build_pipeline(tiny_base)


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def _same(before: dict[str, torch.Tensor], module: torch.nn.Module) -> bool:
    after = module.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[key], after[key]) for key in before)


def test_the_pt_is_the_extensions_bare_mean_tensor(scorer: ClipScorer, embedding_file: Path) -> None:
    stored = torch.load(embedding_file, weights_only=True)
    assert isinstance(stored, torch.Tensor) and stored.shape == (1, scorer.model.config.projection_dim)
    assert stored.dtype == torch.float32 and stored.device.type == "cpu"
    images = [disc((220, 40, 40), side) for side in (48, 64, 80)] + [noise(3)]
    assert torch.allclose(stored, scorer.raw_image_features(images).mean(dim=0, keepdim=True), atol=1e-6)
    assert stored.norm() != pytest.approx(1.0)  # stored raw, as the extension does; normalised on load
    loaded = load_aesthetic_embedding(embedding_file)
    assert loaded.norm().item() == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(loaded, stored / stored.norm())


def test_bad_aesthetic_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        load_aesthetic_embedding(tmp_path / "nothing.pt")
    wrong = tmp_path / "wrong.pt"
    torch.save({"string_to_param": {"*": torch.ones(1, 4)}}, wrong)
    with pytest.raises(ValueError, match=r"wrong.pt: an aesthetic embedding is a float tensor of shape"):
        load_aesthetic_embedding(wrong)
    torch.save(torch.zeros(1, 4), wrong)
    with pytest.raises(ValueError, match="zero or contains NaN"):
        load_aesthetic_embedding(wrong)
    with pytest.raises(ValueError, match=r"shape \(1, projection_dim\), got \(2, 4\)"):
        save_aesthetic_embedding(tmp_path / "two.pt", torch.ones(2, 4))
    with pytest.raises(ValueError, match="NaN"):
        save_aesthetic_embedding(tmp_path / "nan.pt", torch.full((1, 4), math.nan))
    assert {path.name for path in tmp_path.iterdir()} == {"wrong.pt"}  # refused saves leave no file behind


def test_application_moves_the_conditioning_and_leaves_the_models_alone(
    pipeline, scorer: ClipScorer, embedding_file: Path
) -> None:
    encoder_before, projection_before = _weights(pipeline.text_encoder), _weights(scorer.model.text_projection)
    base = prompt_embeddings(pipeline, PROMPT, 1)
    aesthetic = AestheticGradients.load(scorer, embedding_file, FAST)
    moved = aesthetic.prompt_embeds(pipeline, PROMPT)
    assert moved.shape == base.shape and torch.isfinite(moved).all()
    assert not torch.allclose(moved, base, atol=1e-3)
    assert torch.equal(moved, aesthetic.prompt_embeds(pipeline, PROMPT))  # deterministic
    assert _same(encoder_before, pipeline.text_encoder) and _same(projection_before, scorer.model.text_projection)
    assert not any(parameter.requires_grad for parameter in pipeline.text_encoder.parameters())
    assert torch.equal(prompt_embeddings(pipeline, PROMPT, 1), base)


def test_the_optimised_copy_points_the_prompt_at_the_embedding(pipeline, scorer: ClipScorer, embedding_file: Path) -> None:
    target = load_aesthetic_embedding(embedding_file)
    ids = pipeline.tokenizer([PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids
    projection = scorer.model.text_projection

    def cosine(encoder) -> float:
        with torch.no_grad():
            return (normalized(projection(encoder(input_ids=ids).pooler_output)) @ target.T).item()

    copy = optimised_text_encoder(pipeline.text_encoder, pipeline.tokenizer, projection, target, ids, FAST)
    assert copy is not pipeline.text_encoder
    assert cosine(copy) > cosine(pipeline.text_encoder) + 0.05


def test_inactive_options_return_the_conditioning_itself(pipeline, scorer: ClipScorer, embedding_file: Path) -> None:
    base = prompt_embeddings(pipeline, PROMPT, 1)
    for options in (AestheticOptions(aesthetic_steps=0), AestheticOptions(aesthetic_lr=0), AestheticOptions(aesthetic_weight=0)):
        assert torch.equal(AestheticGradients.load(scorer, embedding_file, options).prompt_embeds(pipeline, PROMPT), base)


def test_weight_one_is_the_copys_conditioning_and_slerp_and_text_options_differ(
    pipeline, scorer: ClipScorer, embedding_file: Path
) -> None:
    def embeds(**options) -> torch.Tensor:
        chosen = AestheticOptions(aesthetic_steps=3, aesthetic_lr=0.01, **options)
        return AestheticGradients.load(scorer, embedding_file, chosen).prompt_embeds(pipeline, PROMPT, clip_skip=2)

    base = prompt_embeddings(pipeline, PROMPT, 2)
    linear, full = embeds(aesthetic_weight=0.5), embeds(aesthetic_weight=1.0)
    assert torch.allclose(linear, 0.5 * base + 0.5 * full, atol=1e-5)
    variants = [embeds(aesthetic_slerp=True), embeds(aesthetic_imgs_text="red round"),
                embeds(aesthetic_imgs_text="red round", aesthetic_text_negative=True, aesthetic_slerp_angle=0.5)]
    for variant in variants:
        assert torch.isfinite(variant).all() and not torch.allclose(variant, embeds(), atol=1e-6)


def test_a_clip_that_does_not_fit_the_text_encoder_is_refused(pipeline, embedding_file: Path) -> None:
    embedding = load_aesthetic_embedding(embedding_file)
    ids = pipeline.tokenizer([PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids
    base = prompt_embeddings(pipeline, PROMPT, 1)
    wide = torch.nn.Linear(768, embedding.shape[1], bias=False)
    with pytest.raises(ValueError, match=r"reads width 768 .* 32 wide: .*ViT-L/14"):
        aesthetic_conditioning(pipeline.text_encoder, pipeline.tokenizer, wide, embedding, ids, base, FAST)
    narrow = torch.nn.Linear(32, 7, bias=False)
    with pytest.raises(ValueError, match="has 32 values but the CLIP model projects to 7"):
        aesthetic_conditioning(pipeline.text_encoder, pipeline.tokenizer, narrow, embedding, ids, base, FAST)


def test_slerp_follows_the_sphere_and_is_safe_when_parallel() -> None:
    x, y = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    half = slerp(x, y, 0.5)
    assert torch.allclose(half, torch.tensor([[math.sqrt(0.5), math.sqrt(0.5)]]), atol=1e-6)
    assert torch.allclose(slerp(x, y, 0.0), x, atol=1e-6) and torch.allclose(slerp(x, y, 1.0), y, atol=1e-6)
    assert torch.allclose(slerp(x, 2 * x, 0.25), 1.25 * x)  # parallel: the linear limit, not NaN
    conditioning = torch.randn(2, 77, 8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(slerp(conditioning, conditioning, 0.3), conditioning, atol=1e-5)


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="aesthetic_weight"):
        AestheticOptions(aesthetic_weight=1.5)
    with pytest.raises(ValueError, match="aesthetic_steps"):
        AestheticOptions(aesthetic_steps=-1)
