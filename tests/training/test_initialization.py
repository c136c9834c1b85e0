"""Starting vectors: from another tool's embedding file (any format), or from the dataset's existing embedding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from training.base_model import BaseModel
from training.embedding_formats import (
    load_webui_optim,
    read_embedding,
    save_diffusers_embedding,
    save_kohya_embedding,
    save_webui_pt,
    webui_embedding_dict,
)
from training.png_embedding import save_png_embedding
from training.textual_inversion import TextualInversionSettings, starting_vectors, train_textual_inversion

VECTORS = torch.arange(3 * 32, dtype=torch.float32).reshape(3, 32) / 100


def run_settings(**overrides) -> TextualInversionSettings:
    values = dict(name="mycat", vectors_per_token=2, learning_rate="0.02", max_steps=2, batch_size=2)
    return TextualInversionSettings(**{**values, **overrides})


def _files(folder: Path) -> dict[str, Path]:
    card = Image.new("RGB", (16, 16), (200, 30, 30))
    return {
        "webui": save_webui_pt(folder / "other.pt", "other", VECTORS, 100, None, None),
        "diffusers": save_diffusers_embedding(folder / "learned_embeds.safetensors", "<other>", VECTORS),
        "diffusers_bin": folder / "learned_embeds.bin",
        "kohya": save_kohya_embedding(folder / "kohya.safetensors", "other", VECTORS),
        "png": save_png_embedding(folder / "other.png", card, webui_embedding_dict("other", VECTORS, 5, None, None)),
    }


@pytest.mark.parametrize("kind", ["webui", "diffusers", "diffusers_bin", "kohya", "png"])
def test_an_embedding_from_another_tool_initialises_the_vectors(tiny_base: BaseModel, tmp_path: Path, kind: str) -> None:
    files = _files(tmp_path)
    torch.save({"<other>": VECTORS}, files["diffusers_bin"])
    path = str(files[kind])
    truncated, origin = starting_vectors(tiny_base, run_settings(initialization_embedding=path), tmp_path / "out")
    assert torch.equal(truncated, VECTORS[:2]) and origin == f"initialized from {path}"
    repeated, _ = starting_vectors(tiny_base, run_settings(initialization_embedding=path, vectors_per_token=5), tmp_path)
    assert torch.equal(repeated, VECTORS[[0, 1, 2, 0, 1]])


def test_the_initialization_embedding_is_trained_and_defines_the_run(tiny_base: BaseModel, subject_examples, tmp_path: Path) -> None:
    path = save_webui_pt(tmp_path / "other.pt", "other", VECTORS, 100, None, None)
    from_file = train_textual_inversion(tiny_base, subject_examples[:4], run_settings(initialization_embedding=str(path)), tmp_path / "a")
    from_text = train_textual_inversion(tiny_base, subject_examples[:4], run_settings(), tmp_path / "b")
    assert not torch.equal(from_file.vectors, from_text.vectors)
    assert (from_file.vectors - VECTORS[:2]).abs().max() < 0.1  # two small steps away from the file's vectors


def test_a_wrong_or_missing_initialization_file_is_named(tiny_base: BaseModel, tmp_path: Path) -> None:
    wide = save_webui_pt(tmp_path / "sd2.pt", "sd2", torch.zeros(2, 1024), 1, None, None)
    with pytest.raises(ValueError, match=r"sd2.pt: vectors of size 1024 do not fit this model's text encoder \(32\)"):
        starting_vectors(tiny_base, run_settings(initialization_embedding=str(wide)), tmp_path)
    with pytest.raises(ValueError, match=r"missing.pt: embedding file not found"):
        starting_vectors(tiny_base, run_settings(initialization_embedding=str(tmp_path / "missing.pt")), tmp_path)


def test_without_overwrite_training_continues_from_the_existing_embedding(
    tiny_base: BaseModel, subject_examples, tmp_path: Path
) -> None:
    first = train_textual_inversion(tiny_base, subject_examples[:4], run_settings(), tmp_path)
    keep = run_settings(overwrite_old_embedding=False)
    start, origin = starting_vectors(tiny_base, keep, tmp_path)
    assert torch.equal(start, first.vectors) and origin == f"continued from {tmp_path / 'mycat.pt'} at step 2"
    fresh, _ = starting_vectors(tiny_base, run_settings(), tmp_path)
    assert not torch.equal(fresh, first.vectors)  # overwriting (the default) starts over from the text
    assert torch.equal(starting_vectors(tiny_base, keep, tmp_path / "empty")[0], fresh)  # nothing to continue yet

    # The webui counts on from the embedding's step: with max_steps already reached there is nothing to do.
    with pytest.raises(ValueError, match=r"mycat.pt: already trained for 2 steps and max_steps is 2; raise max_steps"):
        train_textual_inversion(tiny_base, subject_examples[:4], keep, tmp_path)
    messages: list[str] = []
    longer = run_settings(overwrite_old_embedding=False, max_steps=4)
    continued = train_textual_inversion(tiny_base, subject_examples[:4], longer, tmp_path, log=messages.append)
    assert (continued.steps, continued.continued_from, len(continued.losses)) == (4, 2, 2)
    assert f"optimizer state loaded from {tmp_path / 'mycat.pt'}.optim" in messages  # AdamW's moments carry on
    assert read_embedding(tmp_path / "mycat.pt").step == 4
    steps = [int(line.split(",")[0]) for line in (tmp_path / "loss.csv").read_text().splitlines()[1:]]
    assert steps == [3, 4]
    again = train_textual_inversion(tiny_base, subject_examples[:4], run_settings(), tmp_path / "again")
    assert torch.equal(again.vectors, first.vectors)
    assert not torch.equal(continued.vectors, first.vectors)


def test_an_optimizer_state_of_other_vectors_is_not_loaded(tiny_base: BaseModel, subject_examples, tmp_path: Path) -> None:
    train_textual_inversion(tiny_base, subject_examples[:4], run_settings(), tmp_path)
    saved = torch.load(tmp_path / "mycat.pt.optim", weights_only=True)
    assert load_webui_optim(tmp_path / "mycat.pt", read_embedding(tmp_path / "mycat.pt").vectors, "AdamW") is not None
    assert load_webui_optim(tmp_path / "mycat.pt", torch.ones(2, 32), "AdamW") is None  # the webui's checksum
    assert load_webui_optim(tmp_path / "mycat.pt", read_embedding(tmp_path / "mycat.pt").vectors, "AdamW8bit") is None
    assert saved["optimizer_name"] == "AdamW"
