"""Where the rewards of generated completions come from: a Python function or a trained reward
model, behind one `Reward` (the `reward` section of `stema ppo`, `grpo` and `rs`).

    reward = Reward.from_config(config.reward, dtype="float32", device=device, cache_dir=cache)
    scores = reward.score(prompts, texts, prompt_token_ids, response_token_ids)  # [B] fp32

A reward function takes `(prompt, completion)`: the prompt as the data gave it (text, or a list of
chat messages) and the completion as decoded text (special tokens skipped), and returns a number (a
Python int or float, a numpy scalar or a 0-d tensor). `module:function` is imported with the
current folder on the import path (as `python -m` puts it there), so a `rewards.py` beside the
command is found without PYTHONPATH. A function that raises or returns anything but a finite number
stops the run with one line naming the function, the prompt and the value (`RewardFunctionError`).

A reward model scores the token sequence prompt + response (with its EOS) through the one reward
readout `stema.models.value_head.reward_scores` (its last attended token), as `stema rm` trained it
on prompt + completion; it must share the policy's tokenizer. A log-ratio reward model (`stema rm
reward.readout=log_ratio`: a folder with `stema_reward.json`) scores beta * (log pi(response |
prompt) - log pi_ref(response | prompt)) from its causal LM and the reference beside it.
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from stema.config import ConfigError, ModelConfig, RewardSourceConfig
from stema.models.loading import eval_mode

RewardFunction = Callable[[Any, str], float]
BUILTIN_REWARDS = {"builtin": "stema.data.builtin:reward", "builtin_digits": "stema.data.builtin:digit_reward"}


class RewardFunctionError(ValueError):
    """A reward function that raised or returned something other than a finite number; the
    message (one line) names the function, the prompt and the value."""


def import_from_current_folder(module_name: str, *, folder: str | None = None) -> Any:
    """`importlib.import_module(module_name)` with `folder` (default: the current folder) first on
    `sys.path`, where `python -m` puts the current folder (the `stema` script's own folder is
    there instead). A role worker in another process is given the controller's folder."""
    folder = folder or os.getcwd()
    if folder not in sys.path and not (folder == os.getcwd() and "" in sys.path):
        sys.path.insert(0, folder)
    return importlib.import_module(module_name)


def load_reward_function(spec: str, *, field: str = "reward.function", folder: str | None = None) -> RewardFunction:
    """The function named by `spec`: 'module:function' (dots allowed in both parts, e.g.
    'pkg.mod:Class.method'), or a built-in name ('builtin': the built-in task's exact match); the
    module is looked up in `folder` (default: the current folder) first. ConfigError naming
    `field` when it cannot be imported, is not callable or cannot be called as f(prompt, completion)."""
    target = BUILTIN_REWARDS.get(spec, spec)
    module_name, separator, attribute = target.partition(":")
    if not separator or not module_name or not attribute:
        raise ConfigError(f"{field}: expected 'module:function' or one of {sorted(BUILTIN_REWARDS)}, got {spec!r}")
    try:
        value: Any = import_from_current_folder(module_name, folder=folder)
    except ImportError as error:
        raise ConfigError(f"{field}: cannot import module {module_name!r} from {folder or os.getcwd()} or the installed packages "
                          f"({error})") from None
    except Exception as error:  # the module itself fails while importing
        raise ConfigError(f"{field}: importing {module_name!r} raised {type(error).__name__}: {error}") from None
    for part in attribute.split("."):
        if not hasattr(value, part):
            raise ConfigError(f"{field}: {module_name!r} has no attribute {attribute!r}")
        value = getattr(value, part)
    if not callable(value):
        raise ConfigError(f"{field}: {target!r} is not callable")
    try:
        signature = inspect.signature(value)
    except (TypeError, ValueError):  # some builtins have no signature; they are checked when called
        return value
    try:
        signature.bind("prompt", "completion")
    except TypeError:
        raise ConfigError(f"{field}: {target}{signature} cannot be called as f(prompt, completion)") from None
    return value


def as_number(value: Any) -> float | None:
    """`value` as a float when it is a finite real number (Python int/float, numpy scalar, 0-d
    numpy array or tensor; not a bool), else None."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _one_line(text: str, limit: int = 200) -> str:
    """`text` on one line (newlines as spaces), cut to `limit` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short(value: Any) -> str:
    return _one_line(repr(value), 80)


