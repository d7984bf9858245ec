"""Parity with TRL (STYLE.md level b): STEMA's SFT and pairwise reward-model losses equal the losses
TRL's `SFTTrainer.compute_loss` and `RewardTrainer.compute_loss` return on the same batch, and their
gradients agree.

Both sides load the same tiny Llama folder (weights re-drawn with a large spread, so per-token
losses differ a lot from token to token and a mask that is off by one token moves the loss far
beyond the tolerance); the reward model is that folder with STEMA's seeded reward head
(`load_reward_model`), saved and loaded by both. TRL builds its trainer from a `datasets.Dataset` of
the records, and the batch is the first one of TRL's own dataloader; STEMA's loss
(`SFTAlgorithm.loss`, `PairwiseRewardAlgorithm.loss`) is computed by STEMA's own code on those very
tensors (STEMA's collator, given TRL's unpadded rows, must rebuild them exactly), with the global
denominator of that batch. The gradients of both losses with respect to every parameter agree.

How the two tokenizations compare (checked below, for SFT and for preference pairs):

- Conversational data (lists of messages): identical. Both render through the chat template, and
  the trained tokens are the same: TRL's completion mask starts where the prompt rendered with the
  generation prompt ends (its common prefix with the full rendering), STEMA's trained span of the
  assistant turn starts at the same place and runs to the end of the turn's rendering.
- Plain-text data: STEMA's sequence is TRL's with a BOS token in front. STEMA adds BOS to a plain
  prompt when the tokenizer has one distinct from EOS (what generation from that prompt sees);
  TRL calls `tokenizer(prompt + completion + eos)`, which adds BOS only when the tokenizer's
  post-processor does (the tiny character tokenizer's does not, Llama's does). The trained mask is
  otherwise the same (the completion and its EOS), so STEMA's labels are TRL's with -100 in front.
  One more difference that a character tokenizer cannot show: TRL tokenizes prompt + completion as
  one string (a merge across the boundary moves it), STEMA tokenizes them apart.
  The losses are compared on TRL's tensors.
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset, disable_progress_bars
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from trl import RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

from stema.config import ModelConfig
from stema.data import PreferenceExample, SFTExample, tokenize_preference, tokenize_sft
from stema.data.tokenize import IGNORE_INDEX, TokenizedPair, TokenizedSFT
from stema.models.loading import load_policy, load_reward_model, load_tokenizer
from stema.models.tiny import TinyModelSpec
from stema.trainers.reward import PairwiseRewardAlgorithm
from stema.trainers.sft import SFTAlgorithm

from tiny_models import save_spread_model

# TRL's configs default to gradient_checkpointing=True, which transformers 5 reports as a deprecated alias.
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")

LOSS_TOLERANCE = 1e-5
# Gradients: max |g_stema - g_trl| over all parameters, relative to max |g| (fp32 round-off only).
GRADIENT_TOLERANCE = 1e-4
SPEC = TinyModelSpec(hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96, seed=3)
WEIGHT_STD = 0.3

SFT_PLAIN = [
    {"prompt": "What is 12+7?", "completion": " 19"},
    {"prompt": "Name a colour.", "completion": " Blue, like the sky."},
    {"prompt": "Count: 1 2 3", "completion": " 4 5 6 7 8"},
    {"prompt": "Hi", "completion": " Hello! How can I help you today?"},
]
SFT_CHAT = [
    {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12+7?"}],
        "completion": [{"role": "assistant", "content": "19"}],
    },
    {"prompt": [{"role": "user", "content": "Name a colour."}], "completion": [{"role": "assistant", "content": "Blue, like the sky."}]},
    {"prompt": [{"role": "user", "content": "Count: 1 2 3"}], "completion": [{"role": "assistant", "content": "4 5 6 7 8"}]},
]
PAIRS_PLAIN = [
    {"prompt": "What is 2+2?", "chosen": " 4", "rejected": " 5, I think", "margin": 1.5},
    {"prompt": "Capital of France?", "chosen": " Paris.", "rejected": " Rome", "margin": 0.25},
    {"prompt": "Say hi", "chosen": " Hi there!", "rejected": " No.", "margin": 0.0},
]
PAIRS_CHAT = [
    {
        "prompt": [{"role": "user", "content": "What is 2+2?"}],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5, I think"}],
        "margin": 1.5,
    },
    {
        "prompt": [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "Capital of France?"}],
        "chosen": [{"role": "assistant", "content": "Paris."}],
        "rejected": [{"role": "assistant", "content": "Rome"}],
        "margin": 0.25,
    },
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama folder (model + character tokenizer) whose weights are drawn from N(0, 0.3^2)."""
    disable_progress_bars()
    return save_spread_model(tmp_path_factory.mktemp("tiny_parity"), SPEC, seed=SPEC.seed, std=WEIGHT_STD)


