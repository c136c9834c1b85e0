from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from training.base_model import BaseModel
from training.embedding_formats import save_diffusers_embedding, save_webui_pt
from training.evaluation import SAMPLERS, RenderSettings, build_pipeline, prompt_embeddings, render_xyz_grid
from training.xyz_grid import Checkpoint, GridPlan
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


def _plan(files: dict[str, Path], **values) -> GridPlan:
    checkpoints = {
        ("textual_inversion", 20): Checkpoint("textual_inversion", 20, files["diffusers"], "mycat"),
        ("textual_inversion", 40): Checkpoint("textual_inversion", 40, files["webui_pt"], "mycat", final=True),
    }
    defaults = {"checkpoint": (20, 40), "prompt": ("a photo of a [name]", "[name] painting"), "seed": (1, 2),
                "cfg_scale": (5.0,), "steps": (3,), "strength": (1.0,), "method": ("textual_inversion",)}
    axes = values.pop("axes", ("checkpoint", "prompt", "seed"))
    return GridPlan(*axes, values={**defaults, **values}, checkpoints=checkpoints)


def test_grid_is_deterministic_cached_labelled_and_leaves_the_model_as_it_was(
    tiny_base: BaseModel, embedding_files: dict[str, Path], tmp_path: Path
) -> None:
    pipeline = build_pipeline(tiny_base, "euler_a")
    vocabulary = len(tiny_base.tokenizer)
    table = tiny_base.text_encoder.get_input_embeddings().weight.detach().clone()
    render = RenderSettings("euler_a", clip_skip=2, base_fingerprint=tiny_base.fingerprint)
    cache = tmp_path / "cache"
    first = render_xyz_grid(pipeline, _plan(embedding_files), render, tmp_path / "a" / "eval_grid.png", cache, title="t")
    second = render_xyz_grid(pipeline, _plan(embedding_files), render, tmp_path / "b" / "eval_grid.png", tmp_path / "c2", title="t")

    assert first.path.read_bytes() == second.path.read_bytes()  # rendered twice from scratch: byte-identical
    assert all(cell.rendered for cell in first.cells) and len(first.cells) == 2 * 2 * 2
    assert len(tiny_base.tokenizer) == vocabulary
    assert torch.equal(tiny_base.text_encoder.get_input_embeddings().weight, table)
    assert not any(parameter.requires_grad for parameter in tiny_base.text_encoder.parameters())
    names = sorted(path.name for path in (tmp_path / "a" / "eval_grid_cells").iterdir())
    assert len(names) == 8 and "textual_inversion_step20_p0_seed1_cfg5_steps3_s1.png" in names
    with Image.open(first.path) as grid, Image.open(first.cell_files[0]) as cell:
        assert cell.size == (64, 64)
        assert grid.width > 2 * 128 and grid.height > 2 * 2 * 128  # two z blocks of two rows, cells enlarged to 128
    by_name = {path.name: path.read_bytes() for path in first.cell_files}
    assert by_name["textual_inversion_step20_p0_seed1_cfg5_steps3_s1.png"] != by_name["textual_inversion_step20_p0_seed2_cfg5_steps3_s1.png"]

    # Only the cells whose inputs changed are rendered again: a new CFG value renders only its own cells.
    again = render_xyz_grid(pipeline, _plan(embedding_files), render, tmp_path / "a" / "eval_grid.png", cache, title="t")
    assert not any(cell.rendered for cell in again.cells)
    assert again.path.read_bytes() == first.path.read_bytes()
    wider = _plan(embedding_files, axes=("checkpoint", "cfg_scale", "seed"), prompt=("a photo of a [name]",), cfg_scale=(5.0, 9.0))
    third = render_xyz_grid(pipeline, wider, render, tmp_path / "a" / "eval_grid.png", cache, title="t")
    assert [cell.rendered for cell in third.cells].count(True) == 4  # 2 checkpoints x 2 seeds at CFG 9
    assert len(list((tmp_path / "a" / "eval_grid_cells").iterdir())) == 8  # stale cells of the old plan removed


def test_the_same_vectors_in_both_formats_render_the_same_cells(
    tiny_base: BaseModel, embedding_files: dict[str, Path], tmp_path: Path
) -> None:
    """Checkpoint 20 (diffusers file) and 40 (webui .pt) hold the same vectors: their cells are identical,
    though their cache keys differ (the files differ)."""
    pipeline = build_pipeline(tiny_base)
    result = render_xyz_grid(pipeline, _plan(embedding_files, seed=(1,), axes=("checkpoint", "prompt", None)),
                             RenderSettings("dpm"), tmp_path / "grid.png", tmp_path / "cache", title="t")  # fmt: skip
    images = {(cell.spec.checkpoint.step, cell.spec.prompt): cell.cache_path.read_bytes() for cell in result.cells}
    assert images[(20, "[name] painting")] == images[(40, "[name] painting")]
    assert len({cell.key for cell in result.cells}) == 4


