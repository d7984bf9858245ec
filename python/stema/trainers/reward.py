"""Reward models: a pairwise Bradley-Terry scalar reward, or k-attribute regression (SteerLM).

Two readouts of a Bradley-Terry reward (`reward.readout`): `head` (below) and `log_ratio`, the
implicit reward r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)) of a causal LM pi trained from the
starting model pi_ref (Rafailov et al. 2023). Its Bradley-Terry loss -log sigmoid(r_chosen -
r_rejected) is DPO's sigmoid loss, so it trains on `stema.trainers.dpo.train_on_pairs` (reference
log-probs computed once), with `reward.nll_weight` x the chosen responses' NLL as a regularizer;
metrics `accuracy` and `margin` as the head's. The export `hf/` is the trained causal LM with the
reference in `hf/reference/` and `hf/stema_reward.json` naming the readout and beta, which
`stema.rewards.Reward` reads (`reward.model=<run>/hf`). A readout that reads every answer token
through the LM head can check each one; on the demo's arithmetic pairs it is right on 93-95% of
held-out pairs where the head reaches 52-77% (docs/demo.md).

1. Load a causal-LM backbone (or a saved reward model) as a sequence classifier with k outputs; the
   reward of a sequence is the head applied to the hidden state of its last attended token (the
   one reward readout `stema.models.value_head.reward_scores`; with pad == EOS that is the EOS).
2. Pairwise: chosen and rejected sequences of a micro-batch run in ONE forward pass of the
   concatenated `[2B, T]` batch; loss = -log sigmoid(r_chosen - r_rejected [- margin]) summed over
   pairs / pairs in the global batch (optional reward centring, as TRL).
   Regression: MSE against the attribute labels, -100 ignored, / valid labels in the global batch.
3. The shared loop trains, evaluates (pairwise accuracy and margin, or MSE), checkpoints, resumes.
4. Export in Hugging Face format: `AutoModelForSequenceClassification.from_pretrained` loads it and
   scores the same whenever the pad token differs from EOS (`stema.models.value_head` says how it
   differs when they are equal).
"""

from __future__ import annotations

from typing import Sequence

import torch

from stema.config import ConfigError, PreferenceConfig, RMConfig
from stema.data import collate_attributes, collate_pairs, load_attribute_data, load_preference_data
from stema.losses import get_loss
from stema.losses.reward import IGNORE_LABEL
from stema.models.loading import load_reward_model
from stema.models.value_head import reward_scores
from stema.rewards import LOG_RATIO_FILE, LOG_RATIO_REFERENCE
from stema.trainers.dpo import DPOAlgorithm, train_on_pairs
from stema.training import TrainResult
from stema.training.loop import evaluate_sums
from stema.training.setup import fit, place_model, prepare_data, preparing, start_run