def model_config(path) -> ModelConfig:
    return ModelConfig(path=str(path), dtype="float32", attn_implementation="sdpa")


def unpadded_rows(batch: dict[str, torch.Tensor], key: str) -> list[list[int]]:
    """Each row of `batch[key]` `[N, T]` without its right padding (where attention_mask is 0)."""
    return [row[mask.bool()].tolist() for row, mask in zip(batch[key], batch["attention_mask"])]


def first_batch(trainer) -> dict[str, torch.Tensor]:
    """The first batch of the trainer's own dataloader (all the records, in its sampler's order)."""
    return next(iter(trainer.get_train_dataloader()))


def max_relative_gradient_difference(model_a: torch.nn.Module, model_b: torch.nn.Module) -> float:
    """max |grad_a - grad_b| / max |grad_a| over the parameters both models have by name."""
    grads_a = {name: p.grad for name, p in model_a.named_parameters() if p.grad is not None}
    grads_b = {name: p.grad for name, p in model_b.named_parameters() if p.grad is not None}
    assert grads_a and set(grads_a) == set(grads_b)
    scale = max(float(grad.abs().max()) for grad in grads_a.values())
    difference = max(float((grads_a[name] - grads_b[name]).abs().max()) for name in grads_a)
    return difference / scale


# ---------------------------------------------------------------------------------------------
# SFT
# ---------------------------------------------------------------------------------------------


def trl_sft_trainer(model_dir, records, tmp_path) -> SFTTrainer:
    """TRL's SFTTrainer on its own copy of the model and tokenizer (prompt-completion data, loss on
    completions only, fp32 on the CPU)."""
    args = SFTConfig(
        output_dir=str(tmp_path / "trl_sft"),
        report_to=[],
        bf16=False,
        use_cpu=True,
        completion_only_loss=True,
        per_device_train_batch_size=len(records),
        disable_tqdm=True,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(records), processing_class=load_tokenizer(model_dir))


def trl_sft_batch(trainer: SFTTrainer) -> tuple[list[TokenizedSFT], dict[str, torch.Tensor]]:
    """The first batch of TRL's dataloader, and its rows as STEMA examples (TRL's tokens and labels)."""
    batch = first_batch(trainer)
    rows = zip(unpadded_rows(batch, "input_ids"), unpadded_rows(batch, "labels"))
    return [TokenizedSFT(ids, labels, f"row {index}") for index, (ids, labels) in enumerate(rows)], batch


def stema_sft(model_dir, tmp_path):
    model, tokenizer = load_policy(model_config(model_dir), cache_dir=tmp_path / "cache")
    algorithm = SFTAlgorithm(
        pad_id=tokenizer.pad_token_id, packing=False, max_length=1024, micro_batch_size=8, attn_implementation="sdpa"
    )
    return model, tokenizer, algorithm


def stema_sft_examples(records, tokenizer) -> list[TokenizedSFT]:
    examples = [SFTExample(record["prompt"], record["completion"], f"record {i}") for i, record in enumerate(records)]
    return [tokenize_sft(example, tokenizer, max_length=1024) for example in examples]


