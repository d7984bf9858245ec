"""Evaluation: greedy completions of held-out prompts scored by a reward function (exact-match
accuracy on a verifiable task), how often a policy prefers the chosen completion of a pair, and
Spearman's rank correlation (requested vs measured attributes of a steered model)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from stema.data.collate import collate_pairs, collate_prompts
from stema.data.tokenize import TokenizedPair, TokenizedPrompt, encode_prompt
from stema.models.loading import eval_mode
from stema.training.logprobs import completion_token_logprobs, sequence_logprobs

Prompt = str | list[dict[str, str]]


@torch.no_grad()
def generate_greedy(model, tokenizer, prompts: Sequence[Prompt], *, max_new_tokens: int, batch_size: int = 64) -> list[str]:
    """Greedy completions (decoded without special tokens) of `prompts`, rendered exactly as in
    training (`encode_prompt`: BOS + text, or the chat template with its generation prompt)."""
    device = next(model.parameters()).device
    completions: list[str] = []
    with eval_mode(model):
        for start in range(0, len(prompts), batch_size):
            chunk = [TokenizedPrompt(encode_prompt(p, tokenizer), p) for p in prompts[start : start + batch_size]]
            batch = collate_prompts(chunk, tokenizer.pad_token_id)  # left-padded [B, P]
            output = model.generate(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            new_tokens = output[:, batch["input_ids"].shape[1] :]  # [B, <= max_new_tokens]
            completions.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return completions


def mean_reward(
    model, tokenizer, prompts: Sequence[Prompt], reward: Callable[[Prompt, str], float], *, max_new_tokens: int
) -> float:
    """Mean of `reward(prompt, greedy completion)` over `prompts` (exact-match accuracy when the
    reward is 1 for a correct answer and 0 otherwise)."""
    completions = generate_greedy(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    return sum(reward(prompt, completion) for prompt, completion in zip(prompts, completions)) / max(1, len(prompts))


@torch.no_grad()
def preference_accuracy(model, pairs: Sequence[TokenizedPair], *, pad_id: int, batch_size: int = 64) -> float:
    """Fraction of `pairs` for which the policy's summed log-prob of the chosen completion is
    strictly greater than that of the rejected one (log p(chosen | prompt) > log p(rejected | prompt))."""
    device = next(model.parameters()).device
    preferred = 0
    with eval_mode(model):
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            batch = {key: value.to(device) for key, value in collate_pairs(chunk, pad_id).items()}
            chosen, rejected = sequence_logprobs(*completion_token_logprobs(model, batch)).chunk(2)  # [B] each
            preferred += int((chosen > rejected).sum())
    return preferred / max(1, len(pairs))


def average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks of `values`, tied values sharing the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda index: values[index])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation: the Pearson correlation of the average ranks of `x` and `y`
    (ties handled as in scipy.stats.spearmanr); 0.0 when either side is constant."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"spearman needs two sequences of the same length >= 2, got {len(x)} and {len(y)}")
    rank_x, rank_y = average_ranks(x), average_ranks(y)
    mean_x, mean_y = sum(rank_x) / len(x), sum(rank_y) / len(y)
    covariance = sum((a - mean_x) * (b - mean_y) for a, b in zip(rank_x, rank_y))
    spread = (sum((a - mean_x) ** 2 for a in rank_x) * sum((b - mean_y) ** 2 for b in rank_y)) ** 0.5
    return covariance / spread if spread > 0 else 0.0
