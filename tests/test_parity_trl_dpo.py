"""Parity with TRL (STYLE.md level b): on the same tiny model and batch, STEMA's per-sequence
log-probs and DPO loss equal those of TRL's `DPOTrainer` within 1e-5, IPO likewise where the two
definitions match, and KTO's loss equals `KTOTrainer`'s.

Both sides load the same folders: a policy and a different reference (tiny Llamas whose weights are
drawn with a large spread, so a mask off by one token or a wrong reference moves the numbers far
beyond the tolerance). TRL tokenizes the records and collates its batch; STEMA's algorithm collates
the same token ids (checked equal to TRL's tensors) and computes everything with its own code:
`completion_token_logprobs` (LM head at completion positions only, fused kernel), the registered
preference losses, a frozen reference model.

Where the definitions differ (documented in `stema.losses.preference`):
- IPO: TRL's loss_type="ipo" divides each completion's log-ratio by its token count; that is STEMA's
  `ipo` on token-averaged log-probs (`average_logprobs=true`). With summed log-probs (STEMA's
  default, the paper's sequence log-probs) the two differ, as checked below.
- Label smoothing: TRL 1.16's "sigmoid" ignores it; STEMA's `dpo` applies cDPO's. Compared at 0.
- KTO: TRL estimates z0 per device batch from completions rotated by one at dataset preparation;
  STEMA per global batch from completions rotated by one within it. With the whole data set as one
  batch in its original order both are (x_i, y_{i-1}) and the losses agree.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset, disable_progress_bars  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer  # noqa: E402

from stema.config import KTOLossConfig, ModelConfig, PreferenceConfig  # noqa: E402
from stema.data import PreferenceExample, TokenizedUnpaired, tokenize_preference  # noqa: E402
from stema.data.tokenize import IGNORE_INDEX, TokenizedPair  # noqa: E402
from stema.models.loading import load_policy, load_tokenizer  # noqa: E402
from stema.models.tiny import TinyModelSpec  # noqa: E402
from stema.trainers.dpo import DPOAlgorithm  # noqa: E402
from stema.trainers.kto import KTOAlgorithm  # noqa: E402
from stema.training.logprobs import ReferenceModel, completion_token_logprobs, sequence_logprobs  # noqa: E402

from tiny_models import save_spread_model  # noqa: E402

TOLERANCE = 1e-5
GRADIENT_TOLERANCE = 1e-4  # max |g_stema - g_trl| / max |g|: fp32 round-off only
SPEC = TinyModelSpec(hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96)
WEIGHT_STD = 0.3
BETA = 0.1

PAIRS = [
    {
        "prompt": [{"role": "user", "content": "What is 2+2?"}],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5, I think"}],
    },
    {
        "prompt": [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "Capital of France?"}],
        "chosen": [{"role": "assistant", "content": "Paris."}],
        "rejected": [{"role": "assistant", "content": "Rome"}],
    },
    {
        "prompt": [{"role": "user", "content": "Count: 1 2 3"}],
        "chosen": [{"role": "assistant", "content": "4 5 6 7 8"}],
        "rejected": [{"role": "assistant", "content": "9"}],
    },
]
UNPAIRED = [
    {"prompt": PAIRS[0]["prompt"], "completion": PAIRS[0]["chosen"], "label": True},
    {"prompt": PAIRS[1]["prompt"], "completion": PAIRS[1]["rejected"], "label": False},
    {"prompt": PAIRS[2]["prompt"], "completion": PAIRS[2]["chosen"], "label": True},
    {"prompt": PAIRS[0]["prompt"], "completion": PAIRS[0]["rejected"], "label": False},
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(policy folder, reference folder): two different tiny Llamas."""
    disable_progress_bars()
    root = tmp_path_factory.mktemp("dpo_parity")
    return save_spread_model(root / "policy", SPEC, seed=3, std=WEIGHT_STD), save_spread_model(root / "reference", SPEC, seed=4, std=WEIGHT_STD)


def trl_arguments(config_class, tmp_path, *, batch_size: int, **options):
    return config_class(
        output_dir=str(tmp_path / "trl"),
        report_to=[],
        bf16=False,
        use_cpu=True,
        activation_checkpointing=False,
        per_device_train_batch_size=batch_size,
        disable_tqdm=True,
        beta=BETA,
        **options,
    )


