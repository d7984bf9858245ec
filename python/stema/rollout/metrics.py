"""Engine-vs-trainer log-prob agreement: the trainer's recompute and the mismatch metric.

PPO logs, every step, how far the engine's sampling log-probs are from the trainer's own
log-probs of the same tokens (after a refit they should agree to the engine dtype's precision;
a growing gap means the refit or the engine is wrong, or the engine runs in a lower precision).
"""

from __future__ import annotations

import torch

import stema_kernels


def response_token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor, *,
                            temperature: float) -> torch.Tensor:
    """Trainer-side log-probs [B, T] fp32 of the response tokens, aligned with input_ids.

    logits: [B, T, V] of the model on input_ids [B, T] (`PaddedRollout` form); column t of the
    result is log softmax(logits[:, t - 1] / temperature)[input_ids[:, t]] where response_mask
    [B, T] is True, and 0 elsewhere (column 0 is never a response token). Differentiable w.r.t.
    the logits, through the fused kernel.
    """
    labels = input_ids[:, 1:].masked_fill(~response_mask[:, 1:].bool(), -100)
    shifted = stema_kernels.token_logprobs(logits[:, :-1], labels, temperature=temperature)  # [B, T - 1]
    return torch.nn.functional.pad(shifted, (1, 0))


def logprob_mismatch(engine_logprobs: torch.Tensor, trainer_logprobs: torch.Tensor,
                     response_mask: torch.Tensor) -> dict[str, float]:
    """{"max", "mean"} of |engine - trainer| over the tokens where response_mask is True.

    All three are [B, T] (or any one shape); returns zeros when no token is masked in.
    """
    if not (engine_logprobs.shape == trainer_logprobs.shape == response_mask.shape):
        raise ValueError(
            f"logprob_mismatch: shapes differ: engine {tuple(engine_logprobs.shape)}, trainer "
            f"{tuple(trainer_logprobs.shape)}, mask {tuple(response_mask.shape)}"
        )
    gap = (engine_logprobs.float() - trainer_logprobs.detach().float()).abs()[response_mask.bool()]
    if gap.numel() == 0:
        return {"max": 0.0, "mean": 0.0}
    return {"max": float(gap.max()), "mean": float(gap.mean())}
