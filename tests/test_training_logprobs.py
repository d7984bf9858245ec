"""Completion log-probs with the LM head at labelled positions only equal the full forward's
log_softmax on every architecture family; sequence sums and means; the reference model in both
forms (frozen copy, LoRA adapters disabled) and its release."""

import pytest
import torch

from stema.config import LoraConfig, ModelConfig
from stema.models import families, loading
from stema.training.logprobs import (
    ReferenceModel,
    completion_token_logprobs,
    lm_head_parts,
    next_token_labels,
    sequence_logprobs,
)


def make_batch(seed: int = 0):
    """Three right-padded rows; labels -100 on a 5-token prompt and on padding."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(10, 90, (3, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 9:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :5] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def full_forward_logprobs(model, batch):
    """log_softmax of the model's own logits at the next-token labels, 0 where unlabelled."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = next_token_labels(batch["labels"])
    picked = torch.log_softmax(logits.float(), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return picked * (targets != -100)


@pytest.mark.parametrize("family", families.FAMILIES)
def test_labelled_positions_only_equal_the_full_forward(family):
    model = families.build_family_model(family)
    assert lm_head_parts(model) is not None
    batch = make_batch()
    logprobs, mask = completion_token_logprobs(model, batch)
    torch.testing.assert_close(logprobs, full_forward_logprobs(model, batch), rtol=0, atol=2e-6)
    assert mask.sum() == (next_token_labels(batch["labels"]) != -100).sum()


def test_gradients_flow_to_the_backbone_and_head_like_the_full_forward():
    model = families.build_family_model("llama")
    batch = make_batch(1)
    completion_token_logprobs(model, batch)[0].sum().backward()
    ours = {name: parameter.grad.clone() for name, parameter in model.named_parameters()}
    model.zero_grad()
    full_forward_logprobs(model, batch).sum().backward()
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(ours[name], parameter.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_soft_capped_logits_take_the_full_forward():
    model = families.build_family_model("llama")
    model.config.final_logit_softcapping = 30.0  # as Gemma 2: logits are no longer lm_head(hidden)
    assert lm_head_parts(model) is None
    model.config.final_logit_softcapping = None
    assert lm_head_parts(model) is not None


def test_sequence_sums_and_token_means():
    token_logprobs = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    torch.testing.assert_close(sequence_logprobs(token_logprobs, mask), torch.tensor([-3.0, -0.5]))
    torch.testing.assert_close(sequence_logprobs(token_logprobs, mask, average=True), torch.tensor([-1.5, -0.5]))


def test_frozen_copy_reference_keeps_the_starting_weights():
    policy = families.build_family_model("qwen2")
    reference = ReferenceModel.of(policy)
    batch = make_batch(2)
    before = reference.token_logprobs(batch)[0]
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(0.05)
    torch.testing.assert_close(reference.token_logprobs(batch)[0], before, rtol=0, atol=0)
    assert not any(parameter.requires_grad for parameter in reference.model.parameters())
    reference.release()
    with pytest.raises(RuntimeError, match="released"):
        reference.token_logprobs(batch)


def test_lora_reference_is_the_same_model_with_adapters_disabled(tmp_path):
    path = families.save_family_model(tmp_path / "llama", "llama")
    model_cfg = ModelConfig(path=str(path), lora=LoraConfig(enabled=True, r=4, target_modules=["q_proj", "v_proj"]))
    policy, _ = loading.load_policy(model_cfg, cache_dir=tmp_path)
    reference = ReferenceModel.of(policy)
    assert reference.model is policy and reference.adapters_disabled
    batch = make_batch(3)
    start = reference.token_logprobs(batch)[0]
    with torch.no_grad():  # train the adapters a little: the policy moves, its reference does not
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.add_(0.1)
    moved = completion_token_logprobs(policy, batch)[0]
    assert (moved - start).abs().max() > 1e-3
    torch.testing.assert_close(reference.token_logprobs(batch)[0], start, rtol=0, atol=1e-6)
