from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from training.base_model import BaseModel
from training.embedding_formats import save_diffusers_embedding, save_webui_pt
from training.evaluation import SAMPLERS, build_pipeline, prompt_embeddings, render_grid
from training.prompt_encoding import encode_prompts, tokenize_with_placeholder


@pytest.fixture(scope="module")
def vectors() -> torch.Tensor:
    return torch.randn(2, 32, generator=torch.Generator().manual_seed(3)) * 0.5


@pytest.fixture(scope="module")
def embedding_files(tmp_path_factory: pytest.TempPathFactory, vectors: torch.Tensor, tiny_base: BaseModel) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("embeddings")
    return {
        "webui_pt": save_webui_pt(folder / "mycat.pt", "mycat", vectors, 40, tiny_base.short_hash, tiny_base.name),
        "diffusers": save_diffusers_embedding(folder / "learned_embeds.safetensors", "mycat", vectors, step=40),
    }


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_builds_from_the_loaded_components(tiny_base: BaseModel, sampler: str) -> None:
    pipeline = build_pipeline(tiny_base, sampler)
    assert isinstance(pipeline.scheduler, SAMPLERS[sampler])
    assert pipeline.unet is tiny_base.unet and pipeline.text_encoder is tiny_base.text_encoder
    assert pipeline.safety_checker is None


def test_unknown_sampler_is_an_error(tiny_base: BaseModel) -> None:
    with pytest.raises(ValueError, match="unknown sampler 'k_lms'; choose one of ddim, dpm"):
        build_pipeline(tiny_base, "k_lms")


@pytest.mark.parametrize("key", ["webui_pt", "diffusers"])
@pytest.mark.parametrize("clip_skip", [1, 2])
def test_loaded_embedding_changes_the_conditioning_exactly_as_trained(
    tiny_base: BaseModel, embedding_files: dict[str, Path], vectors: torch.Tensor, key: str, clip_skip: int
) -> None:
    """diffusers' load_textual_inversion reads our file, and the token then conditions the model exactly
    as our training-time encoding of the same vectors did (so what we trained is what users get)."""
    pipeline = build_pipeline(tiny_base)
    with torch.no_grad():
        without = prompt_embeddings(pipeline, "a photo of a", clip_skip)
        placeholder = tokenize_with_placeholder(tiny_base.tokenizer, ["a photo of a mycat"], "mycat", 2)
        trained = encode_prompts(tiny_base.text_encoder, placeholder, vectors, clip_skip)
    pipeline.load_textual_inversion(str(embedding_files[key]), token="mycat")
    try:
        with_token = prompt_embeddings(pipeline, "a photo of a mycat", clip_skip)
        if clip_skip == 1:
            diffusers_own, _ = pipeline.encode_prompt("a photo of a mycat", "cpu", 1, False)
            torch.testing.assert_close(diffusers_own, with_token, rtol=0, atol=1e-6)
    finally:
        pipeline.unload_textual_inversion(["mycat", "mycat_1"])
        pipeline.text_encoder.requires_grad_(False)
    assert not torch.allclose(with_token, without)
    torch.testing.assert_close(with_token, trained, rtol=0, atol=1e-5)


def test_grid_is_deterministic_labelled_and_leaves_the_model_as_it_was(
    tiny_base: BaseModel, embedding_files: dict[str, Path], tmp_path: Path
) -> None:
    pipeline = build_pipeline(tiny_base, "euler_a")
    vocabulary = len(tiny_base.tokenizer)
    table = tiny_base.text_encoder.get_input_embeddings().weight.detach().clone()
    arguments = dict(
        prompts=["a photo of a [name]", "[name] painting"], seeds=[1, 2, 3], name="mycat", steps=4, cfg_scale=5.0, clip_skip=2
    )
    first = render_grid(pipeline, embedding_files["webui_pt"], out_path=tmp_path / "a" / "eval_grid.png", **arguments)
    second = render_grid(pipeline, embedding_files["webui_pt"], out_path=tmp_path / "b" / "eval_grid.png", **arguments)

    assert first.read_bytes() == second.read_bytes()
    assert len(tiny_base.tokenizer) == vocabulary
    assert torch.equal(tiny_base.text_encoder.get_input_embeddings().weight, table)
    assert not any(parameter.requires_grad for parameter in tiny_base.text_encoder.parameters())
    cells = sorted(p.name for p in (tmp_path / "a" / "eval_grid_cells").iterdir())
    assert cells == [f"row{r}_seed{s}.png" for r in range(2) for s in (1, 2, 3)]
    cell_dir = tmp_path / "a" / "eval_grid_cells"
    with Image.open(first) as grid, Image.open(cell_dir / "row0_seed1.png") as cell:
        assert cell.size == (64, 64)
        assert grid.width > 3 * 128 and grid.height > 2 * 128  # tiny cells are enlarged to 128
    assert (cell_dir / "row0_seed1.png").read_bytes() != (cell_dir / "row0_seed2.png").read_bytes()


def test_cell_size_sets_the_grid_scale(tiny_base: BaseModel, embedding_files: dict[str, Path], tmp_path: Path) -> None:
    pipeline = build_pipeline(tiny_base)
    grids = {
        size: render_grid(pipeline, embedding_files["diffusers"], ["[name]"], [0, 1], tmp_path / f"{size}_grid.png",
                          name="mycat", steps=2, cell_size=size)
        for size in (64, 256)
    }  # fmt: skip
    with Image.open(grids[64]) as small, Image.open(grids[256]) as large:
        assert large.height - small.height == 256 - 64
    cells = [(tmp_path / f"{size}_grid_cells" / "row0_seed1.png").read_bytes() for size in (64, 256)]
    assert cells[0] == cells[1]


def test_grid_requests_are_checked_before_rendering(tiny_base: BaseModel, embedding_files: dict[str, Path], tmp_path: Path) -> None:
    pipeline = build_pipeline(tiny_base)
    common = dict(prompts=["[name]"], seeds=[0], name="mycat", steps=2)
    with pytest.raises(ValueError, match="file name must contain 'grid'"):
        render_grid(pipeline, embedding_files["diffusers"], out_path=tmp_path / "eval.png", **common)
    with pytest.raises(ValueError, match="cell_size must be at least 1"):
        render_grid(pipeline, embedding_files["diffusers"], out_path=tmp_path / "grid.png", **common, cell_size=0)
    with pytest.raises(ValueError, match="at least one prompt and one seed"):
        render_grid(pipeline, embedding_files["diffusers"], out_path=tmp_path / "grid.png", **{**common, "seeds": []})
    wide = save_diffusers_embedding(tmp_path / "wide.safetensors", "wide", torch.zeros(1, 768))
    with pytest.raises(ValueError, match="wide.safetensors: vectors of size 768 do not fit"):
        render_grid(pipeline, wide, out_path=tmp_path / "grid.png", **common)
    assert not (tmp_path / "grid.png").exists()
