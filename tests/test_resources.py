"""Resources resolve paths from the project root and pick devices safely."""

from __future__ import annotations

import pytest
import torch

from resources import PROJECT_ROOT, ProjectPaths, TaggerResource, TorchDevice


def test_relative_paths_are_taken_from_the_project_root(tmp_path):
    paths = ProjectPaths(datasets_dir="datasets", data_dir=str(tmp_path / "out"))
    assert paths.datasets_root() == PROJECT_ROOT / "datasets"
    assert paths.output_dir("demo", "tables") == tmp_path / "out" / "demo" / "tables"
    assert (tmp_path / "out" / "demo" / "tables").is_dir()


def test_cpu_defaults_to_full_precision_and_refuses_fp16():
    assert TorchDevice(device="cpu").dtype() == torch.float32
    with pytest.raises(ValueError, match="fp16 on the CPU"):
        TorchDevice(device="cpu", precision="fp16").dtype()
    with pytest.raises(ValueError, match="precision"):
        TorchDevice(device="cpu", precision="fp8").dtype()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_asking_for_cuda_without_one_is_a_clear_error():
    with pytest.raises(RuntimeError, match="no CUDA device"):
        TorchDevice(device="cuda").torch_device()
    assert TorchDevice(device="auto").torch_device().type == "cpu"


def test_unknown_tagger_backend_is_named():
    with pytest.raises(ValueError, match="unknown tagger backend 'clip'"):
        TaggerResource().model_dir("clip")
