"""Where the rewards of generated completions come from: a Python function, or a trained reward model.

    reward_fn = load_reward_function("builtin")                    # the built-in task's exact match
    reward_fn = load_reward_function("my_package.rewards:score")   # any importable function
    rewards = score_with_function(reward_fn, prompts, texts)       # [B] fp32

    scorer = RewardModelScorer(reward_model, micro_batch_size=32)  # a `stema rm` checkpoint
    rewards = scorer.score(prompt_token_ids, response_token_ids)   # [B] fp32, no gradients

A reward function takes `(prompt, completion)`: the prompt as the data gave it (text, or a list of
chat messages) and the completion as decoded text (special tokens skipped), and returns a number.
A reward model scores the token sequence prompt + response (with its EOS) at its last token, as
`stema rm` trained it on prompt + completion; it must share the policy's tokenizer.
"""

from __future__ import annotations

import importlib
import math
from typing import Any, Callable, Sequence

import torch

from stema.config import ConfigError
from stema.models.loading import eval_mode

RewardFunction = Callable[[Any, str], float]
BUILTIN_REWARDS = {"builtin": "stema.data.builtin:reward", "builtin_digits": "stema.data.builtin:digit_reward"}


def load_reward_function(spec: str, *, field: str = "reward.function") -> RewardFunction:
    """The function named by `spec`: 'module:function' (dots allowed in both parts, e.g.
    'pkg.mod:Class.method'), or a built-in name ('builtin': the built-in task's exact match).
    ConfigError naming `field` when it cannot be imported or is not callable."""
    target = BUILTIN_REWARDS.get(spec, spec)
    module_name, separator, attribute = target.partition(":")
    if not separator or not module_name or not attribute:
        raise ConfigError(f"{field}: expected 'module:function' or one of {sorted(BUILTIN_REWARDS)}, got {spec!r}")
    try:
        value: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"{field}: cannot import module {module_name!r} ({error})") from None
    for part in attribute.split("."):
        if not hasattr(value, part):
            raise ConfigError(f"{field}: {module_name!r} has no attribute {attribute!r}")
        value = getattr(value, part)
    if not callable(value):
        raise ConfigError(f"{field}: {target!r} is not callable")
    return value


def score_with_function(reward_fn: RewardFunction, prompts: Sequence[Any], completions: Sequence[str]) -> torch.Tensor:
    """`[B]` fp32 rewards `reward_fn(prompt, completion)`; a non-number or non-finite result is an
    error naming the example, never a silent NaN in the advantages."""
    if len(prompts) != len(completions):
        raise ValueError(f"score_with_function: {len(prompts)} prompts but {len(completions)} completions")
    rewards = []
    for index, (prompt, completion) in enumerate(zip(prompts, completions)):
        value = reward_fn(prompt, completion)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"reward function returned {value!r} for example {index} (completion {completion!r}); expected a finite number")
        rewards.append(float(value))
    return torch.tensor(rewards, dtype=torch.float32)


def right_padded(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids `[B, T]` int64 padded with `pad_id` on the right, attention_mask `[B, T]` int64)."""
    width = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.int64)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.int64)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = torch.as_tensor(list(sequence), dtype=torch.int64)
        attention_mask[row, : len(sequence)] = 1
    return input_ids, attention_mask


class RewardModelScorer:
    """Scores prompt + response token sequences with a one-output sequence classifier (a `stema rm`
    checkpoint), `micro_batch_size` sequences per forward pass, under no_grad, in eval mode.

    The score of a sequence is the classifier's output at its last token: the sequences are right
    padded and the last real position is taken explicitly, so it does not depend on how the model
    finds padding (a pad id equal to EOS would otherwise hide a trailing EOS).
    """

    def __init__(self, model: torch.nn.Module, *, micro_batch_size: int = 32):
        num_labels = getattr(getattr(model, "config", None), "num_labels", None)
        if num_labels != 1:
            raise ConfigError(f"reward.model: a PPO reward model needs exactly one output; this one has {num_labels}")
        self.model = model
        self.micro_batch_size = micro_batch_size
        self.pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    @torch.no_grad()
    def score(self, prompt_token_ids: Sequence[Sequence[int]], response_token_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """`[B]` fp32 CPU rewards of the sequences prompt_i + response_i."""
        from stema.models.value_head import token_values

        sequences = [list(prompt) + list(response) for prompt, response in zip(prompt_token_ids, response_token_ids)]
        device = next(self.model.parameters()).device
        scores = []
        with eval_mode(self.model):
            for start in range(0, len(sequences), self.micro_batch_size):
                input_ids, attention_mask = right_padded(sequences[start : start + self.micro_batch_size], self.pad_id)
                values = token_values(self.model, input_ids.to(device), attention_mask.to(device))  # [b, T]
                last = attention_mask.sum(-1).to(device) - 1  # [b]
                scores.append(values.gather(1, last[:, None]).squeeze(1).float().cpu())
        return torch.cat(scores)
