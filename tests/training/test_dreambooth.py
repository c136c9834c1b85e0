"""DreamBooth on the tiny model: the outputs load in diffusers and in our own single-file loader, the
evaluation swaps the fine-tuned weights in and back out, and the shared base model never changes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from training.base_model import BaseModel
from training.dreambooth import save_diffusers_folder, trainable_copy
from training.evaluation import build_pipeline, dreambooth_applied, prompt_embeddings
from training.single_file import load_single_file_pipeline, save_single_file
from training.weight_swap import swapped_weights
from training.xyz_grid import Checkpoint


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@pytest.fixture(scope="module")
def perturbed(tiny_base: BaseModel, tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path, Path]:
    """A stand-in for a fine-tuned UNet (the base one plus noise), written as our two DreamBooth outputs."""
    unet = trainable_copy(tiny_base.unet)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    out = tmp_path_factory.mktemp("dreambooth")
    folder = save_diffusers_folder(tiny_base, unet, tiny_base.text_encoder, out / "subject")
    single = save_single_file(unet, tiny_base.vae, tiny_base.text_encoder, out / "subject.safetensors")
    return unet, folder, single


def test_the_outputs_load_in_diffusers_and_our_loader(tiny_base: BaseModel, perturbed) -> None:
    unet, folder, single = perturbed
    from_folder = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert _same(_weights(from_folder.unet), _weights(unet))
    assert not _same(_weights(from_folder.unet), _weights(tiny_base.unet))
    # The diffusers folder beside the file (same stem) is the single file's config sidecar.
    from_file = load_single_file_pipeline(single, dtype=torch.float32)
    loaded, trained = _weights(from_file.unet), _weights(unet)
    assert loaded.keys() == trained.keys()
    assert all(torch.allclose(loaded[key], trained[key]) for key in loaded)


def test_the_evaluation_swaps_the_weights_in_and_back(tiny_base: BaseModel, perturbed) -> None:
    unet, _, single = perturbed
    before = _weights(tiny_base.unet), _weights(tiny_base.text_encoder)
    pipeline = build_pipeline(tiny_base)
    checkpoint = Checkpoint("dreambooth", 10, single, "subject")
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    conditioning = prompt_embeddings(pipeline, "a photo of subject", 1)
    with torch.no_grad():
        base_out = tiny_base.unet(latents, 10, encoder_hidden_states=conditioning).sample
        trained_out = unet(latents, 10, encoder_hidden_states=conditioning).sample
        with dreambooth_applied(pipeline, checkpoint, 1.0, 1) as encode:
            swapped_out = pipeline.unet(latents, 10, encoder_hidden_states=encode("a photo of subject")).sample
        with swapped_weights(pipeline.unet, pipeline.text_encoder, single, 0.5):
            half = _weights(pipeline.unet)
    assert torch.allclose(swapped_out, trained_out, atol=1e-5)
    assert not torch.allclose(swapped_out, base_out)
    key = "conv_in.weight"
    expected_half = (before[0][key] + unet.state_dict()[key]) / 2
    assert torch.allclose(half[key], expected_half, atol=1e-6)  # strength: a linear blend of the weights
    assert _same(_weights(tiny_base.unet), before[0]) and _same(_weights(tiny_base.text_encoder), before[1])


def test_a_file_that_is_not_a_checkpoint_is_refused_and_nothing_changes(tiny_base: BaseModel, tmp_path: Path) -> None:
    before = _weights(tiny_base.unet)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="bad.safetensors"):
        with swapped_weights(tiny_base.unet, tiny_base.text_encoder, bad):
            pass
    assert _same(_weights(tiny_base.unet), before)
