"""Direct preference optimization and its family: DPO (and cDPO), IPO, NeMo-Aligner's reward-aware
RPO losses, and reference-free SimPO.

1. Load the policy (optionally with LoRA) and tokenizer; read, validate and tokenize the preference
   pairs (TRL's explicit- or implicit-prompt format, or NeMo-Aligner's), labels -100 on the prompt.
2. Reference model: a frozen copy of the starting policy; with LoRA, the policy itself with its
   adapters disabled (no second copy); none for a reference-free loss (SimPO). With
   `preference.precompute_ref_logprobs` the reference runs once over the training and evaluation
   pairs (batched, no gradients), its sequence log-probs are kept with the pairs, and the
   reference is freed before training starts.
3. Each micro-batch: the chosen and rejected sequences run in ONE forward pass of the concatenated
   `[2B, T]` batch (chosen rows first); per-sequence log-probs of the completion tokens (summed, or
   averaged with `average_logprobs`) come from the fused kernel with the LM head applied at the
   completion positions only; the reference's the same way under no_grad (unless precomputed);
   loss = `stema.losses.preference_loss(preference.loss, ...)`: the per-pair losses summed and
   divided by the pairs of the whole global batch, plus `sft_loss_weight` x the chosen NLL.
4. The shared loop steps, evaluates (loss, reward accuracy and margins on held-out pairs),
   checkpoints and resumes exactly (the reference is rebuilt from the starting weights, or its
   log-probs recomputed, on resume).
5. Export the policy in Hugging Face format with its tokenizer.

Departures from TRL's DPOTrainer: dropout is left as the model configures it (TRL turns it off;
the built-in and common HF causal LMs have none); IPO uses the log-probs as configured (TRL's "ipo"
always averages over tokens: set `average_logprobs=true` for TRL's IPO); label smoothing is cDPO's
(TRL 1.x's "sigmoid" has none).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from stema.config import DPOConfig, PreferenceConfig
from stema.data import TokenizedPair, collate_pairs, load_preference_data
from stema.losses import preference_loss, preference_loss_options, uses_reference
from stema.models.loading import load_policy
from stema.training import TrainResult
from stema.training.logprobs import (
    ReferenceModel, batched_sequence_logprobs, completion_token_logprobs, logits_token_logprobs, sequence_logprobs,
)
from stema.training.loop import autocast_context, evaluate_sums, to_device
from stema.training.setup import fit, place_model, prepare_data, preparing, start_run


@dataclass(frozen=True)
class ReferencedPair:
    """A preference pair with the reference model's sequence log-probs of its two completions."""

    pair: TokenizedPair
    ref_chosen_logps: float
    ref_rejected_logps: float


def precompute_reference_logprobs(
    reference: ReferenceModel,
    pairs: Sequence[TokenizedPair],
    *,
    pad_id: int,
    batch_size: int,
    average: bool,
    autocast: Callable,
) -> list[ReferencedPair]:
    """Each pair with the reference's sequence log-probs of its chosen and rejected completions,
    from batched no-grad forward passes of `batch_size` pairs (`[2 * batch_size, T]` rows); a
    reference on pipeline stages runs them through its stages (every rank gets all the values)."""
    device = next(reference.model.parameters()).device
    chunks = [pairs[start : start + batch_size] for start in range(0, len(pairs), batch_size)]
    batches = [to_device(collate_pairs(chunk, pad_id), device) for chunk in chunks]
    with autocast():
        logps = batched_sequence_logprobs(reference.model, batches, average=average, token_logprobs=reference.token_logprobs)  # [2B] each
    referenced = []
    for chunk, chunk_logps in zip(chunks, logps):
        chosen, rejected = chunk_logps.float().cpu().split(len(chunk))
        referenced.extend(ReferencedPair(pair, float(c), float(r)) for pair, c, r in zip(chunk, chosen, rejected))
    return referenced


