"""Tests for workers.tiny_model: the offline tiny Llama + char tokenizer."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from workers.tiny_model import make_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def model(tiny_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_dir)


def _weights(path):
    return load_file(str(path / "model.safetensors"))


def test_loads_with_auto_classes(tiny_dir, tokenizer, model):
    config = model.config
    assert (tiny_dir / "model.safetensors").is_file()
    assert config.model_type == "llama"
    assert config.hidden_size // config.num_attention_heads >= 32
    assert config.head_dim >= 32
    assert config.vocab_size == len(tokenizer)
    assert model.dtype == torch.float32
    assert tokenizer.pad_token_id == 0
    assert config.pad_token_id == 0
    assert config.bos_token_id == tokenizer.bos_token_id
    assert config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == 0
    assert tokenizer.padding_side == "left"
    assert tokenizer.model_max_length == config.max_position_embeddings


@pytest.mark.parametrize(
    "text",
    ["abc=cba", "hello world\n\tx", "12+7=19", "  two  spaces , n't\n\n", ""],
)
def test_char_level_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text


def test_no_special_tokens_added_and_unknown_maps_to_unk(tokenizer):
    ids = tokenizer.encode("ab")
    assert tokenizer.bos_token_id not in ids
    assert tokenizer.eos_token_id not in ids
    assert tokenizer.encode("é") == [tokenizer.unk_token_id]


def test_sampled_generation_on_left_padded_batch(tokenizer, model):
    batch = tokenizer(["1+1=", "hello world: "], return_tensors="pt", padding=True)
    assert batch["attention_mask"][0, 0] == 0  # shorter prompt is left-padded
    prompt_len = batch["input_ids"].shape[1]
    torch.manual_seed(0)
    out = model.generate(**batch, do_sample=True, max_new_tokens=5)
    assert out.shape[0] == 2
    assert prompt_len < out.shape[1] <= prompt_len + 5
    assert torch.equal(out[:, :prompt_len], batch["input_ids"])


def test_same_seed_same_weights_different_seed_different(tmp_path):
    a = _weights(make_tiny_model(tmp_path / "a", seed=1))
    b = _weights(make_tiny_model(tmp_path / "b", seed=1))
    c = _weights(make_tiny_model(tmp_path / "c", seed=2))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_head_dim_below_32_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="head_dim"):
        make_tiny_model(tmp_path / "bad", hidden_size=64, num_heads=4)
    assert not (tmp_path / "bad").exists()
