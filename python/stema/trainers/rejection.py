"""Rejection sampling (best-of-n then SFT; Touvron et al. 2023, Llama 2, https://arxiv.org/abs/2307.09288,
section 3.2.3; RAFT, Dong et al. 2023, https://arxiv.org/abs/2304.06767).

1. Load the policy (optionally with LoRA) and tokenizer; read the training prompts (and held-out
   prompts from data.eval, when given); prompts longer than data.max_length are dropped and counted.
2. Build the rollout engine from the policy's weights (before the policy is sharded under
   torchrun; `sampling.backend` through `stema.rollout.build_generator`, which for a family the engine does not serve falls back
   to transformers' generate on the policy itself, in one process only) and sample
   `rs.num_samples` responses per prompt (`sampling`: temperature, top-p, top-k). The rows
   (prompt p's samples are rows p*n .. p*n+n-1) go in blocks of `sampling.batch_size`, block b to
   data-parallel rank b mod N (`stema.distributed.blocks`); a block starting at row r samples with
   seed `sampling.seed` + r, so every world size samples the same responses.
3. Score every response, block by block on the rank that sampled it, by the `reward` section
   (`stema.rewards.Reward`, as PPO's reward role): the reward model `reward.model` (a one-output
   `stema rm` export, sharing the policy's tokenizer) on prompt + response tokens, or the reward
   function `reward.function` on the decoded text. The ranks gather all samples and rewards.
4. Keep each prompt's best response (the first on ties) among those that ended (EOS or a stop,
   not cut by max_new_tokens), when its reward is at least `rs.min_reward` (if set).
5. SFT on the winners, exactly as `stema sft` trains (completion tokens only; FSDP2 data parallel
   under torchrun): the example is the prompt tokens followed by the generated tokens as sampled
   (no re-tokenization of the text).
6. Greedy responses to the held-out prompts are scored before and after the SFT (the engine is
   refitted from the trained, possibly sharded, weights; the reward of greedy outputs is what
   rejection sampling should raise); the numbers go to the log and to
   `<output_dir>/rs_summary.json`, every sample with its reward and whether it won to
   `<output_dir>/rs_samples.jsonl` (rank 0 writes both). Export the policy in Hugging Face format.

Departures: one round of sampling (Llama 2 repeats the round with newer policies; run the command
again from the export to do the same).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from stema.config import RSConfig
from stema.data import TokenizedPrompt, TokenizedSFT, load_prompts
from stema.data.io import write_jsonl_atomic
from stema.data.tokenize import IGNORE_INDEX
from stema.distributed import World, close_world
from stema.distributed.blocks import spread_blocks
from stema.models.loading import load_policy
from stema.rewards import Reward, check_reward_functions
from stema.rollout import build_generator
from stema.rollout.factory import close_generator, sampling_params
from stema.training.setup import fit, place_model, prepare_data, preparing, start_run
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


@dataclass(frozen=True)
class ScoredSample:
    """One sampled response: its tokens, why it ended ("eos", "stop", "length") and its reward."""

    token_ids: list[int]
    finish_reason: str
    reward: float


def sample_and_score(engine, tokenizer, reward: Reward, prompts: Sequence[TokenizedPrompt], params, *, world: World,
                     block_size: int, evaluation: bool = False) -> list[ScoredSample]:
    """One scored response per prompt (steps 2-3), in prompt order, on every rank: blocks of
    `block_size` prompts spread over the data-parallel ranks, the block starting at prompt `first`
    sampled with seed `params.seed + first` and scored as one batch, so any world size gives the
    one-process samples. `evaluation` scores with the reward's evaluation function, when it has one."""

    def work(first: int, block: Sequence[TokenizedPrompt]) -> list[ScoredSample]:
        batch = engine.generate([item.input_ids for item in block], params.for_block(first),
                                tokenizer=tokenizer)
        rewards = reward.score([item.prompt for item in block], [sequence.text for sequence in batch.sequences],
                               [sequence.prompt_token_ids for sequence in batch.sequences], batch.token_ids,
                               evaluation=evaluation, locations=[item.location for item in block]).tolist()  # [len(block)]
        return [ScoredSample(sequence.token_ids, sequence.finish_reason, value) for sequence, value in zip(batch.sequences, rewards)]

    return spread_blocks(world, prompts, block_size=block_size, work=work)