def sft_sequences(examples, *, prefix: tuple[int, int] | None = None) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of each example, sorted (the dataloader shuffles); `prefix` = (token,
    label) put in front of every example first."""
    if prefix is None:
        return sorted((example.input_ids, example.labels) for example in examples)
    token, label = prefix
    return sorted(([token] + example.input_ids, [label] + example.labels) for example in examples)


def sft_losses(model_dir, records, tmp_path):
    """(TRL loss, STEMA loss, both models, both tokenizations, TRL's batch) on TRL's batch."""
    trainer = trl_sft_trainer(model_dir, records, tmp_path)
    trl_examples, batch = trl_sft_batch(trainer)
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, dict(batch))

    model, tokenizer, algorithm = stema_sft(model_dir, tmp_path)
    model.train()
    stema_batch = algorithm.collate(trl_examples)
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(stema_batch[key], batch[key]), key
    stema_loss, _ = algorithm.loss(model, stema_batch, algorithm.denominators(trl_examples))
    return trl_loss, stema_loss, trainer.model, model, trl_examples, stema_sft_examples(records, tokenizer), algorithm


def test_sft_loss_equals_trl_on_plain_prompt_completion_data(model_dir, tmp_path):
    trl_loss, stema_loss, _, model, trl_examples, stema_examples, algorithm = sft_losses(model_dir, SFT_PLAIN, tmp_path)
    assert stema_loss.item() == pytest.approx(trl_loss.item(), abs=LOSS_TOLERANCE)
    assert 1.0 < trl_loss.item() < 50.0

    # STEMA's own tokenization: TRL's tokens with BOS in front, the same trained tokens.
    bos = load_tokenizer(model_dir).bos_token_id
    assert sft_sequences(stema_examples) == sft_sequences(trl_examples, prefix=(bos, IGNORE_INDEX))

    # The comparison can fail: training on the prompt tokens too gives a clearly different loss.
    full = [TokenizedSFT(example.input_ids, example.input_ids) for example in trl_examples]
    with torch.no_grad():
        full_loss, _ = algorithm.loss(model, algorithm.collate(full), algorithm.denominators(full))
    assert abs(full_loss.item() - trl_loss.item()) > 100 * LOSS_TOLERANCE


def test_sft_conversational_tokenization_loss_and_gradients_equal_trl(model_dir, tmp_path):
    trl_loss, stema_loss, trl_model, model, trl_examples, stema_examples, algorithm = sft_losses(model_dir, SFT_CHAT, tmp_path)
    assert stema_loss.item() == pytest.approx(trl_loss.item(), abs=LOSS_TOLERANCE)

    # Same token ids and the same trained tokens from STEMA's own tokenization of the records.
    assert sft_sequences(stema_examples) == sft_sequences(trl_examples)

    trl_loss.backward()
    stema_loss.backward()
    assert max_relative_gradient_difference(model, trl_model) < GRADIENT_TOLERANCE


def test_sft_global_denominator_over_micro_batches_equals_trl_full_batch(model_dir, tmp_path):
    """Two micro-batches, each divided by the token count of the whole batch, add up to TRL's loss."""
    trl_loss, _, _, model, trl_examples, _, algorithm = sft_losses(model_dir, SFT_PLAIN, tmp_path)
    denominators = algorithm.denominators(trl_examples)
    with torch.no_grad():
        halves = [algorithm.loss(model, algorithm.collate(part), denominators)[0] for part in (trl_examples[:1], trl_examples[1:])]
    assert float(sum(halves)) == pytest.approx(trl_loss.item(), abs=LOSS_TOLERANCE)


# ---------------------------------------------------------------------------------------------
# Pairwise reward model
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reward_model_dir(model_dir, tmp_path_factory):
    """The tiny model as a sequence classifier with STEMA's seeded reward head, saved as a folder."""
    model, tokenizer = load_reward_model(model_config(model_dir), num_labels=1, cache_dir=tmp_path_factory.mktemp("cache"), seed=5)
    path = tmp_path_factory.mktemp("tiny_reward")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def trl_reward_trainer(reward_model_dir, records, tmp_path, *, center_rewards_coefficient) -> RewardTrainer:
    args = RewardConfig(
        output_dir=str(tmp_path / "trl_rm"),
        report_to=[],
        bf16=False,
        use_cpu=True,
        per_device_train_batch_size=len(records),
        center_rewards_coefficient=center_rewards_coefficient,
        disable_tqdm=True,
    )
    model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir, dtype=torch.float32)
    return RewardTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(records), processing_class=load_tokenizer(reward_model_dir)
    )


