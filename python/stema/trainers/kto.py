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

With pipeline stages (`distributed.pp_size > 1`) the policy's loss is computed on the last stage
from its logits, inside the schedule, where no other forward pass can run: the reference's
log-probs of the (matched) examples, which never change, are computed once before training
through the reference's own stages and kept with the examples; z0's policy and reference
log-probs of each global batch's mismatched pairs run through the stages without gradients
(`Pipeline.forward_only`) before the batch's schedule step.

Departures from TRL's KTOTrainer: TRL fixes the mismatched pairs when it prepares the dataset
(rotating within consecutive chunks of the unshuffled data) and estimates z0 per device
micro-batch; STEMA rotates within each (shuffled) global batch and estimates z0 once for it.
Reference log-probs of the mismatched pairs are never precomputed (the pairs change with every
batch); those of the examples themselves only on pipeline stages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from stema.config import KTOConfig, KTOLossConfig
from stema.data import TokenizedUnpaired, collate_unpaired, load_unpaired_data
from stema.data.tokenize import IGNORE_INDEX
from stema.losses import get_loss
from stema.models.loading import load_policy
from stema.training import TrainResult
from stema.distributed.pipeline import is_pipelined
from stema.training.logprobs import (
    ReferenceModel, batched_sequence_logprobs, completion_token_logprobs, logits_token_logprobs, sequence_logprobs,
)
from stema.training.loop import autocast_context, evaluate_sums, to_device
from stema.training.setup import fit, place_model, prepare_data, preparing, start_run


@dataclass(frozen=True)
class ReferencedExample:
    """An unpaired example with the reference model's sequence log-prob of its completion."""

    example: TokenizedUnpaired
    ref_logps: float


def _unreferenced(examples: Sequence[TokenizedUnpaired | ReferencedExample]) -> list[TokenizedUnpaired]:
    return [example.example if isinstance(example, ReferencedExample) else example for example in examples]


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

    def micro_batches(self, examples: Sequence[TokenizedUnpaired]) -> list[dict[str, torch.Tensor]]:
        device = next(self.policy.parameters()).device
        return [to_device(collate_unpaired(examples[start : start + self.micro_batch_size], self.pad_id), device)
                for start in range(0, len(examples), self.micro_batch_size)]

    def policy_logprobs(self, batches: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """The policy's sequence log-probs `[rows]` of each batch, without gradients (through its stages on a pipeline)."""
        with self.autocast():
            return batched_sequence_logprobs(self.policy, batches, average=self.kto.average_logprobs,
                                             token_logprobs=lambda batch: completion_token_logprobs(self.policy, batch))

    def reference_logprobs(self, batches: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """The reference's sequence log-probs `[rows]` of each batch (through its stages on a pipeline)."""
        with self.autocast():
            return batched_sequence_logprobs(self.reference.model, batches, average=self.kto.average_logprobs,
                                             token_logprobs=self.reference.token_logprobs)

    def kl_baseline(self, examples: Sequence[TokenizedUnpaired]) -> float:
        """z0: the mean policy-minus-reference log-prob of the mismatched pairs, clamped at 0."""
        batches = self.micro_batches(mismatched_examples(examples, max_length=self.max_length))
        pairs = zip(self.policy_logprobs(batches), self.reference_logprobs(batches))
        total = sum(float((policy.float() - reference.float()).sum()) for policy, reference in pairs)
        return max(0.0, total / len(examples))

    def referenced(self, examples: Sequence[TokenizedUnpaired]) -> list[ReferencedExample]:
        """Each example with the reference's sequence log-prob of its completion (for the pipeline's last stage)."""
        logps = torch.cat([chunk.float().cpu() for chunk in self.reference_logprobs(self.micro_batches(examples))])
        return [ReferencedExample(example, float(value)) for example, value in zip(examples, logps)]

    def denominators(self, examples):
        examples = _unreferenced(examples)
        desirable = sum(1 for example in examples if example.label)
        return {
            "examples": len(examples),
            "desirable": desirable,
            "undesirable": len(examples) - desirable,
            "kl_baseline": self.kl_baseline(examples),
        }

    def collate(self, examples):
        """`collate_unpaired`'s tensors, with ref_logps `[B]` when the examples carry them."""
        batch = collate_unpaired(_unreferenced(examples), self.pad_id)
        if isinstance(examples[0], ReferencedExample):
            batch["ref_logps"] = torch.tensor([example.ref_logps for example in examples])
        return batch

    def loss(self, model, batch, denominators):
        return self.loss_of_token_logprobs(*completion_token_logprobs(model, batch), batch, denominators)

    def loss_from_logits(self, logits, batch, denominators):
        return self.loss_of_token_logprobs(*logits_token_logprobs(logits, batch), batch, denominators)

    def loss_of_token_logprobs(self, token_logprobs, mask, batch, denominators):
        """The loss from the policy's token log-probs and mask `[B, T]`; the reference's sequence
        log-probs precomputed in the batch, or from the live reference."""
        policy = sequence_logprobs(token_logprobs, mask, average=self.kto.average_logprobs)  # [B]
        if "ref_logps" in batch:
            reference = batch["ref_logps"]
        else:
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
    if is_pipelined(model):
        train_examples = algorithm.referenced(train_examples)
        if eval_examples:
            eval_examples = algorithm.referenced(eval_examples)
        run_info.say("reference log-probs precomputed for every example through the reference's stages")
    return fit(
        run_info, config, model=model, tokenizer=tokenizer, algorithm=algorithm,
        train_examples=train_examples, eval_examples=eval_examples,
    )
