"""A tiny Stable-Diffusion-1.x-architecture model, built from a seed, saved in the diffusers folder layout.

Why: the pipeline must run end to end on a laptop CPU with nothing downloaded, through exactly the code
path that loads a real SD 1.5 folder. So this model has SD 1.x's shape (CLIP text encoder, cross-attention
UNet with four resolution levels, KL autoencoder with an 8x spatial factor, the SD 1.5 noise schedule),
only with very few channels, and a CLIP BPE tokenizer whose vocab/merges files we write ourselves.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from embedded.corpus import WORDS as _CORPUS
from embedded.staging import staged_folder
from training.clip_tokenizer_files import BOS, EOS, base_tokens, write_tokenizer_files


def build_clip_bpe(words: list[str]) -> tuple[dict[str, int], list[str]]:
    """A real CLIP-format BPE vocabulary: 256 byte tokens, their word-final forms, one merge chain per word.

    Each word is merged left to right ("p h", "ph o", ...), with the last merge producing the word-final
    "</w>" token, which is how CLIP's tokenizer marks the end of a word.
    """
    vocab_tokens = base_tokens()
    merges: list[str] = []
    known = set(vocab_tokens)
    for word in dict.fromkeys(words):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            merge = f"{current} {piece}"
            current = current + piece
            if merge not in merges:
                merges.append(merge)
            if current not in known:
                known.add(current)
                vocab_tokens.append(current)
    vocab_tokens += [BOS, EOS]
    return {token: index for index, token in enumerate(vocab_tokens)}, merges


def build_whole_word_bpe(words: list[str]) -> tuple[dict[str, int], list[str]]:
    """A CLIP-format BPE vocabulary in which every one of `words` is a single token.

    `build_clip_bpe`'s chains interfere: BPE applies the lowest-ranked merge first, so "red"'s "r e" splits
    "green" into `g re e n`, which no later merge joins. Here each word is first segmented by the merges
    that exist (as the tokenizer will do), then its pieces are joined left to right by new, higher-ranked
    merges; an earlier word is already one token, so the new merges cannot touch it.
    """
    vocab_tokens = base_tokens()
    known = set(vocab_tokens)
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(words):
        pieces = _segment(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(pieces) > 1:
            ranks.setdefault((pieces[0], pieces[1]), len(ranks))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            if pieces[0] not in known:
                known.add(pieces[0])
                vocab_tokens.append(pieces[0])
    vocab_tokens += [BOS, EOS]
    merges = [f"{a} {b}" for (a, b), _ in sorted(ranks.items(), key=lambda item: item[1])]
    return {token: index for index, token in enumerate(vocab_tokens)}, merges


def _segment(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """What BPE makes of `pieces` with these merge ranks: the lowest-ranked adjacent pair joins first."""
    while len(pieces) > 1:
        rank, at = min((ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(pieces, pieces[1:])))
        if rank == len(ranks):
            return pieces
        pieces = pieces[:at] + [pieces[at] + pieces[at + 1]] + pieces[at + 2:]
    return pieces


def write_tokenizer(folder: Path, words: list[str] = _CORPUS, *, whole_words: bool = False) -> None:
    """`whole_words`: every word one token (`build_whole_word_bpe`); off keeps tiny-sd's vocabulary as built."""
    write_tokenizer_files(folder, *(build_whole_word_bpe(words) if whole_words else build_clip_bpe(words)))


def _text_encoder(vocab_size: int, bos: int, eos: int) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=32,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    return CLIPTextModel(config)


def _unet(cross_attention_dim: int) -> UNet2DConditionModel:
    # SD 1.x block layout (three cross-attention levels and a plain one), tiny widths.
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        norm_num_groups=8,
    )


def _vae() -> AutoencoderKL:
    # Four levels as in SD, so the latent is 1/8 of the image side and has 4 channels.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.18215,
    )


def _sd15_scheduler() -> PNDMScheduler:
    """SD 1.5's own scheduler config: the training noise schedule of every SD 1.x checkpoint."""
    return PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def build_tiny_sd(out_dir: Path, *, seed: int = 0) -> Path:
    """Build the model into `out_dir` (atomically: a half-built folder is never left at that path)."""
    out_dir = Path(out_dir)
    with staged_folder(out_dir, "tiny model") as staging:
        write_tokenizer(staging / "tokenizer")
        tokenizer = CLIPTokenizer.from_pretrained(staging / "tokenizer", local_files_only=True)
        torch.manual_seed(seed)
        text_encoder = _text_encoder(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
        torch.manual_seed(seed + 1)
        unet = _unet(text_encoder.config.hidden_size)
        torch.manual_seed(seed + 2)
        vae = _vae()
        pipeline = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=_sd15_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipeline.save_pretrained(staging, safe_serialization=True)
        # Our hand-written tokenizer files are the source of truth; keep them rather than re-serialised ones.
        shutil.rmtree(staging / "tokenizer")
        write_tokenizer(staging / "tokenizer")
    return out_dir
