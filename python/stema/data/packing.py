"""SFT packing: several tokenized examples per row, each attending only to itself.

Rows are filled by first-fit decreasing (longest example first, into the first row with room). In a row,
`position_ids` restart at 0 for each example and the first token of each example has label -100, so no
loss term predicts one example from another.

Keeping attention within each example, in transformers 5 (read in `transformers.masking_utils`, checked by
tests/test_data_collate_packing.py): a 4-D attention_mask is handed to the attention function as it is.

- `attention="bool"`: `[B, 1, T, T]`, True where a token may attend. sdpa takes it; eager does not: it adds the
  mask to the scores, so a boolean mask only adds 1 to the allowed scores and masks nothing.
- `attention="additive"`: `[B, 1, T, T]` floats, 0 or the dtype's minimum. Eager and sdpa both take it.
- `attention="position_ids"`: no mask at all. With `attention_mask=None` and no cache, `create_causal_mask` finds
  where position_ids restart (`find_packed_sequence_indices`) and builds the block-diagonal causal mask itself
  (sdpa, eager, flex), without a `[T, T]` tensor in the batch. The model must be called with `use_cache=False`:
  by default it makes a cache even in training, and then the detection is skipped and examples see each other.
  Flash-attention detects packing only in a batch of one flattened row, which this collator does not make.

`packed_attention_for(attn_implementation)` picks the right one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from stema.data.collate import pad_right
from stema.data.tokenize import IGNORE_INDEX, TokenizedSFT

PackedAttention = Literal["position_ids", "bool", "additive"]


@dataclass(frozen=True)
class PackedRow:
    """Examples laid end to end: `position_ids` restart at 0 per example, `seq_lens` are their lengths in order."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    seq_lens: list[int]


class _FirstFitBins:
    """The leftmost bin with room for a length, in O(log n): a segment tree of the bins' free space (max).

    Unused bins are empty, so the leftmost bin with room is an open one or else the next unused one.
    """

    def __init__(self, num_bins: int, capacity: int):
        self.leaves = 1
        while self.leaves < num_bins:
            self.leaves *= 2
        self.free = [capacity] * (2 * self.leaves)

    def place(self, length: int) -> int:
        node = 1
        while node < self.leaves:
            node = 2 * node if self.free[2 * node] >= length else 2 * node + 1
        self.free[node] -= length
        parent = node // 2
        while parent:
            self.free[parent] = max(self.free[2 * parent], self.free[2 * parent + 1])
            parent //= 2
        return node - self.leaves


def pack_sft(examples: Sequence[TokenizedSFT], *, max_length: int) -> list[PackedRow]:
    """Pack examples (each at most `max_length` tokens) into rows of at most `max_length` tokens, first-fit decreasing."""
    too_long = next((example for example in examples if len(example.input_ids) > max_length), None)
    if too_long is not None:
        raise ValueError(f"{too_long.location}: {len(too_long.input_ids)} tokens do not fit a packed row of {max_length}")
    bins = _FirstFitBins(len(examples), max_length)
    rows: list[list[TokenizedSFT]] = []
    for example in sorted(examples, key=lambda item: len(item.input_ids), reverse=True):
        index = bins.place(len(example.input_ids))
        if index == len(rows):
            rows.append([])
        rows[index].append(example)
    return [_join(row) for row in rows]


def _join(examples: list[TokenizedSFT]) -> PackedRow:
    input_ids, labels, position_ids = [], [], []
    for example in examples:
        input_ids += example.input_ids
        labels += [IGNORE_INDEX] + example.labels[1:]
        position_ids += range(len(example.input_ids))
    return PackedRow(input_ids, labels, position_ids, [len(example.input_ids) for example in examples])


def block_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """`[B, 1, T, T]` bool: token q may attend to token k when k <= q and both lie in the same example.

    An example starts wherever `position_ids` `[B, T]` is 0 (the padding tail counts as one more example, so
    no query row is fully masked).
    """
    example_ids = (position_ids == 0).cumsum(-1)  # [B, T]
    same_example = example_ids[:, :, None] == example_ids[:, None, :]  # [B, T, T]
    width = position_ids.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    return (same_example & causal)[:, None]


def packed_attention_for(attn_implementation: str) -> PackedAttention:
    """The `collate_packed` attention that keeps packed examples apart under a transformers attention implementation."""
    choices = {"eager": "additive", "sdpa": "bool", "flex_attention": "position_ids"}
    if attn_implementation not in choices:
        raise ValueError(
            f"packing supports attn_implementation eager, sdpa or flex_attention, not {attn_implementation!r} "
            "(flash-attention would need one flattened row per batch)"
        )
    return choices[attn_implementation]


def collate_packed(
    rows: Sequence[PackedRow], pad_id: int, *, attention: PackedAttention, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """input_ids, labels (-100 on padding), position_ids `[B, T]`; plus attention_mask `[B, 1, T, T]` for 'bool' and
    'additive' (in `dtype`). With 'position_ids' call the model with `use_cache=False` (see the module docstring).

    The padding tail's position_ids count from 0 like one more example, so it attends only to itself.
    """
    width = max(len(row.input_ids) for row in rows)
    position_ids = pad_right([row.position_ids + list(range(width - len(row.input_ids))) for row in rows], 0)
    batch = {
        "input_ids": pad_right([row.input_ids for row in rows], pad_id),
        "labels": pad_right([row.labels for row in rows], IGNORE_INDEX),
        "position_ids": position_ids,
    }
    if attention == "bool":
        batch["attention_mask"] = block_causal_mask(position_ids)
    elif attention == "additive":
        allowed = block_causal_mask(position_ids)
        batch["attention_mask"] = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    elif attention != "position_ids":
        raise ValueError(f"attention must be 'position_ids', 'bool' or 'additive', got {attention!r}")
    return batch