def reward_losses(reward_model_dir, records, tmp_path, *, margin: bool, center_rewards_coefficient: float | None):
    """(TRL loss, STEMA loss, both models, TRL's examples as STEMA pairs, STEMA's own pairs)."""
    if not margin:
        records = [{key: value for key, value in record.items() if key != "margin"} for record in records]
    trainer = trl_reward_trainer(reward_model_dir, records, tmp_path, center_rewards_coefficient=center_rewards_coefficient)
    batch = first_batch(trainer)
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, dict(batch))

    model, tokenizer = load_reward_model(model_config(reward_model_dir), num_labels=1, cache_dir=tmp_path / "cache")
    model.train()
    algorithm = PairwiseRewardAlgorithm(
        pad_id=tokenizer.pad_token_id,
        use_margin=margin,
        center_rewards_coefficient=center_rewards_coefficient or 0.0,
        micro_batch_size=8,
    )
    rows = unpadded_rows(batch, "input_ids")  # chosen sequences, then the rejected ones of the same pairs
    num_pairs = len(rows) // 2
    trl_pairs = [
        TokenizedPair(
            prompt_ids=[],
            chosen_ids=rows[index],
            rejected_ids=rows[num_pairs + index],
            chosen_labels=rows[index],
            rejected_labels=rows[num_pairs + index],
            margin=float(batch["margin"][index]) if margin else None,
        )
        for index in range(num_pairs)
    ]
    stema_batch = algorithm.collate(trl_pairs)
    for key in ("input_ids", "attention_mask") + (("margin",) if margin else ()):
        assert torch.equal(stema_batch[key], batch[key]), key
    stema_loss, _ = algorithm.loss(model, stema_batch, algorithm.denominators(trl_pairs))
    examples = [
        PreferenceExample(record["prompt"], record["chosen"], record["rejected"], f"record {i}", margin=record.get("margin"))
        for i, record in enumerate(records)
    ]
    stema_pairs = [tokenize_preference(example, tokenizer, max_length=1024) for example in examples]
    return trl_loss, stema_loss, trainer.model, model, trl_pairs, stema_pairs


def pair_sequences(pairs, *, prefix: list[int] | None = None) -> list[tuple[list[int], list[int]]]:
    """(chosen_ids, rejected_ids) of each pair, sorted, with `prefix` in front of both."""
    prefix = prefix or []
    return sorted((prefix + pair.chosen_ids, prefix + pair.rejected_ids) for pair in pairs)


@pytest.mark.parametrize("margin", [False, True], ids=["no_margin", "margin"])
@pytest.mark.parametrize("center_rewards_coefficient", [None, 0.05], ids=["uncentred", "centred"])
def test_bradley_terry_loss_equals_trl_reward_trainer(reward_model_dir, tmp_path, margin, center_rewards_coefficient):
    trl_loss, stema_loss, _, _, trl_pairs, stema_pairs = reward_losses(
        reward_model_dir, PAIRS_PLAIN, tmp_path, margin=margin, center_rewards_coefficient=center_rewards_coefficient
    )
    assert stema_loss.item() == pytest.approx(trl_loss.item(), abs=LOSS_TOLERANCE)
    # Plain text: STEMA's sequences are TRL's with BOS in front.
    bos = load_tokenizer(reward_model_dir).bos_token_id
    assert pair_sequences(stema_pairs) == pair_sequences(trl_pairs, prefix=[bos])


def test_bradley_terry_terms_change_the_loss(reward_model_dir, tmp_path):
    """The margin and the centring term each move the loss well past the tolerance, so the
    parametrized parity test above would notice either being dropped or misapplied."""
    losses = {
        (margin, centre): reward_losses(
            reward_model_dir, PAIRS_PLAIN, tmp_path / f"{margin}{centre}", margin=margin, center_rewards_coefficient=centre
        )[1].item()
        for margin, centre in [(False, None), (True, None), (False, 0.05)]
    }
    base = losses[(False, None)]
    assert abs(losses[(True, None)] - base) > 100 * LOSS_TOLERANCE
    assert abs(losses[(False, 0.05)] - base) > 100 * LOSS_TOLERANCE


def test_conversational_pairs_tokenize_like_trl_and_gradients_agree(reward_model_dir, tmp_path):
    trl_loss, stema_loss, trl_model, model, trl_pairs, stema_pairs = reward_losses(
        reward_model_dir, PAIRS_CHAT, tmp_path, margin=True, center_rewards_coefficient=0.05
    )
    assert stema_loss.item() == pytest.approx(trl_loss.item(), abs=LOSS_TOLERANCE)
    assert pair_sequences(stema_pairs) == pair_sequences(trl_pairs)
    trl_loss.backward()
    stema_loss.backward()
    assert max_relative_gradient_difference(model, trl_model) < GRADIENT_TOLERANCE