def score_with_function(reward_fn: RewardFunction, prompts: Sequence[Any], completions: Sequence[str], *, name: str = "",
                        locations: Sequence[str] = ()) -> torch.Tensor:
    """`[B]` fp32 rewards `reward_fn(prompt, completion)`. A call that raises or returns anything
    but a finite number is a `RewardFunctionError` naming the function (`name`), the prompt (its
    index in `prompts` and its data location, when `locations` gives one) and the value."""
    if len(prompts) != len(completions):
        raise ValueError(f"score_with_function: {len(prompts)} prompts but {len(completions)} completions")
    name = name or getattr(reward_fn, "__qualname__", repr(reward_fn))
    rewards = []
    for index, (prompt, completion) in enumerate(zip(prompts, completions)):
        where = f"prompt {index}" + (f" ({locations[index]})" if index < len(locations) and locations[index] else "")
        try:
            value = reward_fn(prompt, completion)
        except Exception as error:
            raise RewardFunctionError(
                f"reward function {name} raised {type(error).__name__}: {_one_line(str(error))} on {where}, completion {_short(completion)}"
            ) from None
        number = as_number(value)
        if number is None:
            raise RewardFunctionError(
                f"reward function {name} returned {_short(value)} ({type(value).__name__}) for {where}, completion "
                f"{_short(completion)}; expected a finite number"
            )
        rewards.append(number)
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


@torch.no_grad()
def score_sequences(model: torch.nn.Module, sequences: Sequence[Sequence[int]], *, pad_id: int, batch_size: int) -> torch.Tensor:
    """`[N, k]` fp32 CPU scores of a k-output reward (or attribute) model for the token
    `sequences`, `batch_size` right-padded sequences per forward pass, under no_grad in eval mode,
    read by the one reward readout (`reward_scores`)."""
    from stema.models.value_head import reward_scores

    device = next(model.parameters()).device
    scores = []
    with eval_mode(model):
        for start in range(0, len(sequences), batch_size):
            input_ids, attention_mask = right_padded(sequences[start : start + batch_size], pad_id)
            scores.append(reward_scores(model, input_ids.to(device), attention_mask.to(device)).cpu())  # [b, k]
    return torch.cat(scores)


