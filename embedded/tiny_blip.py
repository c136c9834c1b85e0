"""A tiny random BLIP captioner (`BlipForConditionalGeneration` + `BlipProcessor`), saved in the folder layout
of a real one, so the BLIP loading and generation path runs offline, in a second, on any CPU.

The architecture is BLIP's (ViT vision encoder, BERT text decoder with cross-attention to the image), only
with 32-wide layers and a 32 px input. The tokenizer is a real WordPiece (BERT) tokenizer over a small
vocabulary we write ourselves: the tiny models' shared words, single letters and `##` letter pieces (so any
lower-case word can be spelled), BERT's special tokens and BLIP's `[DEC]` start-of-caption token. Its
captions are random word salad; what matters is that they are exactly what the model generates.
"""

from __future__ import annotations

import string
from pathlib import Path

from embedded.corpus import WORDS
from embedded.staging import staged_folder

SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
DECODER_START = "[DEC]"  # BLIP's bos token: the text decoder starts every caption with it
IMAGE_SIDE = 32


def wordpiece_vocabulary(words: list[str] = WORDS) -> dict[str, int]:
    """Special tokens, whole words, letters, `##` letter continuations, digits and punctuation, then `[DEC]`."""
    tokens = list(SPECIAL)
    for token in [*words, *string.ascii_lowercase, *(f"##{c}" for c in string.ascii_lowercase), *string.digits,
                  *string.punctuation, DECODER_START]:
        if token not in tokens:
            tokens.append(token)
    return {token: index for index, token in enumerate(tokens)}


def build_tiny_blip(out_dir: Path, *, seed: int = 0) -> Path:
    """Build the model and processor into `out_dir` (atomically: a half-built folder is never left there)."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    out_dir = Path(out_dir)
    if out_dir.exists():  # checked before the model is built, not only when it would be renamed into place
        raise FileExistsError(f"{out_dir} already exists; remove it to rebuild the tiny BLIP model")
    vocab = wordpiece_vocabulary()
    tokenizer = BertTokenizer(vocab=vocab, bos_token=DECODER_START, model_max_length=64)
    processor = BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": IMAGE_SIDE, "width": IMAGE_SIDE}),
                              tokenizer=tokenizer)
    config = BlipConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": IMAGE_SIDE, "patch_size": 8, "initializer_range": 0.5},
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 64, "initializer_range": 0.5,
                     "bos_token_id": vocab[DECODER_START], "pad_token_id": vocab["[PAD]"],
                     "sep_token_id": vocab["[SEP]"], "eos_token_id": vocab["[SEP]"]},
        projection_dim=32,
        image_text_hidden_size=32,
    )
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config).eval()
    with staged_folder(out_dir, "tiny BLIP model") as staging:
        model.save_pretrained(staging, safe_serialization=True)
        processor.save_pretrained(staging)
    return out_dir
