from __future__ import annotations

import pytest
import torch

from training.base_model import BaseModel
from training.prompt_encoding import (
    NO_SLOT,
    encode_input_ids,
    encode_prompts,
    initial_vectors,
    tokenize_with_placeholder,
)


def plain_ids(base: BaseModel, prompts: list[str]) -> torch.Tensor:
    """Token ids exactly as diffusers' pipeline makes them."""
    tokenizer = base.tokenizer
    length = tokenizer.model_max_length
    return tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids


def token_vectors(base: BaseModel, text: str) -> torch.Tensor:
    ids = base.tokenizer(text, add_special_tokens=False).input_ids
    return base.text_encoder.embeddings.token_embedding.weight[ids].detach().clone()


def test_learned_vectors_equal_to_token_vectors_reproduce_the_plain_prompt(tiny_base: BaseModel) -> None:
    vectors = token_vectors(tiny_base, "red hat")  # three tokens in the tiny vocabulary
    assert vectors.shape[0] == 3
    prompts = tokenize_with_placeholder(tiny_base.tokenizer, ["a photo of a mycat, small", "mycat"], "mycat", 3)
    with torch.no_grad():
        ours = encode_prompts(tiny_base.text_encoder, prompts, vectors, clip_skip=1)
        reference = tiny_base.text_encoder(plain_ids(tiny_base, ["a photo of a red hat, small", "red hat"])).last_hidden_state
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)


def test_clip_skip_two_is_the_penultimate_layer_through_the_final_norm(tiny_base: BaseModel) -> None:
    vectors = token_vectors(tiny_base, "blue")
    prompts = tokenize_with_placeholder(tiny_base.tokenizer, ["a mycat painting"], "mycat", 1)
    text_encoder = tiny_base.text_encoder
    with torch.no_grad():
        ours = encode_prompts(text_encoder, prompts, vectors, clip_skip=2)
        hidden = text_encoder(plain_ids(tiny_base, ["a blue painting"]), output_hidden_states=True).hidden_states
        reference = text_encoder.final_layer_norm(hidden[-2])
        assert not torch.allclose(ours, text_encoder(plain_ids(tiny_base, ["a blue painting"])).last_hidden_state)
        by_ids = encode_input_ids(text_encoder, plain_ids(tiny_base, ["a blue painting"]), clip_skip=2)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(by_ids, reference, rtol=0, atol=1e-6)


def test_every_occurrence_of_the_name_becomes_the_vector_slots(tiny_base: BaseModel) -> None:
    tokenizer = tiny_base.tokenizer
    prompts = tokenize_with_placeholder(tokenizer, ["mycat and mycat", "a photo"], "mycat", 2)
    assert prompts.input_ids.shape == prompts.slots.shape == (2, tokenizer.model_max_length)
    assert prompts.slots[0, :6].tolist() == [NO_SLOT, 0, 1, NO_SLOT, 0, 1]
    assert (prompts.slots[1] == NO_SLOT).all()
    assert prompts.input_ids[0, 0] == tokenizer.bos_token_id
    assert prompts.input_ids[0, 6] == tokenizer.eos_token_id


def test_gradients_reach_only_the_vectors(tiny_base: BaseModel) -> None:
    vectors = torch.nn.Parameter(torch.randn(2, 32))
    prompts = tokenize_with_placeholder(tiny_base.tokenizer, ["a photo of a mycat"], "mycat", 2)
    encode_prompts(tiny_base.text_encoder, prompts, vectors).square().sum().backward()
    assert vectors.grad is not None and vectors.grad.abs().sum() > 0
    assert all(parameter.grad is None for parameter in tiny_base.text_encoder.parameters())


def test_long_prompts_are_truncated_but_never_through_the_embedding(tiny_base: BaseModel) -> None:
    tokenizer = tiny_base.tokenizer
    long_caption = ", ".join(["red"] * 60)
    fits = tokenize_with_placeholder(tokenizer, [f"mycat, {long_caption}"], "mycat", 4)
    assert fits.input_ids.shape[1] == 77 and fits.input_ids[0, -1] == tokenizer.eos_token_id
    with pytest.raises(ValueError, match="falls beyond CLIP's 75-token limit"):
        tokenize_with_placeholder(tokenizer, [f"{long_caption}, mycat"], "mycat", 4)


def test_initial_vectors_repeat_or_truncate_the_initialization_text(tiny_base: BaseModel) -> None:
    tokenizer, text_encoder = tiny_base.tokenizer, tiny_base.text_encoder
    red_hat = token_vectors(tiny_base, "red hat")
    repeated = initial_vectors(tokenizer, text_encoder, "red hat", 5)
    torch.testing.assert_close(repeated, red_hat[[0, 1, 2, 0, 1]])
    torch.testing.assert_close(initial_vectors(tokenizer, text_encoder, "red hat", 2), red_hat[:2])
    assert repeated.dtype == torch.float32 and repeated.device.type == "cpu"
    assert torch.equal(initial_vectors(tokenizer, text_encoder, "", 3), torch.zeros(3, 32))


def test_clip_skip_outside_the_layer_count_is_an_error(tiny_base: BaseModel) -> None:
    prompts = tokenize_with_placeholder(tiny_base.tokenizer, ["mycat"], "mycat", 1)
    with pytest.raises(ValueError, match="clip_skip must be between 1 and 3"):
        encode_prompts(tiny_base.text_encoder, prompts, torch.zeros(1, 32), clip_skip=4)
