"""Test models for the rollout engine: Hugging Face models with weights of a realistic scale."""

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
