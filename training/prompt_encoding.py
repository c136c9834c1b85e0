"""CLIP prompt encoding with learned vectors spliced in where the embedding's name appears.

Why not diffusers' recipe (add a token, back-propagate into the whole token-embedding matrix, restore
the other rows after each step): the learned vectors are their own small tensor, the tokenizer and the
text encoder are never modified (so the same loaded base model can be shared with evaluation), and the
gradient is only as big as the vectors. This is also how the webui does it: it finds the name's tokens
in the prompt and expands them into the embedding's vectors.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import CLIPTextModel, CLIPTokenizer

NO_SLOT = -1


@dataclass(frozen=True)
class PlaceholderPrompts:
    """Token ids padded to the tokenizer's length, plus where each learned vector goes."""

    input_ids: torch.Tensor  # (batch, 77) int64; placeholder positions hold the pad id
    slots: torch.Tensor  # (batch, 77) int64: index of the learned vector at each position, NO_SLOT elsewhere


def name_token_ids(tokenizer: CLIPTokenizer, name: str) -> list[int]:
    ids = tokenizer(name, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"embedding name {name!r} tokenizes to nothing")
    return ids


def _expand_name(ids: list[int], name_ids: list[int], n_vectors: int, fill_id: int) -> tuple[list[int], list[int]]:
    """Replace every occurrence of the name's token run by n_vectors placeholder slots (holding fill_id)."""
    out_ids: list[int] = []
    out_slots: list[int] = []
    index = 0
    width = len(name_ids)
    while index < len(ids):
        if ids[index : index + width] == name_ids:
            out_ids += [fill_id] * n_vectors
            out_slots += list(range(n_vectors))
            index += width
        else:
            out_ids.append(ids[index])
            out_slots.append(NO_SLOT)
            index += 1
    return out_ids, out_slots