def sample_rows(samples: Sequence[ScoredSample], winners: Sequence[int | None], tokenizer, *, n: int) -> list[dict]:
    """`rs_samples.jsonl` rows: per sample its prompt index, sample index, decoded response,
    reward, whether it finished (EOS or stop) and whether it is its prompt's winner."""
    return [
        {
            "prompt": row // n, "sample": row % n,
            "response": tokenizer.decode(sample.token_ids, skip_special_tokens=True),
            "reward": sample.reward, "finished": sample.finish_reason != "length", "winner": winners[row // n] == row % n,
        }
        for row, sample in enumerate(samples)
    ]


def greedy_reward(engine, tokenizer, items: Sequence[TokenizedPrompt], reward: Reward, sampling_cfg, *, world: World) -> float:
    """Mean reward (by `reward.eval_function` when set) of the greedy responses to the tokenized
    prompts `items` (step 6)."""
    samples = sample_and_score(engine, tokenizer, reward, items, sampling_params(sampling_cfg, greedy=True), world=world,
                               block_size=sampling_cfg.batch_size, evaluation=True)
    return sum(sample.reward for sample in samples) / len(samples)


def run(config: RSConfig) -> RSSummary:
    check_reward_functions(config.reward)  # a bad module:function stops the run before anything loads
    run_info = start_run(config, command="rs", data_kind="prompt")
    world = run_info.world
    with preparing(run_info):
        _, train_prompts, eval_items = prepare_data(run_info, config, load_prompts)
        model, tokenizer = load_policy(config.model, cache_dir=run_info.cache_dir)
        model.to(run_info.device)
    prompts = [item.prompt for item in train_prompts]
    eval_prompts = eval_items or []
    n = config.rs.num_samples
    repeated = [item for item in train_prompts for _ in range(n)]  # prompt p's samples at rows p*n .. p*n+n-1
    longest = max(len(item.input_ids) for item in train_prompts + eval_prompts)
    # Built from the whole model, before it is sharded; refitted from the shards after the SFT.
    engine = build_generator(model, config.sampling, max_batch=min(config.sampling.batch_size, len(repeated)),
                             max_total_len=longest + config.sampling.max_new_tokens, world=world, say=run_info.say,
                             field="sampling.backend")
    try:
        model = place_model(run_info, config, model)
        refitter = engine.refitter(model, world=world)
        reward = Reward.from_config(config.reward, dtype=config.model.dtype, device=run_info.device, cache_dir=run_info.cache_dir)
        with world.failures_named():
            before = greedy_reward(engine, tokenizer, eval_prompts, reward, config.sampling, world=world) if eval_prompts else None
            samples = sample_and_score(engine, tokenizer, reward, repeated, sampling_params(config.sampling), world=world,
                                       block_size=config.sampling.batch_size)
        rewards = torch.tensor([sample.reward for sample in samples]).view(len(prompts), n)  # [P, n]
        finished = torch.tensor([sample.finish_reason != "length" for sample in samples]).view(len(prompts), n)
        winners = best_of_n(rewards, finished, min_reward=config.rs.min_reward)

        examples = []
        winner_rewards = []
        for index, (item, choice) in enumerate(zip(train_prompts, winners)):
            if choice is None:
                continue
            ids, response = item.input_ids, samples[index * n + choice].token_ids
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
        result = fit(run_info, config, model=model, tokenizer=tokenizer, algorithm=algorithm, train_examples=examples,
                     eval_examples=None, close=False)
        after = None
        if eval_prompts:
            with world.failures_named():
                refitter.refit()
                after = greedy_reward(engine, tokenizer, eval_prompts, reward, config.sampling, world=world)
        close_world(world)
    finally:
        close_generator(engine)
    summary = RSSummary(
        prompts=len(prompts), samples_per_prompt=n, winners=len(examples), mean_sample_reward=float(rewards.mean()),
        mean_winner_reward=sum(winner_rewards) / max(1, len(winner_rewards)),
        greedy_reward_before=before, greedy_reward_after=after, steps=result.step,
    )
    if world.is_main:
        (run_info.output_dir / "rs_summary.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")
        write_jsonl_atomic(run_info.output_dir / "rs_samples.jsonl", sample_rows(samples, winners, tokenizer, n=n))
    if eval_prompts:
        run_info.say(f"greedy held-out reward: {before:.4f} before, {after:.4f} after")
    return summary
