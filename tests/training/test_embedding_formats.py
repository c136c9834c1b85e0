from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch

from training.embedding_formats import (
    EmbeddingFileError,
    load_embedding,
    read_embedding,
    save_diffusers_embedding,
    save_webui_pt,
)


class NotATensor:
    """Any pickled object besides tensors and plain values must be refused, never constructed."""


@pytest.fixture
def vectors() -> torch.Tensor:
    return torch.randn(3, 32, generator=torch.Generator().manual_seed(0))


def test_webui_pt_has_the_webui_layout_and_loads_with_weights_only(tmp_path: Path, vectors: torch.Tensor) -> None:
    path = save_webui_pt(tmp_path / "mycat.pt", "mycat", vectors, 120, "0123456789", "tiny-sd")
    data = torch.load(path, map_location="cpu", weights_only=True)
    assert set(data) == {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"}
    assert data["string_to_token"] == {"*": 265}
    assert torch.equal(data["string_to_param"]["*"], vectors)
    assert (data["name"], data["step"], data["sd_checkpoint"], data["sd_checkpoint_name"]) == ("mycat", 120, "0123456789", "tiny-sd")
    embedding = read_embedding(path)
    assert (embedding.name, embedding.step, embedding.sd_checkpoint) == ("mycat", 120, "0123456789")
    assert torch.equal(embedding.vectors, vectors)


def test_a_slice_is_saved_alone_not_with_its_parent_storage(tmp_path: Path) -> None:
    parent = torch.randn(1000, 32)
    path = save_webui_pt(tmp_path / "slice.pt", "slice", parent[:2], 1, None, None)
    assert path.stat().st_size < 10_000
    assert torch.equal(load_embedding(path)[1], parent[:2])


def test_diffusers_file_is_one_named_tensor_with_the_step_in_metadata(tmp_path: Path, vectors: torch.Tensor) -> None:
    path = save_diffusers_embedding(tmp_path / "learned_embeds.safetensors", "mycat", vectors, step=7)
    tensors = safetensors.torch.load_file(path)
    assert list(tensors) == ["mycat"] and torch.equal(tensors["mycat"], vectors)
    embedding = read_embedding(path)
    assert (embedding.name, embedding.step) == ("mycat", 7)


def test_saving_is_byte_for_byte_deterministic(tmp_path: Path, vectors: torch.Tensor) -> None:
    for name in ("one", "two"):
        save_webui_pt(tmp_path / f"{name}.pt", "a", vectors, 3, "h", "m")
        save_diffusers_embedding(tmp_path / f"{name}.safetensors", "a", vectors, step=3)
    for suffix in (".pt", ".safetensors"):
        assert (tmp_path / f"one{suffix}").read_bytes() == (tmp_path / f"two{suffix}").read_bytes()


def test_kohya_and_diffusers_bin_files_are_read(tmp_path: Path, vectors: torch.Tensor) -> None:
    kohya = tmp_path / "kohya-style.safetensors"
    safetensors.torch.save_file({"emb_params": vectors}, kohya)
    assert load_embedding(kohya)[0] == "kohya-style"
    assert torch.equal(load_embedding(kohya)[1], vectors)
    single = tmp_path / "learned_embeds.bin"
    torch.save({"<cat-toy>": vectors[0].to(torch.float16)}, single)
    name, loaded = load_embedding(single)
    assert name == "<cat-toy>" and loaded.shape == (1, 32) and loaded.dtype == torch.float32


def test_nan_vectors_are_never_written(tmp_path: Path, vectors: torch.Tensor) -> None:
    vectors[1, 3] = float("nan")
    with pytest.raises(ValueError, match="refusing to save vectors containing NaN"):
        save_webui_pt(tmp_path / "bad.pt", "bad", vectors, 1, None, None)
    with pytest.raises(ValueError, match="refusing to save"):
        save_diffusers_embedding(tmp_path / "bad.safetensors", "bad", vectors)
    assert list(tmp_path.iterdir()) == []


def test_unreadable_files_are_clear_errors_naming_the_file(tmp_path: Path, vectors: torch.Tensor) -> None:
    cases = {}
    cases["garbage.safetensors"] = "not a readable safetensors file"
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 64)
    cases["garbage.pt"] = "corrupt, or holds Python objects"
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file at all")
    cases["pickled.pt"] = "corrupt, or holds Python objects"
    torch.save({"string_to_param": {"*": vectors}, "extra": NotATensor()}, tmp_path / "pickled.pt")
    cases["two.safetensors"] = "expected one tensor"
    safetensors.torch.save_file({"a": vectors, "b": vectors.clone()}, tmp_path / "two.safetensors")
    cases["sdxl.safetensors"] = "an SDXL embedding"
    safetensors.torch.save_file({"clip_l": vectors, "clip_g": vectors.clone()}, tmp_path / "sdxl.safetensors")
    cases["ints.safetensors"] = "not a floating-point tensor"
    safetensors.torch.save_file({"a": torch.ones(2, 32, dtype=torch.int64)}, tmp_path / "ints.safetensors")
    cases["cube.pt"] = r"expected vectors of shape \(n_vectors, hidden\)"
    torch.save({"a": torch.ones(2, 2, 2)}, tmp_path / "cube.pt")
    cases["nan.pt"] = "contain NaN or inf"
    torch.save({"a": torch.full((1, 32), float("inf"))}, tmp_path / "nan.pt")
    cases["embedding.gif"] = "unsupported embedding file type"
    (tmp_path / "embedding.gif").write_bytes(b"gif")
    cases["missing.pt"] = "embedding file not found"
    for file_name, reason in cases.items():
        with pytest.raises(EmbeddingFileError, match=f"{file_name}: .*{reason}|{file_name}: {reason}"):
            read_embedding(tmp_path / file_name)


def test_optim_companion_carries_the_webui_checksum(tmp_path: Path, vectors: torch.Tensor) -> None:
    from training.embedding_formats import save_webui_optim, webui_checksum

    parameter = torch.nn.Parameter(vectors.clone())
    optimizer = torch.optim.AdamW([parameter], lr=0.01)
    parameter.grad = torch.ones_like(parameter)
    optimizer.step()
    pt = save_webui_pt(tmp_path / "mycat.pt", "mycat", parameter, 1, None, None)
    optim = save_webui_optim(pt, parameter, optimizer.state_dict())
    assert optim.name == "mycat.pt.optim"
    data = torch.load(optim, weights_only=True)
    assert data["hash"] == webui_checksum(parameter) and data["optimizer_name"] == "AdamW"
    resumed = torch.optim.AdamW([torch.nn.Parameter(vectors.clone())], lr=0.01)
    resumed.load_state_dict(data["optimizer_state_dict"])
    assert torch.equal(resumed.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    # the webui's const_hash: r = (r * 281 ^ int(v) * 997) & 0xFFFFFFFF over vec * 100, low 16 bits as 4 hex digits
    assert webui_checksum(torch.tensor([[0.015, -0.021]])) == f"{((1 * 997) * 281 ^ (-2 * 997)) & 0xFFFF:04x}"


def test_kohya_file_round_trips(tmp_path: Path, vectors: torch.Tensor) -> None:
    from training.embedding_formats import save_kohya_embedding

    path = save_kohya_embedding(tmp_path / "mycat.safetensors", "mycat", vectors)
    assert list(safetensors.torch.load_file(path)) == ["emb_params"]
    name, loaded = load_embedding(path)
    assert name == "mycat" and torch.equal(loaded, vectors)