def load_fp32(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def trl_dpo(folders, tmp_path, loss_type: str):
    """(trainer, TRL's rows, TRL's collated batch) for `PAIRS`."""
    policy_path, reference_path = folders
    trainer = DPOTrainer(
        model=load_fp32(policy_path),
        ref_model=load_fp32(reference_path),
        args=trl_arguments(DPOConfig, tmp_path, batch_size=len(PAIRS), loss_type=[loss_type]),
        train_dataset=Dataset.from_list(PAIRS),
        processing_class=load_tokenizer(policy_path),
    )
    rows = [trainer.train_dataset[index] for index in range(len(trainer.train_dataset))]
    return trainer, rows, trainer.data_collator(rows)


def trl_sequence_logprobs(model, batch) -> torch.Tensor:
    """`[2B]` summed completion log-probs exactly as DPOTrainer computes them."""
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels, fused_lm_head=True, use_cache=False)
    return outputs.log_probs.sum(dim=1)


def pairs_from_trl_rows(rows) -> list[TokenizedPair]:
    pairs = []
    for row in rows:
        prompt = row["prompt_ids"]
        hidden = [IGNORE_INDEX] * len(prompt)
        pairs.append(
            TokenizedPair(
                prompt_ids=prompt,
                chosen_ids=prompt + row["chosen_ids"],
                rejected_ids=prompt + row["rejected_ids"],
                chosen_labels=hidden + row["chosen_ids"],
                rejected_labels=hidden + row["rejected_ids"],
            )
        )
    return pairs


def stema_dpo(folders, tmp_path, preference: PreferenceConfig):
    """(STEMA policy, DPOAlgorithm with a frozen reference loaded from the reference folder)."""
    policy_path, reference_path = folders
    policy, tokenizer = load_policy(ModelConfig(path=str(policy_path)), cache_dir=tmp_path / "cache")
    reference_model, _ = load_policy(ModelConfig(path=str(reference_path)), cache_dir=tmp_path / "cache")
    reference = ReferenceModel(reference_model.eval().requires_grad_(False), adapters_disabled=False)
    algorithm = DPOAlgorithm(pad_id=tokenizer.pad_token_id, preference=preference, reference=reference, micro_batch_size=8)
    return policy.train(), algorithm


