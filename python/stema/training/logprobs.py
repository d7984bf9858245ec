"""Log-probs of completions under a policy or its reference: what DPO, KTO and PPO share.

    token_logprobs, mask = completion_token_logprobs(model, batch)   # [N, T] fp32, [N, T] bool
    logps = sequence_logprobs(token_logprobs, mask, average=False)    # [N]
    reference = ReferenceModel.of(policy)     # frozen copy, or the LoRA policy with adapters off
    ref_logps = sequence_logprobs(*reference.token_logprobs(batch), average=False)

`batch` holds right-padded `input_ids`, `attention_mask` and `labels` `[N, T]` (labels -100 where
a token is not trained), as the collators of `stema.data` make them. Position t of the outputs is
the log-prob of the token at t + 1 (the label that position predicts).

The LM head is applied only at the positions that carry a label: the backbone's hidden states
`[N, T, H]` are gathered at the M labelled positions and projected to `[M, V]` logits, which the
fused kernel `stema_kernels.token_logprobs` turns into log-probs. Prompt and padding positions
never get `[V]` logits, which in preference data (long prompts, short completions, large
vocabularies) saves most of the LM head's time and memory. Models whose logits are more than the
plain LM-head projection (final soft-capping or logit scales), and models sharded by FSDP2, take
the full forward instead.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from typing import Callable

import torch
import torch.nn.functional as F

import stema_kernels
from stema.distributed.pipeline import is_pipelined
from stema.models.loading import disable_adapters, is_lora_model, unwrap_lora

IGNORE_INDEX = -100
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")
# Config fields that make a family's logits differ from lm_head(hidden) (Gemma 2/3, Cohere, Granite, ...).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier")


def next_token_labels(labels: torch.Tensor) -> torch.Tensor:
    """labels `[B, T]` -> the label each position predicts, `[B, T]`: shifted left, -100 at the end."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def lm_head_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(backbone, lm_head) of a causal LM whose logits are exactly `lm_head(backbone(...)[0])`, or
    None when the model transforms its logits further (then only its own forward is right). With
    LoRA, both parts are the peft-injected modules, so adapters (and disabling them) apply."""
    hf_model = unwrap_lora(model)
    if _is_fsdp_module(hf_model):
        # FSDP2 gathers the root's weights (embedding, LM head) only in the root's own forward.
        return None
    text_config = hf_model.config.get_text_config()
    if any(getattr(text_config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return None
    head = hf_model.get_output_embeddings()
    backbone = getattr(hf_model, hf_model.base_model_prefix, None)
    if head is None or backbone is None or backbone is hf_model:
        return None
    return backbone, head


def _is_fsdp_module(model: torch.nn.Module) -> bool:
    """Whether FSDP2 shards `model` (checked without importing FSDP when nothing has)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def completion_token_logprobs(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> tuple[torch.Tensor, ...]:
    """(log-probs `[N, T]` fp32, 0 where unlabelled; mask `[N, T]` bool of the labelled positions),
    plus the policy's entropy `[N, T]` fp32 (0 where unlabelled) when `return_entropy`. The
    log-probs are of softmax(logits / temperature) (PPO scores samples drawn at a temperature)."""
    inputs = {key: batch[key] for key in MODEL_INPUTS if key in batch}
    targets = next_token_labels(batch["labels"])  # [N, T]
    mask = targets != IGNORE_INDEX
    options = dict(temperature=temperature, return_entropy=return_entropy)
    parts = lm_head_parts(model)
    if parts is None:
        logits = model(**inputs, use_cache=False).logits  # [N, T, V]
        return logits_token_logprobs(logits, batch, **options)
    backbone, head = parts
    hidden = backbone(**inputs, use_cache=False).last_hidden_state  # [N, T, H]
    logits = head(hidden[mask])  # [M, V], M = labelled positions
    outputs = stema_kernels.token_logprobs(logits, targets[mask], **options)  # [M] fp32 (each)
    if not return_entropy:
        return _scatter_to(mask, outputs), mask
    logprobs, entropy = outputs
    return _scatter_to(mask, logprobs), mask, _scatter_to(mask, entropy)


def logits_token_logprobs(logits: torch.Tensor, batch: dict[str, torch.Tensor], *, temperature: float = 1.0,
                          return_entropy: bool = False) -> tuple[torch.Tensor, ...]:
    """(log-probs `[N, T]` fp32, 0 where unlabelled; mask `[N, T]`), plus the entropy `[N, T]`
    fp32 (0 where unlabelled) when `return_entropy`, from a model's logits `[N, T, V]` computed
    elsewhere (a pipeline's last stage): what `completion_token_logprobs` returns from the model's
    full forward."""
    targets = next_token_labels(batch["labels"])  # [N, T]
    mask = targets != IGNORE_INDEX
    outputs = stema_kernels.token_logprobs(logits, targets, ignore_index=IGNORE_INDEX, temperature=temperature,
                                           return_entropy=return_entropy)
    if not return_entropy:
        return outputs, mask
    logprobs, entropy = outputs
    return logprobs, mask, entropy * mask


def _scatter_to(mask: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """`[M]` values at the True positions of `mask` `[N, T]` -> `[N, T]`, 0 elsewhere."""
    return selected.new_zeros(mask.shape).masked_scatter(mask, selected)


def sequence_logprobs(token_logprobs: torch.Tensor, mask: torch.Tensor, *, average: bool = False) -> torch.Tensor:
    """Per-sequence log-probs `[N]`: the sum over labelled tokens, or their mean when `average`."""
    total = (token_logprobs * mask).sum(-1)
    if not average:
        return total
    return total / mask.sum(-1).clamp(min=1)


@torch.no_grad()
def batched_sequence_logprobs(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], *, average: bool,
                              token_logprobs: Callable) -> list[torch.Tensor]:
    """Sequence log-probs `[rows]` of each batch (on the device) without gradients: through the
    model's pipeline stages when it has them (`Pipeline.forward_only`; every rank of the pipeline
    group gets all the values, on the CPU), else from `token_logprobs(batch)` (the model's
    `(token log-probs, mask)`: `completion_token_logprobs`, or a reference's `token_logprobs`)."""
    if is_pipelined(model):
        return model.pipeline.forward_only(
            batches, output_of=lambda logits, batch: sequence_logprobs(*logits_token_logprobs(logits, batch), average=average).cpu()
        )
    return [sequence_logprobs(*token_logprobs(batch), average=average) for batch in batches]


class ReferenceModel:
    """The frozen reference policy: a separate frozen copy of the policy's starting weights (eval
    mode, no gradients), or, for a LoRA policy, the policy itself with its adapters disabled (no
    second copy of the weights in memory). Build it before the policy trains."""

    def __init__(self, model: torch.nn.Module, *, adapters_disabled: bool):
        self.model: torch.nn.Module | None = model
        self.adapters_disabled = adapters_disabled

    @classmethod
    def of(cls, policy: torch.nn.Module) -> "ReferenceModel":
        """The reference of `policy` as it is now: adapters disabled with LoRA, else a frozen copy."""
        if is_lora_model(policy):
            return cls(policy, adapters_disabled=True)
        frozen = copy.deepcopy(policy).eval()
        frozen.requires_grad_(False)
        return cls(frozen, adapters_disabled=False)

    @torch.no_grad()
    def token_logprobs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """`completion_token_logprobs` of the reference, without gradients."""
        if self.model is None:
            raise RuntimeError("the reference model was released")
        context = disable_adapters(self.model) if self.adapters_disabled else contextlib.nullcontext()
        with context:
            return completion_token_logprobs(self.model, batch)

    def release(self) -> None:
        """Drop the reference (once its log-probs are precomputed), freeing a frozen copy's memory."""
        self.model = None
