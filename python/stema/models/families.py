"""Tiny randomly initialized models of each supported architecture family, made by code.

STEMA promises that any local Hugging Face causal-LM folder of the Llama, Qwen2, Mistral, GPT-2,
Gemma and Phi-3 families works in place of the built-in tiny model. These builders make a model
of each family small enough for a test (hidden size 32, 2 layers) from the transformers config
classes alone, with no download, and `save_family_model` writes it with the character tokenizer of
`stema.models.tiny` as an ordinary folder that the Auto classes load.

    path = save_family_model(tmp / "gpt2", "gpt2")
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from stema.models import tiny


def _llama(size: dict[str, Any]):
    from transformers import LlamaConfig

    return LlamaConfig(**size, rms_norm_eps=1e-5, tie_word_embeddings=True)


def _qwen2(size: dict[str, Any]):
    from transformers import Qwen2Config

    return Qwen2Config(**size, rms_norm_eps=1e-5, tie_word_embeddings=True, use_sliding_window=False)


def _mistral(size: dict[str, Any]):
    from transformers import MistralConfig

    head_dim = size["hidden_size"] // size["num_attention_heads"]
    return MistralConfig(**size, head_dim=head_dim, rms_norm_eps=1e-5, tie_word_embeddings=False, sliding_window=None)


def _gemma(size: dict[str, Any]):
    from transformers import GemmaConfig

    # GemmaConfig defaults to head_dim=256 whatever the hidden size; tie it to the tiny size.
    head_dim = size["hidden_size"] // size["num_attention_heads"]
    return GemmaConfig(**size, head_dim=head_dim, rms_norm_eps=1e-6, tie_word_embeddings=True)


def _phi3(size: dict[str, Any]):
    from transformers import Phi3Config

    return Phi3Config(
        **size,
        original_max_position_embeddings=size["max_position_embeddings"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        sliding_window=None,
        tie_word_embeddings=False,
    )


def _gpt2(size: dict[str, Any]):
    from transformers import GPT2Config

    # GPT-2 has its own field names and no grouped-query attention (num_key_value_heads unused).
    return GPT2Config(
        vocab_size=size["vocab_size"],
        n_positions=size["max_position_embeddings"],
        n_embd=size["hidden_size"],
        n_layer=size["num_hidden_layers"],
        n_head=size["num_attention_heads"],
        n_inner=size["intermediate_size"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=size["bos_token_id"],
        eos_token_id=size["eos_token_id"],
        pad_token_id=size["pad_token_id"],
        tie_word_embeddings=True,
    )


# family name -> builder of its transformers config from the shared size fields
FAMILY_CONFIGS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "llama": _llama,
    "qwen2": _qwen2,
    "mistral": _mistral,
    "gpt2": _gpt2,
    "gemma": _gemma,
    "phi3": _phi3,
}
FAMILIES = tuple(FAMILY_CONFIGS)


def tiny_family_config(
    family: str,
    *,
    vocab_size: int,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 64,
    max_position_embeddings: int = 128,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
):
    """A transformers config (`LlamaConfig`, `GPT2Config`, ...) for a tiny model of `family`.

    `family` is one of `FAMILIES`. Dropout is off in every family so that train-mode forwards are
    deterministic. GPT-2 ignores `num_kv_heads` (it has no grouped-query attention).
    """
    if family not in FAMILY_CONFIGS:
        raise ValueError(f"unknown model family {family!r}; known families: {', '.join(FAMILIES)}")
    size = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    return FAMILY_CONFIGS[family](size)


def build_family_model(family: str, *, tokenizer=None, seed: int = 0):
    """A randomly initialized tiny causal LM of `family` sized for `tokenizer` (default: the tiny
    character tokenizer); deterministic for a given `seed`, and the global RNG is left as it was."""
    from transformers import AutoModelForCausalLM

    tokenizer = tokenizer or tiny.build_tokenizer()
    config = tiny_family_config(
        family,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def save_family_model(path: str | Path, family: str, *, seed: int = 0) -> Path:
    """Write a tiny `family` causal LM and the character tokenizer as a Hugging Face folder at
    `path`; returns the path."""
    path = Path(path)
    tokenizer = tiny.build_tokenizer()
    build_family_model(family, tokenizer=tokenizer, seed=seed).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
