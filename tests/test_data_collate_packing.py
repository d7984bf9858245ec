"""Collators' shapes and padding; packing, and the acceptance check: a packed row's loss equals its examples' losses."""

import pytest
import torch

from stema.data import TokenizedPrompt, TokenizedSFT, collate_attributes, collate_packed, collate_pairs, collate_prompts, collate_sft, pack_sft
from stema.data.packing import block_causal_mask, packed_attention_for
from stema.data.tokenize import TokenizedAttributes, TokenizedPair
from stema.models import tiny

PAD = 0


def test_collate_sft_right_pads_with_pad_id_and_ignore_labels():
    batch = collate_sft([TokenizedSFT([5, 6, 7], [-100, 6, 7]), TokenizedSFT([8], [8])], PAD)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(tensor.dtype == torch.long for tensor in batch.values())


def pair(chosen, rejected, location="d.jsonl:1", **scores):
    return TokenizedPair([1], chosen, rejected, [-100] + chosen[1:], [-100] + rejected[1:], location, **scores)


def test_collate_pairs_puts_chosen_rows_first_then_rejected_in_one_batch():
    pairs = [pair([1, 10, 11], [1, 20], chosen_reward=1.0, rejected_reward=0.0), pair([1, 12], [1, 21, 22, 23], chosen_reward=0.5, rejected_reward=0.25)]
    batch = collate_pairs(pairs, PAD)
    assert batch["input_ids"].tolist() == [[1, 10, 11, 0], [1, 12, 0, 0], [1, 20, 0, 0], [1, 21, 22, 23]]
    assert batch["attention_mask"].sum(1).tolist() == [3, 2, 2, 4]
    assert batch["labels"].tolist()[3] == [-100, 21, 22, 23] and batch["labels"].tolist()[1] == [-100, 12, -100, -100]
    assert batch["chosen_reward"].tolist() == [1.0, 0.5] and batch["rejected_reward"].tolist() == [0.0, 0.25]
    assert "margin" not in batch
    with pytest.raises(ValueError, match=r"d\.jsonl:9: 'margin' is missing here but given for other pairs"):
        collate_pairs([pair([1, 2], [1, 3], margin=1.0), pair([1, 2], [1, 3], "d.jsonl:9")], PAD)


def test_collate_attributes_and_left_padded_prompts():
    batch = collate_attributes([TokenizedAttributes([4, 5, 6], [1.0, -100.0]), TokenizedAttributes([7], [0.5, 2.0])], PAD)
    assert batch["input_ids"].tolist() == [[4, 5, 6], [7, 0, 0]]
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [[1.0, -100.0], [0.5, 2.0]]
    prompts = collate_prompts([TokenizedPrompt([4, 5, 6], "a"), TokenizedPrompt([7], "b")], PAD)
    assert prompts["input_ids"].tolist() == [[4, 5, 6], [0, 0, 7]]
    assert prompts["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def example(length, start):
    ids = list(range(start, start + length))
    return TokenizedSFT(ids, [-100] + ids[1:], f"e{length}")


def test_first_fit_decreasing_fills_rows_and_restarts_positions():
    examples = [example(n, 10 * i + 10) for i, n in enumerate([2, 5, 3, 1, 4, 3])]
    rows = pack_sft(examples, max_length=8)
    assert [row.seq_lens for row in rows] == [[5, 3], [4, 3, 1], [2]]
    assert rows[0].position_ids == [0, 1, 2, 3, 4, 0, 1, 2]
    assert rows[0].labels[5] == -100 and rows[0].labels[6:] == rows[0].input_ids[6:]
    with pytest.raises(ValueError, match="e9: 9 tokens do not fit a packed row of 8"):
        pack_sft([example(9, 0)], max_length=8)


def test_block_causal_mask_keeps_attention_inside_each_example_and_the_padding():
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0]])  # examples of 3 and 2 tokens, then one padding token
    mask = block_causal_mask(position_ids)[0, 0].int().tolist()
    assert mask == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]


@pytest.fixture(scope="module")
def tiny_model():
    model = tiny.build_model(tiny.TinyModelSpec(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64, seed=1))
    return model.eval()


def summed_loss(model, batch) -> torch.Tensor:
    """Sum over trained tokens of -log p(label | earlier tokens), labels shifted as in causal-LM training."""
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    logits = model(**inputs).logits.float()
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100, reduction="sum")


def packable_examples():
    generator = torch.Generator().manual_seed(0)
    examples = []
    for length in (7, 5, 4, 3, 2):
        ids = torch.randint(7, 100, (length,), generator=generator).tolist()
        examples.append(TokenizedSFT(ids, [-100, -100] + ids[2:]))
    return examples


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("attention", ["chosen", "additive", "position_ids"])
def test_packed_row_loss_equals_the_sum_of_its_examples_losses(tiny_model, implementation, attention):
    tiny_model.set_attn_implementation(implementation)
    attention = packed_attention_for(implementation) if attention == "chosen" else attention
    examples = packable_examples()
    rows = pack_sft(examples, max_length=12)
    assert [row.seq_lens for row in rows] == [[7, 5], [4, 3, 2]]
    batch = collate_packed(rows, PAD, attention=attention)
    assert batch["input_ids"].shape == (2, 12) and batch["labels"][1, 9:].tolist() == [-100] * 3  # padding
    with torch.no_grad():
        separate = sum(summed_loss(tiny_model, collate_sft([item], PAD)) for item in examples)
        packed = summed_loss(tiny_model, {**batch, "use_cache": False})
        # Without the block mask and restarting positions, later examples see earlier ones: a different loss.
        leaking = summed_loss(tiny_model, {"input_ids": batch["input_ids"], "labels": batch["labels"]})
    torch.testing.assert_close(packed, separate, rtol=1e-5, atol=1e-5)
    assert (leaking - separate).abs() > 1e-2


@pytest.mark.parametrize("implementation, attention, call", [("eager", "bool", {}), ("sdpa", "position_ids", {"use_cache": True})])
def test_the_documented_ways_packing_goes_wrong_still_go_wrong(tiny_model, implementation, attention, call):
    """Eager attention adds a boolean mask instead of applying it; with a cache, position_ids are not read as packing."""
    tiny_model.set_attn_implementation(implementation)
    examples = packable_examples()
    batch = collate_packed(pack_sft(examples, max_length=12), PAD, attention=attention)
    with torch.no_grad():
        separate = sum(summed_loss(tiny_model, collate_sft([item], PAD)) for item in examples)
        packed = summed_loss(tiny_model, {**batch, **call})
    assert (packed - separate).abs() > 1e-2  # float32 noise on these sums is about 1e-5
    with pytest.raises(ValueError, match="flash-attention would need one flattened row per batch"):
        packed_attention_for("flash_attention_2")