def tokenize_with_placeholder(
    tokenizer: CLIPTokenizer, prompts: Sequence[str], name: str, n_vectors: int
) -> PlaceholderPrompts:
    """Tokenize like diffusers' pipelines (BOS, at most 75 tokens, EOS, pad to 77), name expanded to slots.

    A prompt whose slots would be cut by the 75-token limit is an error rather than a silent partial
    embedding: shorten its caption or put `[name]` earlier in the template.
    """
    length = tokenizer.model_max_length
    name_ids = name_token_ids(tokenizer, name)
    rows_ids, rows_slots = [], []
    for prompt, ids in zip(prompts, tokenizer(list(prompts), add_special_tokens=False).input_ids):
        ids, slots = _expand_name(ids, name_ids, n_vectors, tokenizer.pad_token_id)
        if any(slot != NO_SLOT for slot in slots[length - 2 :]):
            raise ValueError(
                f"prompt {prompt!r}: the embedding {name!r} ({n_vectors} vectors) falls beyond CLIP's "
                f"{length - 2}-token limit; shorten the caption or put [name] earlier in the template"
            )
        ids, slots = ids[: length - 2], slots[: length - 2]
        padding = length - 2 - len(ids)
        rows_ids.append([tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * padding)
        rows_slots.append([NO_SLOT, *slots, NO_SLOT] + [NO_SLOT] * padding)
    return PlaceholderPrompts(
        input_ids=torch.tensor(rows_ids, dtype=torch.long), slots=torch.tensor(rows_slots, dtype=torch.long)
    )


def _causal_mask(length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive mask (1, 1, length, length): CLIP's text transformer only looks at earlier tokens."""
    mask = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=device)
    return torch.triu(mask, diagonal=1)[None, None]


def check_clip_skip(text_encoder: CLIPTextModel, clip_skip: int) -> None:
    layers = len(text_encoder.encoder.layers)
    if not 1 <= clip_skip <= layers:
        raise ValueError(f"clip_skip must be between 1 and {layers} (the text encoder's layer count), got {clip_skip}")


def encode_embeddings(text_encoder: CLIPTextModel, inputs_embeds: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
    """Run the frozen text transformer on token vectors; clip_skip N stops N-1 layers early (webui numbering)."""
    check_clip_skip(text_encoder, clip_skip)
    length = inputs_embeds.shape[1]
    position_ids = torch.arange(length, device=inputs_embeds.device)[None]
    hidden = text_encoder.embeddings(inputs_embeds=inputs_embeds, position_ids=position_ids)
    mask = _causal_mask(length, hidden.dtype, hidden.device)
    depth = len(text_encoder.encoder.layers) - (clip_skip - 1)
    for layer in text_encoder.encoder.layers[:depth]:
        hidden = layer(hidden, mask)
    return text_encoder.final_layer_norm(hidden)


def encode_input_ids(text_encoder: CLIPTextModel, input_ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
    """Token ids only (an embedding already loaded into the table); the same path, so clip skip works too."""
    table = text_encoder.embeddings.token_embedding
    return encode_embeddings(text_encoder, table(input_ids.to(table.weight.device)), clip_skip)


class CachedPromptEncoder:
    """Prompts through the frozen text encoder, each distinct prompt encoded once per run.

    Why: when only the UNet side trains (hypernetworks, LoRA without the text encoder), the conditioning of a
    prompt never changes, and templates times captions repeat prompts over the epochs. The cache is bounded
    (least recently used first out), since tag shuffling can make nearly every prompt new.
    """

    def __init__(self, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, clip_skip: int = 1,
                 capacity: int = 4096) -> None:  # fmt: skip
        self.tokenizer, self.text_encoder, self.clip_skip, self.capacity = tokenizer, text_encoder, clip_skip, capacity
        self.cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.encoded = 0  # prompts the text encoder ran on (cache misses)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        missing = list(dict.fromkeys(prompt for prompt in prompts if prompt not in self.cache))
        if missing:
            ids = self.tokenizer(missing, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids  # fmt: skip
            for prompt, row in zip(missing, encode_input_ids(self.text_encoder, ids, self.clip_skip)):
                self.cache[prompt] = row
            self.encoded += len(missing)
        for prompt in prompts:
            self.cache.move_to_end(prompt)
        rows = torch.stack([self.cache[prompt] for prompt in prompts])
        while len(self.cache) > self.capacity:
            self.cache.popitem(last=False)
        return rows


def encode_prompts(
    text_encoder: CLIPTextModel, prompts: PlaceholderPrompts, vectors: torch.Tensor, clip_skip: int = 1
) -> torch.Tensor:
    """(batch, 77, hidden) conditioning; gradients reach `vectors` and nothing else.

    The token table is read detached so the frozen vocabulary never collects gradients, whatever
    requires_grad state another user of the shared model left it in.
    """
    table = text_encoder.embeddings.token_embedding.weight
    input_ids = prompts.input_ids.to(table.device)
    slots = prompts.slots.to(table.device)
    frozen = torch.nn.functional.embedding(input_ids, table.detach())
    learned = vectors.to(device=table.device, dtype=table.dtype)[slots.clamp(min=0)]
    inputs_embeds = torch.where((slots != NO_SLOT)[..., None], learned, frozen)
    return encode_embeddings(text_encoder, inputs_embeds, clip_skip)


def encode_with_vectors(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: Sequence[str], name: str, vectors: torch.Tensor,
    clip_skip: int = 1,
) -> torch.Tensor:
    """Prompts to conditioning with `vectors` wherever `name` appears: the encoding training, validation and
    previews share."""
    tokens = tokenize_with_placeholder(tokenizer, prompts, name, vectors.shape[0])
    return encode_prompts(text_encoder, tokens, vectors, clip_skip)


def initial_vectors(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, text: str, n_vectors: int) -> torch.Tensor:
    """The webui's initialization: the text's token vectors, repeated or truncated to n_vectors (zeros if empty).

    Returned as a float32 CPU copy: the learned vectors and their optimizer always stay in float32.
    """
    table = text_encoder.embeddings.token_embedding.weight.detach()
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if not ids:
        return torch.zeros(n_vectors, table.shape[1], dtype=torch.float32)
    return fit_vectors(table[torch.tensor(ids, dtype=torch.long, device=table.device)], n_vectors)


def fit_vectors(vectors: torch.Tensor, n_vectors: int) -> torch.Tensor:
    """The webui's fit of initialization vectors to n_vectors: repeated in order, or truncated (float32 CPU copy)."""
    picks = torch.arange(n_vectors) % vectors.shape[0]
    return vectors.detach().to(device="cpu", dtype=torch.float32)[picks].clone()
