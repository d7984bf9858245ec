"""Per-token values from a sequence classifier: the PPO critic.

A Hugging Face `*ForSequenceClassification` model with one output applies its `score` head to the
last hidden states and keeps only the last non-pad position (a reward model). A PPO critic needs a
value at every position, so `token_values` runs the same backbone and head but keeps them all. The
critic is therefore an ordinary reward-model checkpoint (`load_reward_model(num_labels=1)`): it
starts from a trained reward model or a policy, trains, and exports like one.
"""

from __future__ import annotations

import torch

from stema.models.loading import unwrap_lora


def token_values(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Values [B, T] of a one-output sequence classifier at every position of `input_ids` [B, T].

    `model` may be wrapped by peft (its adapters and trained head copy are used). The value at a
    row's last non-pad position equals what `model(input_ids, attention_mask).logits` pools for it;
    values at padded positions are computed but meaningless.
    """
    classifier = unwrap_lora(model)
    if classifier.config.num_labels != 1:
        raise ValueError(f"token_values needs a model with one output (a critic); this one has {classifier.config.num_labels}")
    backbone = classifier.base_model  # `model.model` or GPT-2's `model.transformer`
    hidden_states = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state  # [B, T, H]
    return classifier.score(hidden_states).squeeze(-1)  # [B, T, 1] -> [B, T]
