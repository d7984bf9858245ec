"""Preference accuracy: the fraction of pairs whose chosen completion has the higher summed
log-prob, checked against the model's own full forward pass."""

import torch

from stema.config import DataConfig
from stema.data import load_preference_data
from stema.evaluation import preference_accuracy
from stema.models import families, tiny


def summed_logprob(model, ids: list[int], labels: list[int]) -> float:
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()  # [T - 1, V]
    targets = torch.tensor(labels[1:])
    picked = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[:, None])[:, 0]
    return float((picked * (targets != -100)).sum())


def test_preference_accuracy_counts_pairs_whose_chosen_completion_is_more_likely():
    tokenizer = tiny.build_tokenizer()
    model = families.build_family_model("qwen2", tokenizer=tokenizer, seed=3)
    pairs, _ = load_preference_data(DataConfig(train="builtin", builtin_size=24, max_length=48), tokenizer)
    with torch.no_grad():
        expected = [
            summed_logprob(model, pair.chosen_ids, pair.chosen_labels) > summed_logprob(model, pair.rejected_ids, pair.rejected_labels)
            for pair in pairs
        ]
    assert 0 < sum(expected) < len(pairs)  # a random model prefers some chosen answers, not all
    assert preference_accuracy(model, pairs, pad_id=tokenizer.pad_token_id, batch_size=5) == sum(expected) / len(pairs)