class DPOAlgorithm:
    """The DPO family on the shared loop (see the module docstring)."""

    name = "dpo"

    def __init__(self, *, pad_id: int, preference: PreferenceConfig, reference: ReferenceModel | None, micro_batch_size: int):
        self.pad_id = pad_id
        self.preference = preference
        self.reference = reference
        self.micro_batch_size = micro_batch_size
        self.options = preference_loss_options(preference.loss)

    def denominators(self, examples):
        return {"pairs": len(examples)}

    def collate(self, examples):
        """`collate_pairs`' `[2B, T]` batch, with chosen_reward / rejected_reward `[B]` (the
        configured defaults where the data has none) and, when precomputed, ref_chosen_logps /
        ref_rejected_logps `[B]`."""
        pairs = [example.pair if isinstance(example, ReferencedPair) else example for example in examples]
        batch = collate_pairs(pairs, self.pad_id)
        defaults = {"chosen_reward": self.preference.default_chosen_reward, "rejected_reward": self.preference.default_rejected_reward}
        for name, default in defaults.items():
            if name not in batch:
                batch[name] = torch.full((len(pairs),), default)
        if isinstance(examples[0], ReferencedPair):
            batch["ref_chosen_logps"] = torch.tensor([example.ref_chosen_logps for example in examples])
            batch["ref_rejected_logps"] = torch.tensor([example.ref_rejected_logps for example in examples])
        return batch

    def reference_logps(self, batch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(chosen, rejected) `[B]` reference log-probs: precomputed, from the live reference, or None."""
        if "ref_chosen_logps" in batch:
            return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        if self.reference is None:
            return None, None
        logps = sequence_logprobs(*self.reference.token_logprobs(batch), average=self.preference.average_logprobs)
        return logps.chunk(2)

    def loss(self, model, batch, denominators):
        return self.loss_of_token_logprobs(*completion_token_logprobs(model, batch), batch, denominators)

    def loss_from_logits(self, logits, batch, denominators):
        return self.loss_of_token_logprobs(*logits_token_logprobs(logits, batch), batch, denominators)

    def loss_of_token_logprobs(self, token_logprobs, mask, batch, denominators):
        """The loss from the policy's token log-probs and mask `[2B, T]` (chosen rows, then rejected)."""
        policy_chosen, policy_rejected = sequence_logprobs(token_logprobs, mask, average=self.preference.average_logprobs).chunk(2)
        ref_chosen, ref_rejected = self.reference_logps(batch)
        available = {
            "label_smoothing": self.preference.label_smoothing,
            "gt_reward_scale": self.preference.gt_reward_scale,
            "simpo_gamma": self.preference.simpo_gamma,
            "chosen_rewards": batch["chosen_reward"],
            "rejected_rewards": batch["rejected_reward"],
        }
        return preference_loss(
            self.preference.loss,
            policy_chosen_logps=policy_chosen,
            policy_rejected_logps=policy_rejected,
            ref_chosen_logps=ref_chosen,
            ref_rejected_logps=ref_rejected,
            beta=self.preference.beta,
            num_pairs=denominators["pairs"],
            sft_loss_weight=self.preference.sft_loss_weight,
            **{name: available[name] for name in self.options},
        )

    def num_tokens(self, batch):
        return int(batch["attention_mask"].sum())

    def evaluate(self, model, examples):
        return evaluate_sums(model, self, examples, micro_batch_size=self.micro_batch_size)


def run(config: DPOConfig) -> TrainResult:
    return train_on_pairs(config, preference=config.preference)


def train_on_pairs(config, *, preference: PreferenceConfig, command: str = "dpo", algorithm_class: type = DPOAlgorithm,
                   finish: Callable | None = None) -> TrainResult:
    """Steps 1-5 on `config`'s model, data, optim, trainer and distributed sections with the loss
    `preference`, as `command`; `finish(run_info)` (when given) runs after the export, before the
    process group is left (the reward model of `stema rm reward.readout=log_ratio` adds its reference)."""
    from stema.distributed import close_world

    run_info = start_run(config, command=command, data_kind="preference")
    with preparing(run_info):
        _, train_examples, eval_examples = prepare_data(run_info, config, load_preference_data)
        model, tokenizer = load_policy(config.model, cache_dir=run_info.cache_dir)
        reference = ReferenceModel.of(model) if uses_reference(preference.loss) else None
        if reference is not None and not reference.adapters_disabled:
            reference.model = place_model(run_info, config, reference.model)
        model = place_model(run_info, config, model)

    if reference is not None and preference.precompute_ref_logprobs:
        precompute = dict(
            pad_id=tokenizer.pad_token_id,
            batch_size=config.trainer.micro_batch_size,
            average=preference.average_logprobs,
            autocast=lambda: autocast_context(config.trainer, run_info.device),
        )
        train_examples = precompute_reference_logprobs(reference, train_examples, **precompute)
        if eval_examples:
            eval_examples = precompute_reference_logprobs(reference, eval_examples, **precompute)
        reference.release()
        reference = None
        run_info.say("reference log-probs precomputed for every pair; the reference model is freed")

    algorithm = algorithm_class(
        pad_id=tokenizer.pad_token_id,
        preference=preference,
        reference=reference,
        micro_batch_size=config.trainer.micro_batch_size,
    )
    result = fit(
        run_info, config, model=model, tokenizer=tokenizer, algorithm=algorithm,
        train_examples=train_examples, eval_examples=eval_examples, close=finish is None,
    )
    if finish is not None:
        with run_info.world.failures_named():
            finish(run_info)
        close_world(run_info.world)
    return result
