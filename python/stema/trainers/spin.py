"""SPIN: self-play fine-tuning (Chen et al. 2024, https://arxiv.org/abs/2401.01335; NeMo-Aligner's SPIN).

1. Load the policy (optionally with LoRA) and tokenizer; read the SFT data (prompt + ground-truth
   completion; the prompt is everything before the first trained token) and the held-out data.
2. Build the rollout engine once, from the policy's weights before the policy is sharded under
   torchrun (FSDP2 data parallel), with room for the longest prompt plus `sampling.max_new_tokens`
   (`sampling.backend` through `stema.rollout.build_generator`; for a family the engine does not
   serve it falls back to transformers' generate on the policy itself, in one process only; its
   refit copies nothing).
3. Iteration t = 1..`spin.iterations`:
   a. refit the engine with the current (gathered) weights and generate one response per training
      prompt (`sampling`; the model's own answer). The prompts go in blocks of
      `sampling.batch_size`, block b to data-parallel rank b mod N (`stema.distributed.blocks`),
      the block starting at prompt i sampled with seed `sampling.seed` + t + i; the ranks gather
      all generations, so every world size generates the same;
   b. pairs: chosen = the ground truth, rejected = the generation (a pair whose generation equals
      the ground truth token for token carries no gradient and is left out);
   c. reference = the model as it is now, i.e. the previous iteration: its sequence log-probs of
      both completions are computed once here (no_grad; no copy of the weights is kept);
   d. train on the pairs with the DPO-family loss of `preference` (default `dpo`, the SPIN loss
      with the logistic loss; `sft_loss_weight` adds the ground truth's NLL) through the DPO
      trainer's algorithm on the shared loop (`trainer.max_steps` or `epochs` per iteration, a
      fresh optimizer, checkpoints and metrics in `<output_dir>/iteration_<t>`; data parallel as
      `stema dpo` under torchrun);
   e. evaluate on the held-out data: mean ground-truth log-likelihood (summed over completion
      tokens; every rank runs all of it through the sharded model) and exact match of the greedy
      generation with the ground truth (blocks spread over the ranks as in a).
4. Rank 0 writes `<output_dir>/spin_summary.json` (the held-out numbers before and after each iteration),
   the iterations' training records in one `<output_dir>/metrics.jsonl` (steps counted from the
   start, tagged with the iteration), and export the final policy in Hugging Face format.

`trainer.resume` continues a stopped run: every iteration runs again from step a, and its
training (step d) continues from the newest checkpoint in its folder, so a finished iteration only
reloads its final weights (its generations and reference log-probs are recomputed: they are
deterministic, seeded by `sampling.seed` + t) and an unfinished one continues where it stopped.

Departure from the paper: the iterations train on the same prompts (the paper adds the previous
iteration's synthetic data to the next).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import torch

from stema.config import SPINConfig
from stema.data import TokenizedPair, TokenizedSFT, collate_sft, load_sft_data
from stema.data.tokenize import IGNORE_INDEX
from stema.distributed import World, close_world
from stema.distributed.blocks import spread_blocks
from stema.losses import uses_reference
from stema.models.loading import eval_mode, load_policy
from stema.rollout import build_generator
from stema.rollout.factory import close_generator, sampling_params
from stema.training.logprobs import ReferenceModel, completion_token_logprobs, sequence_logprobs
from stema.training.logging import read_metrics
from stema.training.loop import autocast_context, to_device
from stema.training.setup import export_model, fit, place_model, prepare_data, preparing, start_run
from stema.trainers.dpo import DPOAlgorithm, precompute_reference_logprobs


def prompt_length(example: TokenizedSFT) -> int:
    """Tokens before the first trained one: the prompt of an SFT example."""
    return next(index for index, label in enumerate(example.labels) if label != IGNORE_INDEX)


def spin_pairs(examples: Sequence[TokenizedSFT], generations: Sequence[Sequence[int]]) -> list[TokenizedPair]:
    """Step 3b: (ground truth chosen, generation rejected) pairs; pairs with identical completions are left out."""
    pairs = []
    for example, generated in zip(examples, generations):
        length = prompt_length(example)
        prompt, truth = example.input_ids[:length], example.input_ids[length:]
        if list(generated) == truth:
            continue
        pairs.append(TokenizedPair(
            prompt_ids=prompt,
            chosen_ids=list(example.input_ids),
            rejected_ids=prompt + list(generated),
            chosen_labels=list(example.labels),
            rejected_labels=[IGNORE_INDEX] * length + list(generated),
            location=example.location,
        ))
    return pairs


def generate_spread(engine, prompts: Sequence[Sequence[int]], params, *, world: World, block_size: int) -> list[list[int]]:
    """Response tokens to each prompt, in prompt order, on every rank: blocks of `block_size`
    prompts spread over the data-parallel ranks, the block starting at prompt `first` sampled with
    seed `params.seed + first`, so any world size gives the one-process generations."""

    def work(first: int, block: Sequence[Sequence[int]]) -> list[list[int]]:
        return engine.generate([list(prompt) for prompt in block], params.for_block(first)).token_ids

    return spread_blocks(world, prompts, block_size=block_size, work=work)


@torch.no_grad()
def heldout_metrics(model, engine, examples: Sequence[TokenizedSFT], *, pad_id: int, batch_size: int, params, world: World,
                    block_size: int) -> dict[str, float]:
    """Step 3e: mean ground-truth log-likelihood (summed over completion tokens) and greedy exact
    match. Every rank scores all `examples` (a sharded model's forward is a collective)."""
    device = next(model.parameters()).device
    total_logprob = 0.0
    with eval_mode(model):
        for start in range(0, len(examples), batch_size):
            batch = to_device(collate_sft(examples[start : start + batch_size], pad_id), device)
            total_logprob += float(sequence_logprobs(*completion_token_logprobs(model, batch)).sum())
    lengths = [prompt_length(example) for example in examples]
    generated = generate_spread(engine, [example.input_ids[:length] for example, length in zip(examples, lengths)], params,
                                world=world, block_size=block_size)
    matches = sum(list(tokens) == example.input_ids[length:] for tokens, example, length in zip(generated, examples, lengths))
    return {"gt_logprob": total_logprob / len(examples), "exact_match": matches / len(examples)}


def append_iteration_metrics(output_dir: Path, iteration_dir: str | Path, *, iteration: int, step_offset: int) -> None:
    """Append an iteration's training records to `<output_dir>/metrics.jsonl`, steps counted from
    the run's start and each record tagged with its iteration: one loss curve for the whole run."""
    with open(Path(output_dir) / "metrics.jsonl", "a", encoding="utf-8") as file:
        for record in read_metrics(Path(iteration_dir), "train"):
            file.write(json.dumps({**record, "step": record["step"] + step_offset, "iteration": iteration}) + "\n")


def run(config: SPINConfig) -> dict:
    run_info = start_run(config, command="spin", data_kind="sft")
    world = run_info.world
    if world.is_main:
        (run_info.output_dir / "metrics.jsonl").unlink(missing_ok=True)  # rebuilt from the iterations' records
    with preparing(run_info):
        _, train_examples, eval_examples = prepare_data(run_info, config, load_sft_data)
        model, tokenizer = load_policy(config.model, cache_dir=run_info.cache_dir)
        model.to(run_info.device)
    prompts = [example.input_ids[: prompt_length(example)] for example in train_examples]

    longest = max(len(prompt) for prompt in prompts + [example.input_ids for example in eval_examples or []])
    # Built from the whole model, before it is sharded; refitted from the shards.
    engine = build_generator(model, config.sampling, max_batch=config.sampling.batch_size,
                             max_total_len=longest + config.sampling.max_new_tokens, world=world, say=run_info.say,
                             field="sampling.backend")
    try:
        model = place_model(run_info, config, model)
        refitter = engine.refitter(model, world=world)
        greedy = sampling_params(config.sampling, greedy=True)
        measure = dict(pad_id=tokenizer.pad_token_id, batch_size=config.trainer.micro_batch_size, params=greedy, world=world,
                       block_size=config.sampling.batch_size)
        history = []
        if eval_examples:
            with world.failures_named():
                history.append({"iteration": 0, **heldout_metrics(model, engine, eval_examples, **measure)})
            run_info.say(f"held-out before SPIN: {history[-1]}")

        preference = config.preference
        steps_done = 0
        for iteration in range(1, config.spin.iterations + 1):
            with world.failures_named():
                refitter.refit()
                params = dataclasses.replace(sampling_params(config.sampling), seed=config.sampling.seed + iteration)
                generations = generate_spread(engine, prompts, params, world=world, block_size=config.sampling.batch_size)
            pairs = spin_pairs(train_examples, generations)
            run_info.say(f"iteration {iteration}: {len(pairs)} pairs ({len(prompts) - len(pairs)} generations equal the ground truth)")
            if len(pairs) < config.trainer.global_batch_size:
                run_info.say(f"iteration {iteration}: fewer pairs than one global batch; SPIN stops here")
                break
            examples: list = pairs
            if uses_reference(preference.loss):
                model.eval()
                with world.failures_named():
                    examples = precompute_reference_logprobs(
                        ReferenceModel(model, adapters_disabled=False), pairs, pad_id=tokenizer.pad_token_id,
                        batch_size=config.trainer.micro_batch_size, average=preference.average_logprobs,
                        autocast=lambda: autocast_context(config.trainer, run_info.device),
                    )
                model.train()
            algorithm = DPOAlgorithm(pad_id=tokenizer.pad_token_id, preference=preference, reference=None, micro_batch_size=config.trainer.micro_batch_size)
            trainer = dataclasses.replace(
                config.trainer, output_dir=str(run_info.output_dir / f"iteration_{iteration}"),
                export_hf=False, seed=config.trainer.seed + iteration,
            )
            result = fit(run_info, dataclasses.replace(config, trainer=trainer), model=model, tokenizer=tokenizer, algorithm=algorithm,
                         train_examples=examples, eval_examples=None, close=False)
            if result.resumed_from is not None:
                run_info.say(f"iteration {iteration}: resumed from its checkpoint at step {result.resumed_from}")
            if world.is_main:
                append_iteration_metrics(run_info.output_dir, trainer.output_dir, iteration=iteration, step_offset=steps_done)
            steps_done += result.step
            if eval_examples:
                with world.failures_named():
                    refitter.refit()
                    history.append({"iteration": iteration, "pairs": len(pairs), **heldout_metrics(model, engine, eval_examples, **measure)})
                run_info.say(f"held-out after iteration {iteration}: {history[-1]}")
        with world.failures_named():
            export_model(run_info, config, model, tokenizer)
        close_world(world)
    finally:
        close_generator(engine)
    summary = {"iterations": history}
    if world.is_main:
        (run_info.output_dir / "spin_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