def test_dpo_logprobs_loss_and_gradients_equal_trl(folders, tmp_path):
    trainer, rows, batch = trl_dpo(folders, tmp_path, "sigmoid")
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, dict(batch))
    with torch.no_grad():
        trl_policy_logps = trl_sequence_logprobs(trainer.model, batch)
        trl_reference_logps = trl_sequence_logprobs(trainer.ref_model, batch)

    policy, algorithm = stema_dpo(folders, tmp_path, PreferenceConfig(loss="dpo", beta=BETA))
    pairs = pairs_from_trl_rows(rows)
    stema_batch = algorithm.collate(pairs)
    for key in ("input_ids", "attention_mask"):
        assert torch.equal(stema_batch[key], batch[key]), key
    assert torch.equal(stema_batch["labels"] != IGNORE_INDEX, batch["completion_mask"].bool())

    with torch.no_grad():
        policy_logps = sequence_logprobs(*completion_token_logprobs(policy, stema_batch))
    reference_logps = torch.cat(algorithm.reference_logps(stema_batch))
    torch.testing.assert_close(policy_logps, trl_policy_logps, rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(reference_logps, trl_reference_logps, rtol=0, atol=TOLERANCE)
    assert (policy_logps - reference_logps).abs().min() > 0.5  # policy and reference really differ

    stema_loss, metrics = algorithm.loss(policy, stema_batch, algorithm.denominators(pairs))
    assert stema_loss.item() == pytest.approx(trl_loss.item(), abs=TOLERANCE)
    assert 0.05 < trl_loss.item() and abs(trl_loss.item() - 0.6931) > 0.05
    assert metrics["rewards/margin"].item() == pytest.approx(trainer._metrics["train"]["rewards/margins"][-1], abs=TOLERANCE)
    assert metrics["rewards/accuracy"].item() == pytest.approx(trainer._metrics["train"]["rewards/accuracies"][-1])

    trl_loss.backward()
    stema_loss.backward()
    grads_stema = {name: p.grad for name, p in policy.named_parameters() if p.grad is not None}
    grads_trl = {name: p.grad for name, p in trainer.model.named_parameters() if p.grad is not None}
    assert grads_stema and set(grads_stema) == set(grads_trl)
    scale = max(float(grad.abs().max()) for grad in grads_trl.values())
    assert max(float((grads_stema[name] - grads_trl[name]).abs().max()) for name in grads_trl) / scale < GRADIENT_TOLERANCE


def test_stema_tokenizes_the_records_as_trl_does(folders, tmp_path):
    _, rows, _ = trl_dpo(folders, tmp_path, "sigmoid")
    tokenizer = load_tokenizer(folders[0])
    for index, (record, theirs) in enumerate(zip(PAIRS, pairs_from_trl_rows(rows))):
        example = PreferenceExample(record["prompt"], record["chosen"], record["rejected"], f"record {index}")
        ours = tokenize_preference(example, tokenizer, max_length=1024)
        assert ours == TokenizedPair(**{**theirs.__dict__, "location": f"record {index}"})


def test_ipo_equals_trl_on_token_averaged_logprobs_and_differs_on_sums(folders, tmp_path):
    trainer, rows, batch = trl_dpo(folders, tmp_path, "ipo")
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, dict(batch))
    pairs = pairs_from_trl_rows(rows)
    losses = {}
    for average in (True, False):
        policy, algorithm = stema_dpo(folders, tmp_path, PreferenceConfig(loss="ipo", beta=BETA, average_logprobs=average))
        with torch.no_grad():
            losses[average] = algorithm.loss(policy, algorithm.collate(pairs), algorithm.denominators(pairs))[0].item()
    assert losses[True] == pytest.approx(trl_loss.item(), abs=TOLERANCE)
    assert abs(losses[False] - trl_loss.item()) > 100 * TOLERANCE


def test_kto_loss_equals_trl_on_one_batch_in_order(folders, tmp_path):
    policy_path, reference_path = folders
    trainer = KTOTrainer(
        model=load_fp32(policy_path),
        ref_model=load_fp32(reference_path),
        args=trl_arguments(KTOConfig, tmp_path, batch_size=len(UNPAIRED)),
        train_dataset=Dataset.from_list(UNPAIRED),
        processing_class=load_tokenizer(policy_path),
    )
    trainer.model.train()
    rows = [trainer.train_dataset[index] for index in range(len(trainer.train_dataset))]
    batch = trainer.data_collator(rows)
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, dict(batch))
    trl_kl = trainer._metrics["train"]["kl"][-1]
    assert trl_kl > 0.5  # the KL baseline is not clamped to 0 here, so it is really compared

    policy, tokenizer = load_policy(ModelConfig(path=str(policy_path)), cache_dir=tmp_path / "cache")
    reference_model, _ = load_policy(ModelConfig(path=str(reference_path)), cache_dir=tmp_path / "cache")
    examples = [
        TokenizedUnpaired(
            row["prompt_ids"] + row["completion_ids"], [IGNORE_INDEX] * len(row["prompt_ids"]) + row["completion_ids"], row["label"]
        )
        for row in rows
    ]
    algorithm = KTOAlgorithm(
        policy=policy.train(),
        reference=ReferenceModel(reference_model.eval().requires_grad_(False), adapters_disabled=False),
        pad_id=tokenizer.pad_token_id,
        kto=KTOLossConfig(beta=BETA),
        micro_batch_size=8,
        max_length=1024,
        autocast=contextlib.nullcontext,
    )
    denominators = algorithm.denominators(examples)
    assert denominators["kl_baseline"] == pytest.approx(trl_kl, abs=TOLERANCE)
    with torch.no_grad():
        stema_loss, _ = algorithm.loss(policy, algorithm.collate(examples), denominators)
    assert stema_loss.item() == pytest.approx(trl_loss.item(), abs=TOLERANCE)