def test_strength_is_the_webui_emphasis_of_the_embedding_tokens(tiny_base: BaseModel, embedding_files: dict[str, Path]) -> None:
    pipeline = build_pipeline(tiny_base)
    pipeline.load_textual_inversion(str(embedding_files["diffusers"]), token="mycat")
    try:
        ids = pipeline.tokenizer.convert_tokens_to_ids(["mycat", "mycat_1"])
        plain = prompt_embeddings(pipeline, "a photo of mycat", 1)
        same = prompt_embeddings(pipeline, "a photo of mycat", 1, ids, 1.0)
        strong = prompt_embeddings(pipeline, "a photo of mycat", 1, ids, 1.5)
        input_ids = pipeline.tokenizer(pipeline.maybe_convert_prompt("a photo of mycat", pipeline.tokenizer),
                                       padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
    finally:
        pipeline.unload_textual_inversion(["mycat", "mycat_1"])
        pipeline.text_encoder.requires_grad_(False)
    assert torch.equal(plain, same)
    torch.testing.assert_close(strong.mean(), plain.mean(), rtol=1e-4, atol=1e-6)  # rescaled to the original mean
    mask = torch.isin(input_ids, torch.tensor(ids))
    assert int(mask.sum()) == 2
    ratio = strong[0] / plain[0]
    rescale = ratio[~mask].mean()
    torch.testing.assert_close(ratio[~mask], torch.full_like(ratio[~mask], float(rescale)), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ratio[mask], torch.full_like(ratio[mask], 1.5 * float(rescale)), rtol=1e-4, atol=1e-4)


def test_grid_requests_are_checked_before_rendering(tiny_base: BaseModel, embedding_files: dict[str, Path], tmp_path: Path) -> None:
    pipeline = build_pipeline(tiny_base)
    render = RenderSettings("dpm")
    with pytest.raises(ValueError, match="file name must contain 'grid'"):
        render_xyz_grid(pipeline, _plan(embedding_files), render, tmp_path / "eval.png", tmp_path, title="t")
    with pytest.raises(ValueError, match="cell_size must be at least 1"):
        render_xyz_grid(pipeline, _plan(embedding_files), render, tmp_path / "grid.png", tmp_path, title="t", cell_size=0)
    wide = save_diffusers_embedding(tmp_path / "wide.safetensors", "wide", torch.zeros(1, 768))
    plan = _plan({"diffusers": wide, "webui_pt": wide})
    with pytest.raises(ValueError, match="wide.safetensors: vectors of size 768 do not fit"):
        render_xyz_grid(pipeline, plan, render, tmp_path / "grid.png", tmp_path, title="t")
    gone = _plan({"diffusers": tmp_path / "deleted.safetensors", "webui_pt": embedding_files["webui_pt"]})
    with pytest.raises(ValueError, match=r"deleted.safetensors: the textual_inversion checkpoint at step 20 no longer exists"):
        render_xyz_grid(pipeline, gone, render, tmp_path / "grid.png", tmp_path, title="t")
    assert not (tmp_path / "grid.png").exists()


def test_aesthetic_gradients_change_the_cells_and_their_cache_key(
    tiny_base: BaseModel, tiny_clip_dir: Path, embedding_files: dict[str, Path], tmp_path: Path
) -> None:
    from training.aesthetic import AestheticGradients, AestheticOptions, create_aesthetic_embedding, save_aesthetic_embedding
    from training.clip_scores import ClipScorer

    scorer = ClipScorer.load(tiny_clip_dir)
    images = [Image.new("RGB", (32, 32), colour) for colour in ((250, 20, 20), (240, 60, 30))]
    path = save_aesthetic_embedding(tmp_path / "aesthetic_embeddings" / "red.pt", create_aesthetic_embedding(scorer, images))
    aesthetic = AestheticGradients.load(scorer, path, AestheticOptions(aesthetic_steps=3, aesthetic_lr=0.01))
    pipeline = build_pipeline(tiny_base)
    encoder = [p.detach().clone() for p in tiny_base.text_encoder.parameters()]
    plan = _plan(embedding_files, checkpoint=(40,), prompt=("a photo of a [name]",), seed=(1,), axes=("checkpoint", "prompt", None))
    plain = render_xyz_grid(pipeline, plan, RenderSettings("dpm"), tmp_path / "plain_grid.png", tmp_path / "cache", title="t")
    applied = render_xyz_grid(pipeline, plan, RenderSettings("dpm", aesthetic=aesthetic, aesthetic_key="red"),
                              tmp_path / "aesthetic_grid.png", tmp_path / "cache", title="t")  # fmt: skip
    assert applied.cells[0].rendered and applied.cells[0].key != plain.cells[0].key
    assert applied.cells[0].cache_path.read_bytes() != plain.cells[0].cache_path.read_bytes()
    assert all(torch.equal(a, b) for a, b in zip(encoder, tiny_base.text_encoder.parameters()))
