"""The tiny CLIP builder and the CLIP scorer: loading, embeddings, similarities, bad folders, prompt cleaning."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.hashing import file_sha256
from embedded.tiny_clip import IMAGE_SIDE, PROJECTION_DIM, build_tiny_clip
from training.clip_scores import ClipModelError, ClipScorer, prompt_without_name

OPENAI_LAYOUT = {"config.json", "model.safetensors", "preprocessor_config.json", "vocab.json", "merges.txt",
                 "tokenizer_config.json", "special_tokens_map.json"}


def noise(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def disc(colour: tuple[int, int, int], side: int = 64) -> Image.Image:
    image = Image.new("RGB", (side, side), (30, 30, 30))
    pixels = np.array(image)
    yy, xx = np.mgrid[:side, :side]
    pixels[(yy - side // 2) ** 2 + (xx - side // 2) ** 2 < (side // 4) ** 2] = colour
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def scorer(tiny_clip_dir: Path) -> ClipScorer:
    return ClipScorer.load(tiny_clip_dir, "cpu", batch_size=2)


def test_tiny_clip_has_the_openai_layout_and_builds_identically(tiny_clip_dir: Path, tmp_path: Path) -> None:
    assert OPENAI_LAYOUT <= {path.name for path in tiny_clip_dir.iterdir()}
    config = json.loads((tiny_clip_dir / "config.json").read_text())
    assert config["model_type"] == "clip" and config["projection_dim"] == PROJECTION_DIM
    assert config["vision_config"]["image_size"] == IMAGE_SIDE
    again = build_tiny_clip(tmp_path / "again", seed=0)
    for name in OPENAI_LAYOUT:
        assert file_sha256(again / name) == file_sha256(tiny_clip_dir / name), name
    with pytest.raises(FileExistsError, match="again"):
        build_tiny_clip(again)


def test_its_text_tower_is_the_tiny_sd_text_encoder(scorer: ClipScorer, tiny_base) -> None:
    """As CLIP ViT-L/14's text tower is SD 1.x's text encoder, which the aesthetic application relies on."""
    clip_text = scorer.model.text_model.state_dict()
    sd_text = tiny_base.text_encoder.state_dict()
    assert clip_text.keys() == sd_text.keys()
    assert all(torch.equal(clip_text[key], sd_text[key].cpu()) for key in sd_text)
    assert scorer.tokenizer.get_vocab() == tiny_base.tokenizer.get_vocab()


def test_image_embeddings_are_unit_rows_and_independent_of_batching(scorer: ClipScorer, tiny_clip_dir: Path) -> None:
    images = [noise(seed) for seed in range(5)]
    embeddings = scorer.image_embeddings(images)
    assert embeddings.shape == (5, PROJECTION_DIM) and embeddings.dtype == torch.float32
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(5), atol=1e-5)
    one_batch = ClipScorer.load(tiny_clip_dir, batch_size=16).image_embeddings(images)
    assert torch.allclose(embeddings, one_batch, atol=1e-5)


def test_image_similarity_is_a_cosine_and_deterministic(scorer: ClipScorer, tmp_path: Path) -> None:
    reds = [disc((220, 40, 40), side) for side in (56, 64, 72)]
    path = tmp_path / "red.png"
    reds[0].save(path)
    generated = [path, disc((40, 200, 60)), noise(7)]
    scores = scorer.image_similarity(generated, reds)
    assert scores.shape == (3,) and ((scores >= -1) & (scores <= 1)).all()
    assert torch.equal(scores, scorer.image_similarity(generated, reds))
    assert scorer.image_similarity([reds[1]], [reds[1]]).item() == pytest.approx(1.0, abs=1e-5)
    assert scores[0] > scores[1] and scores[0] > scores[2]  # the training-like image is the closest


def test_text_similarity_pairs_each_image_with_its_text(scorer: ClipScorer) -> None:
    images = [noise(1), disc((220, 40, 40))]
    texts = ["a photo of a cat", "red round"]
    scores = scorer.text_similarity(images, texts)
    assert scores.shape == (2,) and ((scores >= -1) & (scores <= 1)).all()
    manual = (scorer.image_embeddings(images) * scorer.text_embeddings(texts)).sum(-1)
    assert torch.allclose(scores, manual)
    assert not torch.allclose(scores, scorer.text_similarity(images, texts[::-1]))
    with pytest.raises(ValueError, match="2 images and 1 texts"):
        scorer.text_similarity(images, texts[:1])


def test_missing_folder_and_files_are_named(tiny_clip_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ClipModelError, match=f"{tmp_path / 'nowhere'} does not exist"):
        ClipScorer.load(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_clip_dir, broken)
    (broken / "preprocessor_config.json").unlink()
    (broken / "merges.txt").unlink()
    with pytest.raises(ClipModelError, match=r"broken is missing preprocessor_config.json; tokenizer.json or vocab"):
        ClipScorer.load(broken)


def test_a_folder_that_is_not_clip_says_so(tiny_clip_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "blip"
    shutil.copytree(tiny_clip_dir, other)
    (other / "config.json").write_text(json.dumps({"model_type": "blip"}))
    with pytest.raises(ClipModelError, match=r"blip is not a CLIP model: config.json says model_type 'blip'"):
        ClipScorer.load(other)
    (other / "config.json").write_text("{not json")
    with pytest.raises(ClipModelError, match="not a valid model config"):
        ClipScorer.load(other)


def test_an_unreadable_image_is_named(scorer: ClipScorer, tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="bad.png: cannot be read as an image"):
        scorer.image_embeddings([bad])


@pytest.mark.parametrize(("prompt", "expected"), [
    ("a photo of [name], smiling", "a photo of smiling"),
    ("[name], outdoors, night", "outdoors, night"),
    ("smiling, [name]", "smiling"),
    ("a, [name], b", "a, b"),
    ("a painting of [name] in a forest", "a painting of in a forest"),
    ("  [name] ,  red hat ,, blue  ", "red hat, blue"),
    ("[name] and [name]", "and"),
    ("[name]", ""),
    ("no keyword here", "no keyword here"),
])  # fmt: skip
def test_prompt_without_name(prompt: str, expected: str) -> None:
    assert prompt_without_name(prompt) == expected


def test_prompt_without_another_keyword() -> None:
    assert prompt_without_name("a photo of pip, smiling", "pip") == "a photo of smiling"
    with pytest.raises(ValueError, match="keyword"):
        prompt_without_name("a photo", "")
