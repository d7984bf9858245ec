"""Supervised fine-tuning (SFT).

1. Load the model (optionally with LoRA) and tokenizer; read, validate and tokenize the data, with
   the loss on completion tokens only by default, and pack examples into rows if asked.
2. Each micro-batch: logits = model(input_ids); per-token log-probs of the next tokens through the
   fused kernel `stema_kernels.token_logprobs`; loss = -sum(log-probs of completion tokens) /
   (completion tokens in the whole global batch), so micro-batching does not change the result.
3. The shared loop steps AdamW, evaluates (loss, perplexity), checkpoints, and resumes exactly.
4. Export the final model in Hugging Face format with its tokenizer.

As TRL's SFTTrainer, except that the denominator is always the global token count of the step.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from stema.config import SFTConfig
from stema.data import collate_packed, collate_sft, load_sft_data, pack_sft, packed_attention_for
from stema.data.tokenize import TokenizedSFT
from stema.losses import get_loss
from stema.models.loading import load_policy
from stema.training import TrainResult
from stema.training.logprobs import IGNORE_INDEX, logits_token_logprobs
from stema.training.loop import evaluate_sums
from stema.training.setup import fit, place_model, prepare_data, preparing, start_run


def model_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits `[B, T, V]` of a batch."""
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "position_ids") if key in batch}
    # No KV cache in training; packed rows also rely on it (transformers builds the per-example
    # mask from restarting position_ids only when there is no cache).
    return model(**inputs, use_cache=False).logits


def count_loss_tokens(examples: Sequence[TokenizedSFT]) -> int:
    """Tokens that carry loss: labelled positions that have a previous token to predict them."""
    return sum(sum(1 for label in example.labels[1:] if label != IGNORE_INDEX) for example in examples)


class SFTAlgorithm:
    name = "sft"

    def __init__(self, *, pad_id: int, packing: bool, max_length: int, micro_batch_size: int, attn_implementation: str):
        self.pad_id = pad_id
        self.packing = packing
        # Packed rows need a mask that keeps examples apart, of the kind the attention expects.
        self.packed_attention = packed_attention_for(attn_implementation) if packing else None
        self.max_length = max_length
        self.micro_batch_size = micro_batch_size
        self.loss_fn = get_loss("sft")

    def denominators(self, examples):
        return {"tokens": count_loss_tokens(examples)}

    def collate(self, examples):
        if self.packing:
            return collate_packed(pack_sft(examples, max_length=self.max_length), self.pad_id, attention=self.packed_attention)
        return collate_sft(examples, self.pad_id)

    def loss(self, model, batch, denominators):
        return self.loss_from_logits(model_logits(model, batch), batch, denominators)

    def loss_from_logits(self, logits, batch, denominators):
        logprobs, mask = logits_token_logprobs(logits, batch)  # [B, T] fp32, [B, T]
        return self.loss_fn(logprobs, mask, num_valid_tokens=max(1, denominators["tokens"]))

    def num_tokens(self, batch):
        if "attention_mask" in batch and batch["attention_mask"].dim() == 2:
            return int(batch["attention_mask"].sum())
        return int((batch["input_ids"] != self.pad_id).sum())

    def evaluate(self, model, examples):
        totals = evaluate_sums(model, self, examples, micro_batch_size=self.micro_batch_size)
        tokens = self.denominators(examples)["tokens"]
        return {"loss": totals["loss"], "perplexity": math.exp(min(totals["loss"], 50.0)), "tokens": tokens}


def run(config: SFTConfig, *, command: str = "sft", load: Callable = load_sft_data, kind: str = "sft") -> TrainResult:
    """SFT under `config`; `load` reads the examples of data `kind` (`stema steerlm` passes its
    attribute-conditioned loader)."""
    run_info = start_run(config, command=command, data_kind=kind)
    with preparing(run_info):
        _, train_examples, eval_examples = prepare_data(run_info, config, load)
        model, tokenizer = load_policy(config.model, cache_dir=run_info.cache_dir)
        model = place_model(run_info, config, model)
    algorithm = SFTAlgorithm(
        pad_id=tokenizer.pad_token_id,
        packing=config.data.packing,
        max_length=config.data.max_length,
        micro_batch_size=config.trainer.micro_batch_size,
        attn_implementation=config.model.attn_implementation,
    )
    return fit(
        run_info, config, model=model, tokenizer=tokenizer, algorithm=algorithm,
        train_examples=train_examples, eval_examples=eval_examples,
    )
