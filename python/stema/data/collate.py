"""Collators: lists of tokenized examples -> padded tensors.

Training batches are right-padded (`labels` -100 on padding); generation prompts are left-padded so every
row's last prompt token sits in the last column.
"""

from __future__ import annotations

from typing import Sequence

import torch

from stema.data.tokenize import (
    IGNORE_INDEX,
    TokenizedAttributes,
    TokenizedPair,
    TokenizedPrompt,
    TokenizedSFT,
    TokenizedUnpaired,
)


def pad_right(sequences: Sequence[Sequence[int]], value: int, *, length: int | None = None) -> torch.Tensor:
    """`[B, T]` int64 of the sequences padded on the right with `value` to T = `length` or the longest."""
    width = max(len(row) for row in sequences) if length is None else length
    out = torch.full((len(sequences), width), value, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        out[row, : len(sequence)] = torch.as_tensor(sequence, dtype=torch.long)
    return out


def _attention_mask(sequences: Sequence[Sequence[int]], width: int) -> torch.Tensor:
    lengths = torch.tensor([len(sequence) for sequence in sequences])
    return (torch.arange(width)[None, :] < lengths[:, None]).long()


def collate_sft(examples: Sequence[TokenizedSFT | TokenizedUnpaired], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids `[B, T]` (pad_id on padding), attention_mask `[B, T]` (1 on tokens), labels `[B, T]` (-100 on padding)."""
    input_ids = pad_right([example.input_ids for example in examples], pad_id)
    return {
        "input_ids": input_ids,
        "attention_mask": _attention_mask([example.input_ids for example in examples], input_ids.shape[1]),
        "labels": pad_right([example.labels for example in examples], IGNORE_INDEX),
    }


def collate_unpaired(examples: Sequence[TokenizedUnpaired], pad_id: int) -> dict[str, torch.Tensor]:
    """`collate_sft`'s tensors plus `label` `[B]` bool (True: desirable completion)."""
    batch = collate_sft(examples, pad_id)
    batch["label"] = torch.tensor([example.label for example in examples], dtype=torch.bool)
    return batch


def collate_pairs(pairs: Sequence[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen and rejected sequences in one batch for a single forward pass.

    input_ids, attention_mask, labels: `[2B, T]`; rows 0..B-1 are the chosen sequences, rows B..2B-1 the
    rejected ones of the same pairs. chosen_reward, rejected_reward, margin: `[B]` float32, present when every
    pair has that value (ValueError when only some do).
    """
    sequences = [pair.chosen_ids for pair in pairs] + [pair.rejected_ids for pair in pairs]
    input_ids = pad_right(sequences, pad_id)
    batch = {
        "input_ids": input_ids,
        "attention_mask": _attention_mask(sequences, input_ids.shape[1]),
        "labels": pad_right([pair.chosen_labels for pair in pairs] + [pair.rejected_labels for pair in pairs], IGNORE_INDEX),
    }
    for name in ("chosen_reward", "rejected_reward", "margin"):
        values = [getattr(pair, name) for pair in pairs]
        if all(value is not None for value in values):
            batch[name] = torch.tensor(values, dtype=torch.float32)
        elif any(value is not None for value in values):
            missing = next(pair.location for pair in pairs if getattr(pair, name) is None)
            raise ValueError(f"{missing}: '{name}' is missing here but given for other pairs in the batch")
    return batch


def collate_attributes(examples: Sequence[TokenizedAttributes], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask `[B, T]`; labels `[B, k]` float32 with -100 where an attribute is unknown."""
    input_ids = pad_right([example.input_ids for example in examples], pad_id)
    return {
        "input_ids": input_ids,
        "attention_mask": _attention_mask([example.input_ids for example in examples], input_ids.shape[1]),
        "labels": torch.tensor([example.labels for example in examples], dtype=torch.float32),
    }


def collate_prompts(prompts: Sequence[TokenizedPrompt], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts for `generate`: input_ids and attention_mask `[B, P]`, pad_id / 0 on the left."""
    width = max(len(prompt.input_ids) for prompt in prompts)
    input_ids = pad_right([prompt.input_ids[::-1] for prompt in prompts], pad_id, length=width).flip(1)
    attention_mask = _attention_mask([prompt.input_ids for prompt in prompts], width).flip(1)
    return {"input_ids": input_ids, "attention_mask": attention_mask}
