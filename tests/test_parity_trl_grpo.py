"""Parity with TRL (STYLE.md level b): STEMA's PPO policy loss with GRPO's settings (k3 KL in the
loss, token-level mean, ratio clipping at 0.2, log-probs at the sampling temperature) equals what
TRL's `GRPOTrainer._compute_loss` returns for `loss_type="bnpo"` on the same batch, and the
gradients agree; STEMA's `grpo` advantages equal TRL's group normalization (TRL divides by
std + 1e-4, so that is the eps given to STEMA here). TRL 1.16 by default multiplies the KL term by
the importance ratio (`use_bias_correction_kl`); STEMA's loss has the plain k3 term of the GRPO
paper, so the comparison turns that correction off.

The batch: 4 sequences (2 prompts x 2 samples) of equal-length prompts and right-padded
completions, old and reference log-probs perturbed away from the current policy so that clipping
and the KL term both act; the tiny built-in model on both sides.
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset, disable_progress_bars
from trl import GRPOConfig, GRPOTrainer

from stema.losses.advantages import AdvantageInputs, estimate_advantages
from stema.losses.ppo import ppo_policy_loss
from stema.models.tiny import save_tiny_model
from stema.training.logprobs import IGNORE_INDEX, completion_token_logprobs

TEMPERATURE = 0.7
BETA = 0.04


def zero_reward(prompts, completions, **kwargs):
    return [0.0 for _ in prompts]


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    disable_progress_bars()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    args = GRPOConfig(
        output_dir=str(tmp_path_factory.mktemp("trl")), per_device_train_batch_size=4, num_generations=2, beta=BETA,
        loss_type="bnpo", temperature=TEMPERATURE, max_completion_length=8, use_cpu=True, report_to=[], bf16=False,
        disable_tqdm=True, use_bias_correction_kl=False,
    )
    return GRPOTrainer(model=model, reward_funcs=zero_reward, args=args, processing_class=tokenizer,
                       train_dataset=Dataset.from_list([{"prompt": "What is 1+2?"}] * 4))


def test_grpo_policy_loss_and_gradients_equal_trl(trainer):
    generator = torch.Generator().manual_seed(0)
    model = trainer.model
    prompt_ids = torch.randint(10, 100, (4, 6), generator=generator)
    completion_ids = torch.randint(10, 100, (4, 5), generator=generator)
    completion_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]])
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([torch.ones_like(prompt_ids), completion_mask], dim=1)
    labels = torch.cat([torch.full_like(prompt_ids, IGNORE_INDEX), completion_ids.masked_fill(completion_mask == 0, IGNORE_INDEX)], 1)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    model.eval()  # TRL divides by the accumulation steps in train mode only; there is no dropout
    with torch.no_grad():
        current, mask = completion_token_logprobs(model, batch, temperature=TEMPERATURE)  # [4, 11]
    completion_columns = slice(5, 10)  # action t predicts token t + 1: completion tokens 6..10
    assert torch.equal(mask[:, completion_columns], completion_mask.bool())
    old = current + 0.3 * torch.randn(current.shape, generator=generator) * mask
    ref = current + 0.2 * torch.randn(current.shape, generator=generator) * mask
    advantages = torch.tensor([1.5, -0.5, 0.7, -1.2])

    trl_inputs = {
        "prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids), "completion_ids": completion_ids,
        "completion_mask": completion_mask, "advantages": advantages,
        "old_per_token_logps": old[:, completion_columns], "ref_per_token_logps": ref[:, completion_columns],
    }
    model.zero_grad()
    trl_loss = trainer._compute_loss(model, trl_inputs)
    trl_loss.backward()
    trl_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    logprobs, mask = completion_token_logprobs(model, batch, temperature=TEMPERATURE)
    loss, _ = ppo_policy_loss(logprobs, old, advantages[:, None] * mask, mask, clip_ratio=0.2, num_tokens=int(mask.sum()),
                              ref_logprobs=ref, kl_coef=BETA, kl_estimator="k3")
    loss.backward()
    torch.testing.assert_close(loss, trl_loss, rtol=1e-5, atol=1e-6)
    assert trl_grads
    for name, parameter in model.named_parameters():
        if name in trl_grads:
            torch.testing.assert_close(parameter.grad, trl_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_grpo_advantages_equal_trl_group_normalization():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.5, 0.25, 0.0, 1.0, 1.0])
    groups = 2
    per_group = rewards.view(groups, -1)
    trl = (rewards - per_group.mean(1).repeat_interleave(4)) / (per_group.std(1).repeat_interleave(4) + 1e-4)
    mask = torch.zeros(8, 3, dtype=torch.bool)
    mask[:, 1] = True
    token_rewards = torch.zeros(8, 3)
    token_rewards[:, 1] = rewards
    inputs = AdvantageInputs(token_rewards=token_rewards, mask=mask, values=None,
                             group_ids=torch.arange(groups).repeat_interleave(4), eps=1e-4)
    advantages, _ = estimate_advantages("grpo", inputs)
    torch.testing.assert_close(advantages[:, 1], trl)
