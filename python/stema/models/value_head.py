"""Value and reward heads of a sequence classifier, and the one reward readout.

A Hugging Face `*ForSequenceClassification` model applies its `score` head to the last hidden
states (`token_scores`, `[B, T, k]`). Two things are read from them:

- `reward_scores` (`[B, k]`): THE reward readout, the head's output at each row's last attended
  token (the rightmost position whose attention mask is 1). Reward-model training and evaluation
  (`stema rm`), the SteerLM attribute model (`stema annotate`), PPO/GRPO's reward role and
  rejection sampling all read rewards through it, so a model is scored where it was trained.
- `token_values` (`[B, T]`): a one-output model's value at every position, the PPO critic. The
  critic is therefore an ordinary reward-model checkpoint (`load_reward_model(num_labels=1)`): it
  starts from a trained reward model or a policy, trains, and exports like one.

Why the attention mask and not transformers' own pooling: transformers pools at the rightmost
token that is not `config.pad_token_id`. When the tokenizer has no pad token, `load_tokenizer` pads
with EOS (Llama-3, Mistral), and every sequence ends with EOS, so transformers reads the token
*before* the trailing EOS, and a generated response that stops at EOS would be read elsewhere than
a training pair. The attention mask marks the real tokens whatever the pad id is.

An exported reward model loaded with `AutoModelForSequenceClassification` scores like
`reward_scores` whenever the pad token differs from EOS (right or left padding). With pad == EOS
and a sequence ending in EOS, transformers' `logits` are the scores of the sequence without its
trailing EOS tokens; call `reward_scores(model, input_ids, attention_mask)` to read STEMA's score
(`tests/test_reward_readout.py` shows both).
"""

from __future__ import annotations

import torch

from stema.models.loading import unwrap_lora


def token_scores(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The `score` head's output `[B, T, k]` at every position of `input_ids` `[B, T]`.

    The scores are captured from the model's own forward pass (a hook on the head), so the same
    call serves a plain model, a peft-wrapped one (its adapters and trained head copy are used) and
    an FSDP2- or tensor-parallel-sharded one (whose root forward gathers the weights). Scores at
    padded positions are computed but meaningless.
    """
    captured: list[torch.Tensor] = []
    hook = unwrap_lora(model).score.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        hook.remove()
    return captured[0]


def last_attended(attention_mask: torch.Tensor) -> torch.Tensor:
    """`[B]` index of each row's rightmost position whose `attention_mask` `[B, T]` is 1 (right or
    left padding alike)."""
    width = attention_mask.shape[-1]
    return width - 1 - attention_mask.flip(-1).to(torch.int64).argmax(-1)


def reward_scores(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The reward readout: `[B, k]` fp32 scores of a k-output sequence classifier, read at each
    row's last attended token (module docstring). Gradients flow when called with them enabled."""
    scores = token_scores(model, input_ids, attention_mask)  # [B, T, k]
    rows = torch.arange(scores.shape[0], device=scores.device)
    return scores[rows, last_attended(attention_mask).to(scores.device)].float()  # [B, k]


def token_values(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Values `[B, T]` of a one-output sequence classifier at every position of `input_ids` `[B, T]`;
    the value at a row's last attended position is its `reward_scores`."""
    classifier = unwrap_lora(model)
    if classifier.config.num_labels != 1:
        raise ValueError(f"token_values needs a model with one output (a critic); this one has {classifier.config.num_labels}")
    return token_scores(model, input_ids, attention_mask).squeeze(-1)  # [B, T, 1] -> [B, T]
