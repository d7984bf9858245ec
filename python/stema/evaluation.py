"""Evaluation: greedy completions of held-out prompts scored by a reward function (exact-match
accuracy on a verifiable task), and how often a policy prefers the chosen completion of a pair."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from stema.data.collate import collate_pairs, collate_prompts
from stema.data.tokenize import TokenizedPair, TokenizedPrompt, encode_prompt
from stema.training.logprobs import completion_token_logprobs, sequence_logprobs

Prompt = str | list[dict[str, str]]


@torch.no_grad()
def generate_greedy(model, tokenizer, prompts: Sequence[Prompt], *, max_new_tokens: int, batch_size: int = 64) -> list[str]:
    """Greedy completions (decoded without special tokens) of `prompts`, rendered exactly as in
    training (`encode_prompt`: BOS + text, or the chat template with its generation prompt)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    completions: list[str] = []
    try:
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
    finally:
        model.train(was_training)
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
    was_training = model.training
    model.eval()
    preferred = 0
    try:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            batch = {key: value.to(device) for key, value in collate_pairs(chunk, pad_id).items()}
            chosen, rejected = sequence_logprobs(*completion_token_logprobs(model, batch)).chunk(2)  # [B] each
            preferred += int((chosen > rejected).sum())
    finally:
        model.train(was_training)
    return preferred / max(1, len(pairs))
