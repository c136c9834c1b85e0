"""Single-file SD 1.x checkpoints: export to the original layout, offline loading, and refusing unsafe files.

Everything runs on the embedded tiny model, except the SD 1.5 layout checks, which build SD 1.5 on the
meta device (shapes only, no memory). All network access is blocked and recorded for the whole module.
"""

from __future__ import annotations

import gzip
import shutil
import socket
import sys
import types
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    infer_diffusers_model_type,
)
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from embedded.tiny_sd import build_tiny_sd
from training.base_model import BaseModelError
from training.configs.build_clip_tokenizer import TokenizerBuildError, build_clip_tokenizer, find_bpe_file
from training.single_file import (
    SD15_CONFIG_DIR,
    TEXT_ENCODER_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    SingleFileError,
    export_single_file,
    expected_checkpoint_shapes,
    ldm_clip_state_dict,
    ldm_state_dict,
    ldm_unet_state_dict,
    ldm_vae_state_dict,
    load_single_file_pipeline,
    resolve_config_dir,
)

COMPONENTS = ("unet", "vae", "text_encoder")


class NetworkAttempt(RuntimeError):
    """Raised by the guard: nothing in this module may open a connection or resolve a name."""


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def network_attempts() -> Iterator[list[str]]:
    """Block and record every connection and DNS look-up, so an attempt a library swallows is still seen."""
    attempts: list[str] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(repr(args))
        raise NetworkAttempt(f"network access attempted: {args!r}")

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("TRANSFORMERS_OFFLINE", "1")
        patch.setattr(socket.socket, "connect", refuse)
        patch.setattr(socket.socket, "connect_ex", refuse)
        patch.setattr(socket, "getaddrinfo", refuse)
        patch.setattr(socket, "create_connection", refuse)
        yield attempts


@pytest.fixture(autouse=True)
def no_network_in_test(network_attempts: list[str]) -> Iterator[None]:
    before = len(network_attempts)
    yield
    assert network_attempts[before:] == [], f"network access attempted: {network_attempts[before:]}"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="module")
