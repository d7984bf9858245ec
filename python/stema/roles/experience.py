"""Rollouts as trainer tensors: right-padded sequences and the action layout of PPO.

`experience_tensors(rollouts, pad_id)` turns generated sequences into `[B, L]` tensors:

    input_ids       prompt + response, right-padded with pad_id
    attention_mask  1 at real tokens
    labels          the response tokens, -100 at prompt and padding (what the trainers' log-prob
                    code scores: `stema.training.logprobs.completion_token_logprobs`)
    action_mask     column t is True where token t + 1 is a response token (the action layout of
                    `stema.losses.advantages`: log-probs, values and rewards all live at column t)
    engine_logprobs the engine's sampling log-prob of each action, at its column (0 elsewhere)
    last_action     [B] column of each sequence's last action (where its score is placed); -1 for
                    an empty response

Right padding (not the engine's left padding) keeps positions 0.. for every row, which is how the
SFT, reward and critic models were trained, so no position ids are needed.
"""

from __future__ import annotations

from typing import Sequence

import torch

from stema.rollout import Rollout
from stema.training.logprobs import IGNORE_INDEX


def experience_tensors(rollouts: Sequence[Rollout], pad_id: int) -> dict[str, torch.Tensor]:
    """The tensors described in the module docstring, on the CPU."""
    lengths = [len(r.prompt_token_ids) + len(r.token_ids) for r in rollouts]
    shape = (len(rollouts), max(lengths))
    input_ids = torch.full(shape, pad_id, dtype=torch.int64)
    attention_mask = torch.zeros(shape, dtype=torch.int64)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.int64)
    engine_logprobs = torch.zeros(shape, dtype=torch.float32)
    last_action = torch.full((len(rollouts),), -1, dtype=torch.int64)
    for row, rollout in enumerate(rollouts):
        prompt, response = len(rollout.prompt_token_ids), len(rollout.token_ids)
        input_ids[row, :prompt] = torch.tensor(rollout.prompt_token_ids, dtype=torch.int64)
        input_ids[row, prompt : prompt + response] = torch.tensor(rollout.token_ids, dtype=torch.int64)
        attention_mask[row, : prompt + response] = 1
        labels[row, prompt : prompt + response] = input_ids[row, prompt : prompt + response]
        engine_logprobs[row, prompt - 1 : prompt - 1 + response] = rollout.logprobs
        if response:
            last_action[row] = prompt + response - 2
    action_mask = torch.nn.functional.pad(labels[:, 1:] != IGNORE_INDEX, (0, 1), value=False)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "action_mask": action_mask,
        "engine_logprobs": engine_logprobs,
        "last_action": last_action,
    }


def place_scores(scores: torch.Tensor, last_action: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """`[B, L]` fp32 token rewards: each sequence's score `[B]` at its last action, 0 elsewhere
    (sequences with an empty response get nothing)."""
    rewards = torch.zeros(shape, dtype=torch.float32)
    has_action = last_action >= 0
    rows = torch.arange(len(scores))[has_action]
    rewards[rows, last_action[has_action]] = scores[has_action].float()
    return rewards


def model_inputs(batch: dict[str, torch.Tensor], rows: torch.Tensor | slice | None = None) -> dict[str, torch.Tensor]:
    """The input_ids / attention_mask / labels of `batch` (optionally a subset of rows)."""
    keys = ("input_ids", "attention_mask", "labels")
    if rows is None:
        return {key: batch[key] for key in keys}
    return {key: batch[key][rows] for key in keys}