class RewardModelScorer:
    """Scores prompt + response token sequences with a one-output sequence classifier (a `stema rm`
    checkpoint), `micro_batch_size` sequences per forward pass (`score_sequences`)."""

    def __init__(self, model: torch.nn.Module, *, micro_batch_size: int = 32, field: str = "reward.model"):
        num_labels = getattr(getattr(model, "config", None), "num_labels", None)
        if num_labels != 1:
            raise ConfigError(f"{field}: a reward model needs exactly one output; this one has {num_labels}")
        self.model = model
        self.micro_batch_size = micro_batch_size
        self.pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    def score(self, prompt_token_ids: Sequence[Sequence[int]], response_token_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """`[B]` fp32 CPU rewards of the sequences prompt_i + response_i."""
        sequences = [list(prompt) + list(response) for prompt, response in zip(prompt_token_ids, response_token_ids)]
        return score_sequences(self.model, sequences, pad_id=self.pad_id, batch_size=self.micro_batch_size)[:, 0]


LOG_RATIO_FILE = "stema_reward.json"  # in a log-ratio reward model's folder: {"readout", "beta", "reference"}
LOG_RATIO_REFERENCE = "reference"  # the reference's folder inside a log-ratio reward model's folder


class LogRatioScorer:
    """Scores prompt + response token sequences by the log-ratio readout beta * sum over the
    response tokens of (log pi - log pi_ref), `micro_batch_size` sequences per forward pass of each
    model (no_grad, eval mode)."""

    def __init__(self, policy: torch.nn.Module, reference: torch.nn.Module, *, beta: float, micro_batch_size: int = 32):
        self.policy, self.reference, self.beta = policy, reference, beta
        self.micro_batch_size = micro_batch_size
        self.pad_id = policy.config.pad_token_id if policy.config.pad_token_id is not None else 0

    @classmethod
    def load(cls, folder: Path, *, dtype: str, device: torch.device, cache_dir: str | Path, micro_batch_size: int,
             field: str) -> LogRatioScorer:
        import json

        from stema.models.loading import load_policy

        settings = json.loads((folder / LOG_RATIO_FILE).read_text())
        if settings.get("readout") != "log_ratio" or not isinstance(settings.get("beta"), (int, float)):
            raise ConfigError(f"{field}: {folder / LOG_RATIO_FILE} must name readout 'log_ratio' and a number beta; it holds {settings}")
        models = []
        for path in (folder, folder / settings.get("reference", LOG_RATIO_REFERENCE)):
            model, _ = load_policy(ModelConfig(path=str(path), dtype=dtype), cache_dir=cache_dir)
            models.append(model.to(device).eval().requires_grad_(False))
        return cls(*models, beta=float(settings["beta"]), micro_batch_size=micro_batch_size)

    def score(self, prompt_token_ids: Sequence[Sequence[int]], response_token_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """`[B]` fp32 CPU rewards of the responses to the prompts."""
        from stema.data.collate import collate_sft
        from stema.data.tokenize import IGNORE_INDEX, TokenizedSFT
        from stema.training.logprobs import batched_sequence_logprobs, completion_token_logprobs

        examples = [TokenizedSFT(list(prompt) + list(response), [IGNORE_INDEX] * len(prompt) + list(response), f"row {row}")
                    for row, (prompt, response) in enumerate(zip(prompt_token_ids, response_token_ids))]
        device = next(self.policy.parameters()).device
        batches = [{key: value.to(device) for key, value in collate_sft(examples[start : start + self.micro_batch_size], self.pad_id).items()}
                   for start in range(0, len(examples), self.micro_batch_size)]
        logps = []
        for model in (self.policy, self.reference):
            with eval_mode(model):
                logps.append(torch.cat(batched_sequence_logprobs(
                    model, batches, average=False, token_logprobs=lambda batch, model=model: completion_token_logprobs(model, batch))))
        return (self.beta * (logps[0] - logps[1])).float().cpu()


def check_trained_reward_model(folder: Path, *, field: str) -> None:
    """ConfigError when `folder` holds no trained reward head (a causal LM's export): loaded as a
    reward model its head would start random and score noise."""
    from transformers import AutoConfig

    from stema.models.loading import is_sequence_classifier

    if not (folder / "config.json").is_file():
        return  # the loader names a missing folder or config
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if not is_sequence_classifier(config):
        raise ConfigError(
            f"{field}: {folder} holds {', '.join(config.architectures or []) or 'a model'} with no trained reward head (it would start "
            f"random and score noise); give a `stema rm` export (a sequence classifier, or with reward.readout=log_ratio a "
            f"causal LM with {LOG_RATIO_FILE} beside it)"
        )


def check_reward_functions(reward: RewardSourceConfig, *, prefix: str = "reward.") -> None:
    """Import every reward function `reward` names, so that a bad `module:function` (or one that
    cannot take (prompt, completion)) is a ConfigError at start-up, before any model loads."""
    for name in ("function", "eval_function"):
        spec = getattr(reward, name)
        if spec:
            load_reward_function(spec, field=f"{prefix}{name}")


class Reward:
    """Sequence rewards from a reward function or a trained reward model (exactly one), and an
    optional separate function for held-out evaluation."""

    def __init__(self, *, function: RewardFunction | None = None, function_name: str = "", scorer: RewardModelScorer | LogRatioScorer | None = None,
                 eval_function: RewardFunction | None = None, eval_function_name: str = ""):
        if (function is None) == (scorer is None):
            raise ValueError("Reward: give exactly one of a reward function and a reward-model scorer")
        self.function, self.function_name = function, function_name
        self.scorer = scorer
        self.eval_function, self.eval_function_name = eval_function, eval_function_name

    @classmethod
    def from_config(cls, reward: RewardSourceConfig, *, dtype: str, device: torch.device, cache_dir: str | Path,
                    folder: str | None = None, prefix: str = "reward.") -> Reward:
        """The reward `reward` names: its functions (imported from `folder`, default the current
        folder, first), or its model loaded in `dtype` on `device` (frozen, eval mode)."""
        eval_function = (load_reward_function(reward.eval_function, field=f"{prefix}eval_function", folder=folder)
                         if reward.eval_function else None)
        if reward.function:
            function = load_reward_function(reward.function, field=f"{prefix}function", folder=folder)
            return cls(function=function, function_name=reward.function, eval_function=eval_function,
                       eval_function_name=reward.eval_function)
        if (Path(reward.model) / LOG_RATIO_FILE).is_file():
            scorer = LogRatioScorer.load(Path(reward.model), dtype=dtype, device=device, cache_dir=cache_dir,
                                         micro_batch_size=reward.micro_batch_size, field=f"{prefix}model")
            return cls(scorer=scorer, eval_function=eval_function, eval_function_name=reward.eval_function)
        check_trained_reward_model(Path(reward.model), field=f"{prefix}model")
        from stema.models.loading import load_reward_model

        model, _ = load_reward_model(ModelConfig(path=reward.model, dtype=dtype), num_labels=1, cache_dir=cache_dir)
        model.to(device).eval().requires_grad_(False)
        scorer = RewardModelScorer(model, micro_batch_size=reward.micro_batch_size, field=f"{prefix}model")
        return cls(scorer=scorer, eval_function=eval_function, eval_function_name=reward.eval_function)

    def score(self, prompts: Sequence[Any], texts: Sequence[str], prompt_token_ids: Sequence[Sequence[int]],
              response_token_ids: Sequence[Sequence[int]], *, evaluation: bool = False, locations: Sequence[str] = ()) -> torch.Tensor:
        """`[B]` fp32 rewards of the responses (texts for a function, prompt + response token ids
        for a model); with `evaluation`, by the evaluation function when there is one. `locations`
        (the prompts' data locations) name a prompt whose reward fails."""
        if evaluation and self.eval_function is not None:
            return score_with_function(self.eval_function, prompts, texts, name=self.eval_function_name, locations=locations)
        if self.function is not None:
            return score_with_function(self.function, prompts, texts, name=self.function_name, locations=locations)
        return self.scorer.score(prompt_token_ids, response_token_ids)
