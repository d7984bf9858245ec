"""Kahneman-Tversky optimization (KTO, Ethayarajh et al. 2024, https://arxiv.org/abs/2402.01306) on
unpaired data: each example is a prompt, a completion and whether the completion is desirable.

1. Load the policy (optionally with LoRA) and tokenizer; read, validate and tokenize the
   (prompt, completion, label) examples, labels -100 on the prompt.
2. Reference model: a frozen copy of the starting policy, or with LoRA the policy with its
   adapters disabled.
3. Each global batch, before micro-batching: the KL baseline z0 = max(0, mean_i [log pi(y'_i|x_i)
   - log pi_ref(y'_i|x_i)]) over mismatched pairs (x_i, y'_i = y_{i-1}: the completions rotated by
   one within the batch), under no_grad. One z0 per global batch, so micro-batching does not
   change the loss.
4. Each micro-batch: sequence log-probs of the completions under the policy and the reference
   (LM head at completion positions only); loss = `kto` loss summed over the examples / examples
   in the global batch.
5. The shared loop steps, evaluates (z0 from the whole evaluation set), checkpoints, resumes;
   export in Hugging Face format.

Departures from TRL's KTOTrainer: TRL fixes the mismatched pairs when it prepares the dataset
(rotating within consecutive chunks of the unshuffled data) and estimates z0 per device
micro-batch; STEMA rotates within each (shuffled) global batch and estimates z0 once for it.
Reference log-probs are not precomputed for KTO (the mismatched pairs change with every batch).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from stema.config import KTOConfig, KTOLossConfig
from stema.data import TokenizedUnpaired, collate_unpaired, load_unpaired_data
from stema.data.tokenize import IGNORE_INDEX
from stema.losses import get_loss
from stema.models.loading import load_policy
from stema.training import TrainResult
from stema.training.logprobs import ReferenceModel, completion_token_logprobs, sequence_logprobs
from stema.training.loop import autocast_context, evaluate_sums, to_device
from stema.training.setup import fit, place_model, prepare_data, preparing, start_run


def _prompt_length(example: TokenizedUnpaired) -> int:
    """Tokens before the first trained (completion) token."""
    return next((index for index, label in enumerate(example.labels) if label != IGNORE_INDEX), len(example.labels))


def mismatched_examples(examples: Sequence[TokenizedUnpaired], *, max_length: int) -> list[TokenizedUnpaired]:
    """(x_i, y_{i-1}) for each i: every prompt with the previous example's completion (the last
    completion goes to the first prompt), cut to `max_length` tokens."""
    mismatched = []
    for index, example in enumerate(examples):
        donor = examples[index - 1]
        prompt_length, donor_prompt_length = _prompt_length(example), _prompt_length(donor)
        input_ids = example.input_ids[:prompt_length] + donor.input_ids[donor_prompt_length:]
        labels = [IGNORE_INDEX] * prompt_length + donor.labels[donor_prompt_length:]
        mismatched.append(TokenizedUnpaired(input_ids[:max_length], labels[:max_length], example.label, example.location))
    return mismatched


class KTOAlgorithm:
    """KTO on the shared loop (see the module docstring)."""

    name = "kto"

    def __init__(
        self,
        *,
        policy: torch.nn.Module,
        reference: ReferenceModel,
        pad_id: int,
        kto: KTOLossConfig,
        micro_batch_size: int,
        max_length: int,
        autocast: Callable,
    ):
        self.policy = policy
        self.reference = reference
        self.pad_id = pad_id
        self.kto = kto
        self.micro_batch_size = micro_batch_size
        self.max_length = max_length
        self.autocast = autocast
        self.loss_fn = get_loss("kto")

    @torch.no_grad()
    def kl_baseline(self, examples: Sequence[TokenizedUnpaired]) -> float:
        """z0: the mean policy-minus-reference log-prob of the mismatched pairs, clamped at 0."""
        device = next(self.policy.parameters()).device
        mismatched = mismatched_examples(examples, max_length=self.max_length)
        total = 0.0
        for start in range(0, len(mismatched), self.micro_batch_size):
            batch = to_device(collate_unpaired(mismatched[start : start + self.micro_batch_size], self.pad_id), device)
            with self.autocast():
                policy = sequence_logprobs(*completion_token_logprobs(self.policy, batch), average=self.kto.average_logprobs)
                reference = sequence_logprobs(*self.reference.token_logprobs(batch), average=self.kto.average_logprobs)
            total += float((policy.float() - reference.float()).sum())
        return max(0.0, total / len(examples))

    def denominators(self, examples):
        desirable = sum(1 for example in examples if example.label)
        return {
            "examples": len(examples),
            "desirable": desirable,
            "undesirable": len(examples) - desirable,
            "kl_baseline": self.kl_baseline(examples),
        }

    def collate(self, examples):
        return collate_unpaired(examples, self.pad_id)

    def loss(self, model, batch, denominators):
        policy = sequence_logprobs(*completion_token_logprobs(model, batch), average=self.kto.average_logprobs)  # [B]
        reference = sequence_logprobs(*self.reference.token_logprobs(batch), average=self.kto.average_logprobs)
        return self.loss_fn(
            policy,
            reference,
            batch["label"],
            kl_baseline=denominators["kl_baseline"],
            beta=self.kto.beta,
            num_examples=denominators["examples"],
            num_desirable=denominators["desirable"],
            num_undesirable=denominators["undesirable"],
            desirable_weight=self.kto.desirable_weight,
            undesirable_weight=self.kto.undesirable_weight,
        )

    def num_tokens(self, batch):
        return int(batch["attention_mask"].sum())

    def evaluate(self, model, examples):
        return evaluate_sums(model, self, examples, micro_batch_size=self.micro_batch_size)


def run(config: KTOConfig) -> TrainResult:
    run_info = start_run(config, command="kto", data_kind="unpaired")
    with preparing(run_info):
        _, train_examples, eval_examples = prepare_data(run_info, config, load_unpaired_data)
        model, tokenizer = load_policy(config.model, cache_dir=run_info.cache_dir)
        reference = ReferenceModel.of(model)
        if not reference.adapters_disabled:
            reference.model = place_model(run_info, config, reference.model)
        model = place_model(run_info, config, model)
    algorithm = KTOAlgorithm(
        policy=model,
        reference=reference,
        pad_id=tokenizer.pad_token_id,
        kto=config.kto,
        micro_batch_size=config.trainer.micro_batch_size,
        max_length=config.data.max_length,
        autocast=lambda: autocast_context(config.trainer, run_info.device),
    )
    return fit(
        run_info, config, model=model, tokenizer=tokenizer, algorithm=algorithm,
        train_examples=train_examples, eval_examples=eval_examples,
    )
