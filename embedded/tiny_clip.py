"""A tiny random CLIP (`CLIPModel`: vision and text towers), saved in the folder layout of
`openai/clip-vit-large-patch14`, so the CLIP scoring and aesthetic-embedding paths run offline on any CPU.

Why its text tower is tiny-sd's text encoder, weight for weight: SD 1.x's text encoder *is* the text tower of
CLIP ViT-L/14, which is what the aesthetic-gradients extension relies on when it fine-tunes a copy of that
tower and blends its hidden states into SD's conditioning. So the text config here is tiny-sd's (width 32,
3 layers, 77 positions, the same BPE tokenizer files) and the weights are rebuilt from tiny-sd's seed: the
hidden states of both are identical until the aesthetic optimisation moves the copy. The vision tower is a
32 px ViT with 8 px patches; both towers project to a 32-wide joint space.
"""

from __future__ import annotations

from pathlib import Path

from embedded.staging import staged_folder

IMAGE_SIDE = 32
PATCH = 8
PROJECTION_DIM = 32
# CLIP's own pixel statistics (the values in openai's preprocessor_config.json).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_tiny_clip(out_dir: Path, *, seed: int = 0) -> Path:
    """Build the model, tokenizer and image processor into `out_dir` (atomically: never half a folder there).

    `seed` is tiny-sd's seed: with the same seed the text tower equals tiny-sd's text encoder.
    """
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from embedded.tiny_sd import _text_encoder, write_tokenizer

    out_dir = Path(out_dir)
    with staged_folder(out_dir, "tiny CLIP model") as staging:
        write_tokenizer(staging)
        tokenizer = CLIPTokenizer.from_pretrained(staging, local_files_only=True)
        torch.manual_seed(seed)  # the seed tiny-sd builds its text encoder with
        sd_text_encoder = _text_encoder(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
        config = CLIPConfig(
            text_config=sd_text_encoder.config.to_dict(),
            vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                           "num_attention_heads": 4, "image_size": IMAGE_SIDE, "patch_size": PATCH,
                           "hidden_act": "quick_gelu"},
            projection_dim=PROJECTION_DIM,
        )
        torch.manual_seed(seed + 10)
        model = CLIPModel(config).eval()
        model.text_model.load_state_dict(sd_text_encoder.state_dict())
        model.save_pretrained(staging, safe_serialization=True)
        processor = CLIPImageProcessorPil(
            size={"shortest_edge": IMAGE_SIDE}, crop_size={"height": IMAGE_SIDE, "width": IMAGE_SIDE},
            image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
        )
        processor.save_pretrained(staging)
        # Our hand-written tokenizer files stay the source of truth (written before, never re-serialised).
    return out_dir