def exported(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_single_file(tiny_dir, tmp_path_factory.mktemp("export") / "tiny.safetensors")


@pytest.fixture(scope="module")
def reference(tiny_dir: Path) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(
        tiny_dir, local_files_only=True, safety_checker=None, requires_safety_checker=False
    )


def config_only_copy(model_dir: Path, target: Path) -> Path:
    """A diffusers folder without weights: what a user puts next to a checkpoint as its config."""
    return Path(shutil.copytree(model_dir, target, ignore=shutil.ignore_patterns("*.safetensors", "*.bin")))


def assert_same_weights(loaded: StableDiffusionPipeline, reference: StableDiffusionPipeline) -> None:
    """Every UNet, VAE and text-encoder tensor equals the reference's (cast to the loaded dtype)."""
    for name in COMPONENTS:
        expected = getattr(reference, name).state_dict()
        actual = getattr(loaded, name).state_dict()
        assert actual.keys() == expected.keys(), name
        different = [key for key in expected if not torch.equal(actual[key], expected[key].to(actual[key].dtype))]
        assert different == [], f"{name}: {different[:5]}"


def generate(pipeline: StableDiffusionPipeline) -> np.ndarray:
    pipeline.set_progress_bar_config(disable=True)
    result = pipeline(
        "a photo of a cat",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    return result.images


# ------------------------------------------------------------------------------------- network guard


def test_network_guard_blocks_and_records_connections(network_attempts: list[str]) -> None:
    before = len(network_attempts)
    with pytest.raises(NetworkAttempt):
        socket.create_connection(("127.0.0.1", 9))
    with pytest.raises(NetworkAttempt):
        urllib.request.urlopen("http://127.0.0.1:9/", timeout=1)
    assert len(network_attempts) == before + 2
    del network_attempts[before:]  # expected here; any other test that connects fails


# --------------------------------------------------------------------------------- export and load


def test_export_writes_original_layout_names(exported: Path) -> None:
    state = load_file(exported)
    prefixes = (UNET_PREFIX, VAE_PREFIX, TEXT_ENCODER_PREFIX)
    assert all(key.startswith(prefixes) for key in state)
    assert state[TEXT_ENCODER_PREFIX + "embeddings.position_ids"].tolist() == [list(range(77))]
    # Original VAE attention projections are 1x1 convolutions.
    assert state[VAE_PREFIX + "encoder.mid.attn_1.q.weight"].shape[-2:] == (1, 1)


def test_export_then_load_gives_back_every_weight(
    exported: Path, tiny_dir: Path, reference: StableDiffusionPipeline
) -> None:
    loaded = load_single_file_pipeline(exported, dtype=torch.float32, config_dir=tiny_dir)
    assert isinstance(loaded, StableDiffusionPipeline)
    assert loaded.safety_checker is None
    assert_same_weights(loaded, reference)
    assert np.array_equal(generate(loaded), generate(reference))


def test_export_is_deterministic(tiny_dir: Path, exported: Path, tmp_path: Path) -> None:
    again = export_single_file(tiny_dir, tmp_path / "again.safetensors")
    assert again.read_bytes() == exported.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["again.safetensors"]  # no temp file left behind


def test_export_in_half_precision(tiny_dir: Path, tmp_path: Path, reference: StableDiffusionPipeline) -> None:
    state = load_file(export_single_file(tiny_dir, tmp_path / "half.safetensors", dtype=torch.float16))
    floating = {key: value for key, value in state.items() if value.is_floating_point()}
    assert {value.dtype for value in floating.values()} == {torch.float16}
    original = reference.unet.state_dict()["conv_in.weight"]
    assert torch.equal(state[UNET_PREFIX + "input_blocks.0.0.weight"], original.half())


def test_export_refuses_bad_arguments(tiny_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(SingleFileError, match="safetensors only"):
        export_single_file(tiny_dir, tmp_path / "model.ckpt")
    with pytest.raises(SingleFileError, match="no model_index.json"):
        export_single_file(tmp_path, tmp_path / "model.safetensors")


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_ckpt_with_state_dict_wrapper_loads(
    exported: Path, tiny_dir: Path, reference: StableDiffusionPipeline, tmp_path: Path, zip_format: bool
) -> None:
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(exported), "global_step": 7}, ckpt, _use_new_zipfile_serialization=zip_format)
    loaded = load_single_file_pipeline(ckpt, dtype=torch.float16, config_dir=tiny_dir)
    assert loaded.unet.dtype == loaded.vae.dtype == loaded.text_encoder.dtype == torch.float16
    assert_same_weights(loaded, reference)


def test_ckpt_with_training_metadata_loads(
    exported: Path, tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real SD .ckpt files carry PyTorch Lightning's callback class and numpy scores next to the weights."""
    names = ("pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint")
    for name in names:  # just enough of a fake module for pickle to reference the class by name
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    model_checkpoint = type("ModelCheckpoint", (), {"__module__": names[-1]})
    sys.modules[names[-1]].ModelCheckpoint = model_checkpoint
    metadata = {model_checkpoint: {"best_model_score": np.float64(0.5), "history": np.zeros(3)}}
    ckpt = tmp_path / "trained.ckpt"
    torch.save({"state_dict": load_file(exported), "callbacks": metadata, "epoch": 3}, ckpt)
    for name in names:
        monkeypatch.delitem(sys.modules, name)

    loaded = load_single_file_pipeline(ckpt, dtype=torch.float32, config_dir=tiny_dir)
    expected = load_file(exported)[VAE_PREFIX + "decoder.conv_out.weight"]
    assert torch.equal(loaded.vae.state_dict()["decoder.conv_out.weight"], expected)


class _WritesMarker:
    """A pickle payload: unpickling it calls `open(marker, "w")`, i.e. runs code chosen by the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (str(self.marker), "w")


def test_malicious_ckpt_is_refused_without_running_it(exported: Path, tiny_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    ckpt = tmp_path / "evil.ckpt"
    state = load_file(exported)
    state["payload"] = _WritesMarker(marker)
    torch.save({"state_dict": state}, ckpt)

    with pytest.raises(SingleFileError, match="refused") as error:
        load_single_file_pipeline(ckpt, dtype=torch.float32, config_dir=tiny_dir)
    assert str(ckpt) in str(error.value)
    assert "weights_only=True" in str(error.value)
    assert not marker.exists()


def test_damaged_files_get_clear_errors(exported: Path, tiny_dir: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(exported.read_bytes()[:100])
    with pytest.raises(SingleFileError, match="not a readable safetensors file"):
        load_single_file_pipeline(truncated, dtype=torch.float32, config_dir=tiny_dir)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(SingleFileError, match="garbage.ckpt"):
        load_single_file_pipeline(garbage, dtype=torch.float32, config_dir=tiny_dir)
    with pytest.raises(SingleFileError, match="not found"):
        load_single_file_pipeline(tmp_path / "absent.safetensors", dtype=torch.float32)


def test_single_file_error_is_a_base_model_error() -> None:
    assert issubclass(SingleFileError, BaseModelError)


# ------------------------------------------------------------------------------------ config folders


def test_config_dir_is_found_beside_the_checkpoint(exported: Path, tiny_dir: Path, tmp_path: Path) -> None:
    checkpoint = Path(shutil.copy(exported, tmp_path / "model.safetensors"))
    assert resolve_config_dir(checkpoint) == SD15_CONFIG_DIR

    sidecar = config_only_copy(tiny_dir, tmp_path / "model.safetensors.config")
    assert resolve_config_dir(checkpoint) == sidecar

    same_name = config_only_copy(tiny_dir, tmp_path / "model")
    assert resolve_config_dir(checkpoint) == same_name
    loaded = load_single_file_pipeline(checkpoint, dtype=torch.float32)
    assert tuple(loaded.unet.config.block_out_channels) == (32, 32, 64, 64)


def test_missing_tokenizer_is_reported(exported: Path, tiny_dir: Path, tmp_path: Path) -> None:
    config = config_only_copy(tiny_dir, tmp_path / "config")
    shutil.rmtree(config / "tokenizer")
    with pytest.raises(SingleFileError, match="no CLIP tokenizer") as error:
        load_single_file_pipeline(exported, dtype=torch.float32, config_dir=config)
    assert str(exported) in str(error.value)


def test_checkpoint_that_does_not_fit_the_config_is_reported(exported: Path, tiny_dir: Path, tmp_path: Path) -> None:
    sd15_with_tiny_tokenizer = Path(shutil.copytree(SD15_CONFIG_DIR, tmp_path / "sd15", dirs_exist_ok=True))
    shutil.rmtree(sd15_with_tiny_tokenizer / "tokenizer", ignore_errors=True)
    shutil.copytree(tiny_dir / "tokenizer", sd15_with_tiny_tokenizer / "tokenizer")
    with pytest.raises(SingleFileError, match="not in the file"):
        load_single_file_pipeline(exported, dtype=torch.float32, config_dir=sd15_with_tiny_tokenizer)

    state = load_file(exported)
    missing_key = UNET_PREFIX + "input_blocks.1.0.in_layers.0.weight"
    del state[missing_key]
    incomplete = tmp_path / "incomplete.safetensors"
    save_file(state, incomplete)
    with pytest.raises(SingleFileError, match=f"1 weight.*{missing_key}"):
        load_single_file_pipeline(incomplete, dtype=torch.float32, config_dir=tiny_dir)

    state = load_file(exported)
    state[UNET_PREFIX + "out.2.bias"] = torch.zeros(5)
    reshaped = tmp_path / "reshaped.safetensors"
    save_file(state, reshaped)
    with pytest.raises(SingleFileError, match=r"differ in shape.*out\.2\.bias"):
        load_single_file_pipeline(reshaped, dtype=torch.float32, config_dir=tiny_dir)


def test_other_model_families_are_refused(tiny_dir: Path, tmp_path: Path) -> None:
    sdxl_like = tmp_path / "sdxl.safetensors"
    sdxl_keys = (UNET_PREFIX + "input_blocks.0.0.weight", "conditioner.embedders.1.model.positional_embedding")
    save_file({key: torch.zeros(1) for key in sdxl_keys}, sdxl_like)
    with pytest.raises(SingleFileError, match="SD 2.x or SDXL"):
        load_single_file_pipeline(sdxl_like, dtype=torch.float32, config_dir=tiny_dir)
    lora_like = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0.alpha": torch.zeros(1)}, lora_like)
    with pytest.raises(SingleFileError, match="no UNet"):
        load_single_file_pipeline(lora_like, dtype=torch.float32, config_dir=tiny_dir)


# ---------------------------------------------------------------------------------- the SD 1.5 layout


def sd15_on_meta() -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD15_CONFIG_DIR / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SD15_CONFIG_DIR / "vae"))
        config = CLIPTextConfig.from_pretrained(SD15_CONFIG_DIR / "text_encoder", local_files_only=True)
        text_encoder = CLIPTextModel(config)
    return unet, vae, text_encoder


def test_shipped_sd15_configs_describe_sd15() -> None:
    unet, vae, text_encoder = sd15_on_meta()
    # SD 1.5's published parameter counts pin down every architecture number in the configs.
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert sum(p.numel() for p in text_encoder.parameters()) == 123_060_480
    assert unet.config.sample_size == 64 and vae.config.sample_size == 512
    assert vae.config.scaling_factor == 0.18215
    assert text_encoder.config.hidden_act == "quick_gelu"
    scheduler = PNDMScheduler.from_pretrained(SD15_CONFIG_DIR, subfolder="scheduler", local_files_only=True)
    assert (scheduler.config.beta_start, scheduler.config.beta_end) == (0.00085, 0.012)
    assert scheduler.config.beta_schedule == "scaled_linear"
    config = scheduler.config
    assert (config.steps_offset, config.skip_prk_steps, config.set_alpha_to_one) == (1, True, False)
    index = StableDiffusionPipeline.load_config(SD15_CONFIG_DIR)
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["safety_checker"] == [None, None]


def test_sd15_layout_has_the_original_names_and_shapes() -> None:
    shapes = {key: tuple(value.shape) for key, value in ldm_state_dict(*sd15_on_meta()).items()}
    assert len(shapes) == 1131  # the key count of SD 1.5's own single-file checkpoints
    assert infer_diffusers_model_type(ldm_state_dict(*sd15_on_meta())) == "v1"
    landmarks = {
        UNET_PREFIX + "output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
        UNET_PREFIX + "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        UNET_PREFIX + "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        UNET_PREFIX + "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        UNET_PREFIX + "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        UNET_PREFIX + "middle_block.1.proj_out.weight": (1280, 1280, 1, 1),
        VAE_PREFIX + "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        VAE_PREFIX + "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        VAE_PREFIX + "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        TEXT_ENCODER_PREFIX + "encoder.layers.11.mlp.fc2.weight": (768, 3072),
    }
    assert {key: shapes.get(key) for key in landmarks} == landmarks
    assert len(expected_checkpoint_shapes(SD15_CONFIG_DIR)) == 1130  # all but the position_ids buffer


def test_sd15_layout_round_trips_through_diffusers_converters() -> None:
    """Each weight gets a distinct one-element tensor, so a swapped pair of same-shaped weights shows."""
    unet, vae, text_encoder = sd15_on_meta()

    def ids(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {key: torch.tensor([float(i)]) for i, key in enumerate(module.state_dict())}

    unet_ids, vae_ids, clip_ids = ids(unet), ids(vae), ids(text_encoder)
    unet_ldm = {UNET_PREFIX + k: v for k, v in ldm_unet_state_dict(unet_ids, layers_per_block=2).items()}
    vae_ldm = {VAE_PREFIX + k: v for k, v in ldm_vae_state_dict(vae_ids, levels=4).items()}
    clip_ldm = {TEXT_ENCODER_PREFIX + k: v for k, v in ldm_clip_state_dict(clip_ids, max_positions=77).items()}

    unet_back = convert_ldm_unet_checkpoint(unet_ldm, unet.config)
    vae_back = convert_ldm_vae_checkpoint(vae_ldm, vae.config)
    clip_back = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(clip_ldm).items()}
    del clip_back["embeddings.position_ids"]
    for original, back in ((unet_ids, unet_back), (vae_ids, vae_back), (clip_ids, clip_back)):
        assert back.keys() == original.keys()
        assert [key for key in original if not torch.equal(back[key], original[key])] == []


def test_unsupported_unet_layout_is_refused() -> None:
    with pytest.raises(ValueError, match="layers_per_block"):
        ldm_unet_state_dict({}, layers_per_block=(1, 2, 2, 2))
    with pytest.raises(ValueError, match="add_embedding"):
        ldm_unet_state_dict({"add_embedding.linear_1.weight": torch.zeros(1)}, layers_per_block=2)


# --------------------------------------------------------------------------------------- tokenizer


def test_build_clip_tokenizer_tokenises_like_clip(tmp_path: Path) -> None:
    try:
        find_bpe_file()
    except TokenizerBuildError as error:
        pytest.skip(str(error))
    folder = build_clip_tokenizer(tmp_path / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer("sks").input_ids == [49406, 48136, 49407]  # the DreamBooth identifier, one token
    assert tokenizer.model_max_length == 77 and tokenizer.pad_token_id == 49407


def test_build_clip_tokenizer_rejects_a_wrong_bpe_file(tmp_path: Path) -> None:
    bpe = tmp_path / "bpe.txt.gz"
    bpe.write_bytes(gzip.compress(b"#version: 0.2\na b\n"))
    with pytest.raises(TokenizerBuildError, match="bpe.txt.gz"):
        build_clip_tokenizer(tmp_path / "tokenizer", bpe_path=bpe)
    assert not (tmp_path / "tokenizer").exists()
