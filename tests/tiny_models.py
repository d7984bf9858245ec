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