def sequence_rewards(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Rewards `[N, k]` (fp32) of the N sequences of a batch, by the one reward readout (each
    sequence's last attended token), as PPO, rs and annotate read the trained model."""
    return reward_scores(model, batch["input_ids"], batch["attention_mask"])


def pooled_rewards(scores: torch.Tensor, batch: dict[str, torch.Tensor], *, pad_id: int) -> torch.Tensor:
    """Rewards `[N, k]` (fp32) from the head's scores at every position `[N, T, k]` (a pipeline's last
    stage), read where the sequence classifier reads them: each row's rightmost non-pad token."""
    positions = torch.arange(scores.shape[1], device=scores.device, dtype=torch.int32)
    last = (positions * (batch["input_ids"] != pad_id).to(scores.device, torch.int32)).argmax(-1)  # [N]
    return scores[torch.arange(scores.shape[0], device=scores.device), last].float()


class PairwiseRewardAlgorithm:
    name = "rm"

    def __init__(self, *, pad_id: int, use_margin: bool, center_rewards_coefficient: float, micro_batch_size: int):
        self.pad_id = pad_id
        self.use_margin = use_margin
        self.center_rewards_coefficient = center_rewards_coefficient
        self.micro_batch_size = micro_batch_size
        self.loss_fn = get_loss("bradley_terry")

    def denominators(self, examples):
        return {"pairs": len(examples)}

    def collate(self, examples):
        batch = collate_pairs(examples, self.pad_id)
        if self.use_margin and "margin" not in batch:
            raise ValueError(f"{examples[0].location}: reward.margin is on but the data has no 'margin' field")
        return batch

    def loss(self, model, batch, denominators):
        return self.loss_of_rewards(sequence_rewards(model, batch), batch, denominators)

    def loss_from_logits(self, logits, batch, denominators):
        return self.loss_of_rewards(pooled_rewards(logits, batch, pad_id=self.pad_id), batch, denominators)

    def loss_of_rewards(self, rewards, batch, denominators):
        """The loss from the rewards `[2B, 1]` of the micro-batch's chosen rows, then its rejected rows."""
        rewards = rewards[:, 0]  # [2B]
        num_pairs = rewards.shape[0] // 2
        return self.loss_fn(
            rewards[:num_pairs],
            rewards[num_pairs:],
            num_pairs=denominators["pairs"],
            margin=batch["margin"] if self.use_margin else None,
            center_rewards_coefficient=self.center_rewards_coefficient,
        )

    def num_tokens(self, batch):
        return int(batch["attention_mask"].sum())

    def evaluate(self, model, examples: Sequence):
        return evaluate_sums(model, self, examples, micro_batch_size=self.micro_batch_size)


class RegressionRewardAlgorithm:
    name = "rm"

    def __init__(self, *, pad_id: int, micro_batch_size: int):
        self.pad_id = pad_id
        self.micro_batch_size = micro_batch_size
        self.loss_fn = get_loss("regression")

    def denominators(self, examples):
        return {"labels": sum(sum(1 for label in example.labels if label != IGNORE_LABEL) for example in examples)}

    def collate(self, examples):
        return collate_attributes(examples, self.pad_id)

    def loss(self, model, batch, denominators):
        return self.loss_fn(sequence_rewards(model, batch), batch["labels"], num_valid_labels=max(1, denominators["labels"]))

    def loss_from_logits(self, logits, batch, denominators):
        rewards = pooled_rewards(logits, batch, pad_id=self.pad_id)
        return self.loss_fn(rewards, batch["labels"], num_valid_labels=max(1, denominators["labels"]))

    def num_tokens(self, batch):
        return int(batch["attention_mask"].sum())

    def evaluate(self, model, examples: Sequence):
        return evaluate_sums(model, self, examples, micro_batch_size=self.micro_batch_size)


class LogRatioRewardAlgorithm(DPOAlgorithm):
    """The log-ratio readout's training (module docstring): the DPO algorithm, its metrics named
    as the head's (`accuracy`, `margin` of the rewards r = beta * log-ratio)."""

    name = "rm"
    renamed = {"rewards/accuracy": "accuracy", "rewards/margin": "margin"}

    def loss_of_token_logprobs(self, token_logprobs, mask, batch, denominators):
        loss, metrics = super().loss_of_token_logprobs(token_logprobs, mask, batch, denominators)
        return loss, {self.renamed.get(key, key): value for key, value in metrics.items()}


def run_log_ratio(config: RMConfig) -> TrainResult:
    """`stema rm reward.readout=log_ratio` (module docstring)."""
    import json

    from stema.models.loading import export_hf, load_policy

    preference = PreferenceConfig(loss="dpo", beta=config.reward.beta, sft_loss_weight=config.reward.nll_weight,
                                  precompute_ref_logprobs=True)

    def add_reference(run_info) -> None:
        if config.trainer.export_hf and run_info.world.is_main:
            reference, tokenizer = load_policy(config.model, cache_dir=run_info.cache_dir)
            export_hf(reference, tokenizer, run_info.export_dir / LOG_RATIO_REFERENCE)
            settings = {"readout": "log_ratio", "beta": config.reward.beta, "reference": LOG_RATIO_REFERENCE}
            (run_info.export_dir / LOG_RATIO_FILE).write_text(json.dumps(settings, indent=2) + "\n")
            run_info.say(f"log-ratio reward model: the reference is in {run_info.export_dir / LOG_RATIO_REFERENCE}")
        run_info.world.barrier()

    return train_on_pairs(config, preference=preference, command="rm", algorithm_class=LogRatioRewardAlgorithm,
                          finish=add_reference)


def run(config: RMConfig) -> TrainResult:
    if config.reward.readout == "log_ratio":
        return run_log_ratio(config)
    pairwise = config.reward.loss == "bradley_terry"
    if pairwise and config.reward.num_attributes != 1:
        raise ConfigError("reward.num_attributes: reward.loss=bradley_terry trains a scalar reward: set reward.num_attributes=1")
    run_info = start_run(config, command="rm", data_kind="preference" if pairwise else "attributes")
    with preparing(run_info):
        _, train_examples, eval_examples = prepare_data(run_info, config, load_preference_data if pairwise else load_attribute_data)
        model, tokenizer = load_reward_model(
            config.model, num_labels=config.reward.num_attributes, cache_dir=run_info.cache_dir, seed=config.trainer.seed
        )
        model = place_model(run_info, config, model)
    if pairwise:
        algorithm = PairwiseRewardAlgorithm(
            pad_id=tokenizer.pad_token_id,
            use_margin=config.reward.margin,
            center_rewards_coefficient=config.reward.center_rewards_coefficient,
            micro_batch_size=config.trainer.micro_batch_size,
        )
    else:
        algorithm = RegressionRewardAlgorithm(pad_id=tokenizer.pad_token_id, micro_batch_size=config.trainer.micro_batch_size)
    return fit(
        run_info, config, model=model, tokenizer=tokenizer, algorithm=algorithm,
        train_examples=train_examples, eval_examples=eval_examples,
    )
