"""Supervised fine-tuning loss."""

from __future__ import annotations

import torch

from . import register_loss


@register_loss("sft")
def sft_loss(
    token_logprobs: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    num_valid_tokens: int | torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-level cross-entropy with an explicit denominator.

        loss = - sum_{b,t} mask[b,t] * log p(y[b,t] | y[b,<t]) / num_valid_tokens

    token_logprobs `[B, T]`: log-probs of the label tokens (0 where ignored), e.g. from
    `stema_kernels.token_logprobs`. loss_mask `[B, T]`: 1 on tokens that count (completion tokens).
    num_valid_tokens: valid tokens in the whole global batch (all micro-batches and ranks).
    Metrics: `nll` (equal to the loss; summed over micro-batches it is the batch mean NLL).
    """
    mask = loss_mask.to(token_logprobs.dtype)
    loss = -(token_logprobs * mask).sum() / num_valid_tokens
    return loss, {"nll": loss.detach()}
