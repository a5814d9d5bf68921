"""Build a tiny random-init causal LM with a character-level tokenizer, offline.

Tests and the demo must run without network access and there is no model hub
here, so this module writes a complete Hugging Face model directory (weights,
config, generation config, tokenizer) from scratch. The result loads with
``AutoModelForCausalLM`` / ``AutoTokenizer`` and is small enough for CPU tests
while keeping head_dim >= 32 so vLLM can serve it too.

The model is Llama (not Qwen2: AutoTokenizer swaps in a byte-level
pre-tokenizer for Qwen2 configs). The tokenizer maps each printable ASCII
character to exactly one token, adds no special tokens when encoding and
decodes by plain concatenation, so ``decode(encode(s)) == s`` for such text. It carries a
compact chat template, so chat rows and episodes run offline too.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3
CHARACTERS = tuple(c for c in string.printable if c not in "\x0b\x0c\r")
MIN_HEAD_DIM = 32  # vLLM's attention kernels need at least this
# Short, so that conversations fit the tiny context: one letter per role ("s:", "u:", "a:",
# "t:"), a line per message, an assistant turn closed by EOS; tools (when given) as a
# system line of their JSON, tool calls in <tool_call> tags as Hermes-style templates write them.
CHAT_TEMPLATE = (
    "{%- if tools %}s:tools {{ tools | tojson }}{{ '\\n' }}{% endif -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' -%}"
    "a:{{ m.content or '' }}"
    "{%- for c in m.tool_calls or [] -%}"
    '<tool_call>{"name": {{ c.function.name | tojson }}, "arguments": '
    "{{ c.function.arguments }}}</tool_call>"
    "{%- endfor -%}"
    "{{ eos_token }}{{ '\\n' }}"
    "{%- else -%}"
    "{{ m.role[0] }}:{{ m.content }}{{ '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}a:{% endif -%}"
)


def build_tokenizer(max_positions: int = 256) -> PreTrainedTokenizerFast:
    """One token per character; unknown characters map to <unk>; a chat template."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # An empty pattern with "isolated" splits the text into single characters.
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()  # concatenate, no spaces in between
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",  # generation batches are left-padded
        model_max_length=max_positions,
        clean_up_tokenization_spaces=False,  # keep " ," etc. verbatim
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _head_dim(hidden_size: int, num_heads: int) -> int:
    if num_heads <= 0 or hidden_size % num_heads:
        raise ValueError(
            f"hidden_size {hidden_size} must be a positive multiple of num_heads {num_heads}"
        )
    head_dim = hidden_size // num_heads
    if head_dim < MIN_HEAD_DIM:
        raise ValueError(
            f"head_dim {head_dim} = hidden_size // num_heads must be >= {MIN_HEAD_DIM}"
        )
    return head_dim


def build_model(
    tokenizer: PreTrainedTokenizerFast,
    *,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
    max_positions: int,
    seed: int,
) -> LlamaForCausalLM:
    """Random-init float32 Llama whose vocab and special ids match tokenizer."""
    head_dim = _head_dim(hidden_size, num_heads)
    ids = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        head_dim=head_dim,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        dtype="float32",
        **ids,
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG alone
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(**ids)
    return model.eval()


def make_tiny_model(
    out_dir: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 256,
    max_positions: int = 256,
    seed: int = 0,
) -> Path:
    """Write a tiny Llama model and its tokenizer to out_dir; return the path."""
    _head_dim(hidden_size, num_heads)  # fail before touching the filesystem
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(max_positions)
    model = build_model(
        tokenizer,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        intermediate_size=intermediate_size,
        max_positions=max_positions,
        seed=seed,
    )
    model.save_pretrained(out)  # safetensors by default
    tokenizer.save_pretrained(out)
    return out
