"""Test models: Hugging Face models with weights spread wider than their initialization, so that
logits, log-probs and greedy choices are far from uniform."""

from __future__ import annotations

import math

import torch


def scramble(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights of a realistic scale (HF's 0.02 init gives near-uniform logits, which would
    make greedy decoding hinge on ties): matrices ~ 1.5 / sqrt(fan_in), norms ~ 1, biases ~ 0.2."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if name.endswith("norm.weight"):
                parameter.copy_(1 + 0.2 * noise)
            elif parameter.dim() == 1:
                parameter.copy_(0.2 * noise)
            else:
                parameter.copy_(1.5 * noise / math.sqrt(parameter.shape[-1]))
    return model.eval()


def spread(model: torch.nn.Module, *, seed: int, std: float = 0.3) -> torch.nn.Module:
    """`model` with its matrices redrawn from N(0, std^2) with `seed` (vectors: norms, biases, kept
    as initialized): logits far from the near-uniform ones of the 0.02 initialization."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return model


def save_spread_model(path, spec, *, seed: int, std: float = 0.3):
    """A tiny Llama folder (model + character tokenizer) built from `spec` whose matrices are drawn
    from N(0, std^2) with `seed` (`spread`); returns `path`."""
    from stema.models.tiny import build_model, build_tokenizer

    tokenizer = build_tokenizer()
    spread(build_model(spec, tokenizer), seed=seed, std=std).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def block_sized_llama(*, tied: bool, seed: int, kv_heads: int = 2) -> torch.nn.Module:
    """A scrambled 2-layer Llama whose every weight dimension is a multiple of 64 (hidden 64, head_dim
    32, intermediate 128, vocabulary 128): the sizes for which oneDNN packs linear weights in whole
    row blocks, so a CPU engine keeps them only packed and refits write them in place."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=kv_heads, max_position_embeddings=64,
                         tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    return scramble(LlamaForCausalLM(config).eval(), seed=seed)
