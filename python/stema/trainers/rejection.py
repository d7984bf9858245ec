"""Rejection sampling (best-of-n then SFT; Touvron et al. 2023, Llama 2, https://arxiv.org/abs/2307.09288,
section 3.2.3; RAFT, Dong et al. 2023, https://arxiv.org/abs/2304.06767).

1. Load the policy (optionally with LoRA) and tokenizer; read the training prompts (and held-out
   prompts from data.eval, when given); prompts longer than data.max_length are dropped and counted.
2. Put the policy's weights into the rollout engine and sample `rs.num_samples` responses per
   prompt (`sampling`: temperature, top-p, top-k, seeded).
3. Score every response: the reward model `rs.reward_model` (a one-output `stema rm` export,
   sharing the policy's tokenizer) on prompt + response tokens, or else the reward function
   `rs.reward_function` on the decoded text.
4. Keep each prompt's best response (the first on ties) among those that ended (EOS or a stop,
   not cut by max_new_tokens), when its reward is at least `rs.min_reward` (if set).
5. SFT on the winners, exactly as `stema sft` trains (completion tokens only): the example is the
   prompt tokens followed by the generated tokens as sampled (no re-tokenization of the text).
6. Greedy responses to the held-out prompts are scored before and after the SFT (the reward of
   greedy outputs is what rejection sampling should raise); the numbers go to the log and to
   `<output_dir>/rs_summary.json`. Export the policy in Hugging Face format.

Departures: one round of sampling (Llama 2 repeats the round with newer policies; run the command
again from the export to do the same).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

from stema.config import ConfigError, ModelConfig, RSConfig
from stema.data import TokenizedPrompt, TokenizedSFT, load_prompts
from stema.data.tokenize import IGNORE_INDEX
from stema.generation import generate
from stema.models.loading import load_policy, load_reward_model
from stema.rewards import RewardModelScorer, load_reward_function, score_with_function
from stema.training.setup import Run, fit, load_splits, start_run
from stema.trainers.sft import SFTAlgorithm


@dataclass
class RSSummary:
    """What a rejection-sampling run did: winners kept, their mean reward, greedy held-out reward."""

    prompts: int
    samples_per_prompt: int
    winners: int
    mean_sample_reward: float
    mean_winner_reward: float
    greedy_reward_before: float | None
    greedy_reward_after: float | None
    steps: int


class Scorer:
    """Rewards `[B]` of (prompt, response) pairs from a reward model or a reward function (step 3)."""

    def __init__(self, config: RSConfig, *, run: Run, micro_batch_size: int):
        self.model = None
        self.function = None
        if config.rs.reward_model:
            model, _ = load_reward_model(ModelConfig(path=config.rs.reward_model, dtype=config.model.dtype), num_labels=1, cache_dir=run.cache_dir)
            self.model = RewardModelScorer(model.to(run.device), micro_batch_size=micro_batch_size)
        else:
            self.function = load_reward_function(config.rs.reward_function, field="rs.reward_function")

    def score(self, prompts: Sequence[Any], batch) -> torch.Tensor:
        """`[B]` fp32 rewards of `batch` (a RolloutBatch) answering `prompts` (one per sequence)."""
        if self.model is not None:
            return self.model.score([sequence.prompt_token_ids for sequence in batch.sequences], batch.token_ids)
        return score_with_function(self.function, prompts, [sequence.text for sequence in batch.sequences])


def best_of_n(rewards: torch.Tensor, finished: torch.Tensor, *, min_reward: float | None) -> list[int | None]:
    """Per prompt, the index (0..n-1) of its best finished sample, or None when none finished or the
    best is below `min_reward`. rewards, finished `[P, n]`; ties go to the first sample."""
    masked = rewards.masked_fill(~finished, float("-inf"))  # [P, n]
    best_reward, best_index = masked.max(dim=1)  # [P], [P]: max returns the first maximum
    winners: list[int | None] = []
    for reward, index in zip(best_reward.tolist(), best_index.tolist()):
        keep = reward != float("-inf") and (min_reward is None or reward >= min_reward)
        winners.append(index if keep else None)
    return winners


def greedy_reward(model, tokenizer, items: Sequence[TokenizedPrompt], scorer: Scorer, sampling_cfg) -> float:
    """Mean reward of the greedy responses to the tokenized prompts `items` (step 6)."""
    batch = generate(model, tokenizer, [item.input_ids for item in items], sampling_cfg, greedy=True)
    return float(scorer.score([item.prompt for item in items], batch).mean())


def run(config: RSConfig) -> RSSummary:
    run_info = start_run(config, command="rs")
    if run_info.world.distributed:
        raise ConfigError(f"stema rs runs in one process (it samples with the rollout engine), not under torchrun with {run_info.world.world_size} processes")
    model, tokenizer = load_policy(config.model, cache_dir=run_info.cache_dir)
    model.to(run_info.device)
    train_prompts, eval_items = load_splits(run_info, config.data, tokenizer, load_prompts)
    prompts = [item.prompt for item in train_prompts]
    eval_prompts = eval_items or []
    scorer = Scorer(config, run=run_info, micro_batch_size=config.trainer.micro_batch_size)
    before = greedy_reward(model, tokenizer, eval_prompts, scorer, config.sampling) if eval_prompts else None

    n = config.rs.num_samples
    prompt_ids = [item.input_ids for item in train_prompts]
    repeated = [ids for ids in prompt_ids for _ in range(n)]  # prompt p's samples at rows p*n .. p*n+n-1
    batch = generate(model, tokenizer, repeated, config.sampling)
    rewards = scorer.score([prompt for prompt in prompts for _ in range(n)], batch).view(len(prompts), n)  # [P, n]
    finished = torch.tensor([reason != "length" for reason in batch.finish_reasons]).view(len(prompts), n)
    winners = best_of_n(rewards, finished, min_reward=config.rs.min_reward)

    examples = []
    winner_rewards = []
    for index, (ids, choice) in enumerate(zip(prompt_ids, winners)):
        if choice is None:
            continue
        response = batch.sequences[index * n + choice].token_ids
        examples.append(TokenizedSFT(ids + response, [IGNORE_INDEX] * len(ids) + response, f"prompt {index}, sample {choice}"))
        winner_rewards.append(float(rewards[index, choice]))
    run_info.say(
        f"{len(examples)} of {len(prompts)} prompts have a winner (best of {n}); mean sample reward "
        f"{float(rewards.mean()):.4f}, mean winner reward {sum(winner_rewards) / max(1, len(winner_rewards)):.4f}"
    )
    if len(examples) < config.trainer.global_batch_size:
        raise ValueError(
            f"rejection sampling kept {len(examples)} winners, fewer than one global batch ({config.trainer.global_batch_size}): "
            "sample more prompts or responses (rs.num_samples), or lower rs.min_reward"
        )

    algorithm = SFTAlgorithm(
        pad_id=tokenizer.pad_token_id, packing=False, max_length=config.data.max_length,
        micro_batch_size=config.trainer.micro_batch_size, attn_implementation=config.model.attn_implementation,
    )
    result = fit(run_info, config, model=model, tokenizer=tokenizer, algorithm=algorithm, train_examples=examples, eval_examples=None)
    after = greedy_reward(model, tokenizer, eval_prompts, scorer, config.sampling) if eval_prompts else None
    summary = RSSummary(
        prompts=len(prompts), samples_per_prompt=n, winners=len(examples), mean_sample_reward=float(rewards.mean()),
        mean_winner_reward=sum(winner_rewards) / max(1, len(winner_rewards)),
        greedy_reward_before=before, greedy_reward_after=after, steps=result.step,
    )
    (run_info.output_dir / "rs_summary.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")
    if eval_prompts:
        run_info.say(f"greedy held-out reward: {before:.4f} before, {after:.4f} after")
    return summary
