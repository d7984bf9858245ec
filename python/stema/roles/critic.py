"""The critic role: the value model (a one-output sequence classifier read at every position,
`token_values`), trained with the clipped value loss (`stema.training.ppo_update.PPOUpdater`). As a
group of ranks (`roles.critic_workers`) it shards the model with FSDP2, like the actor, or holds
its pipeline stages (`distributed.pp_size > 1`): the last stage holds the score head, whose output
at every position is the values, and computes the value loss inside the schedule."""

from __future__ import annotations

import torch

from stema.config import DistributedConfig, ModelConfig, OptimConfig, PPOAlgorithmConfig, RolloutConfig, TrainerConfig
from stema.distributed import init_world
from stema.distributed.pipeline import is_pipelined
from stema.losses.ppo import ppo_value_loss
from stema.models.loading import eval_mode
from stema.training.loop import autocast_context
from stema.training.ppo_update import PPOUpdater, StageLoss
from stema.training.setup import seed_everything

from .common import export_model, on_device, place_role_model, stage_rows
from .experience import model_inputs
from .groups import RowBlock, concat_rows, rank_zero, split_rows


class CriticWorker:
    """The value model: per-token values and the clipped value-loss update."""

    def __init__(self, *, model_cfg: ModelConfig, optim_cfg: OptimConfig, trainer_cfg: TrainerConfig, ppo_cfg: PPOAlgorithmConfig,
                 rollout_cfg: RolloutConfig, distributed_cfg: DistributedConfig, max_prompt_length: int, cache_dir: str,
                 total_steps: int):
        from stema.models.loading import load_reward_model

        seed_everything(trainer_cfg.seed + 1)
        self.trainer_cfg, self.ppo_cfg = trainer_cfg, ppo_cfg
        self.world = init_world(distributed_cfg, role="critic")
        self.device = self.world.device
        model, self.tokenizer = load_reward_model(model_cfg, num_labels=1, cache_dir=cache_dir, seed=trainer_cfg.seed)
        self.model = place_role_model(model, self.world, distributed_cfg, trainer_cfg=trainer_cfg, ppo_cfg=ppo_cfg,
                                      sequences=trainer_cfg.global_batch_size * rollout_cfg.samples_per_prompt,
                                      length=max_prompt_length + rollout_cfg.max_new_tokens)
        self.updater = PPOUpdater(self.model, optim_cfg, total_steps=total_steps, max_grad_norm=optim_cfg.max_grad_norm,
                                  world=self.world)

    def ready(self) -> bool:
        return True

    def _values(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        from stema.models.value_head import token_values

        with autocast_context(self.trainer_cfg, self.device):
            if self.world.distributed:
                return _sharded_token_values(self.model, inputs["input_ids"], inputs["attention_mask"]).float()
            return token_values(self.model, inputs["input_ids"], inputs["attention_mask"]).float()

    @split_rows(merge=concat_rows)
    @torch.no_grad()
    def values(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """`[B, L]` fp32 values (column t: the state after tokens 0..t, where action t is taken)."""
        if is_pipelined(self.model):
            return stage_rows(self.model, batch, trainer_cfg=self.trainer_cfg, device=self.device,
                              output_of=lambda scores, chunk: scores.squeeze(-1))  # [rows, T, 1] -> [rows, T]
        with eval_mode(self.model):
            micro = self.trainer_cfg.micro_batch_size
            inputs = model_inputs(batch)
            chunks = []
            for start in range(0, len(inputs["input_ids"]), micro):
                chunk = on_device(self.device, {key: value[start : start + micro] for key, value in inputs.items()})
                chunks.append(self._values(chunk).cpu())
            return torch.cat(chunks)

    @split_rows(merge=rank_zero, pass_block=True)
    def train(self, batch: dict[str, torch.Tensor], *, old_values: torch.Tensor, returns: torch.Tensor, step: int,
              row_block: RowBlock | None = None) -> dict[str, float]:
        """One PPO step of the critic on the rollout batch (a rank of a group: its `row_block`).
        Metrics (of the whole batch): vf_loss, vf_clipfrac, grad_norm, lr."""
        ppo, trainer = self.ppo_cfg, self.trainer_cfg
        device = self.device
        inputs = on_device(device, model_inputs(batch))
        action_mask = batch["action_mask"].to(device)
        old_values, returns = old_values.to(device), returns.to(device)

        def micro_loss(rows: torch.Tensor, num_tokens: int):
            index = rows.to(device)
            values = self._values({key: value[index] for key, value in inputs.items()})
            return ppo_value_loss(values, old_values[index], returns[index], action_mask[index],
                                  value_clip=ppo.value_clip, num_tokens=num_tokens)

        def stage_value_loss(scores: torch.Tensor, micro: dict[str, torch.Tensor], num_tokens: int):
            return ppo_value_loss(scores.squeeze(-1).float(), micro["old_values"], micro["returns"], micro["loss_mask"],
                                  value_clip=ppo.value_clip, num_tokens=num_tokens)

        stage_loss = None
        if is_pipelined(self.model):
            tensors = {**model_inputs(batch), "action_mask": batch["action_mask"], "old_values": old_values, "returns": returns}
            stage_loss = StageLoss(tensors, stage_value_loss, autocast_context(trainer, device))
        metrics = self.updater.update(
            rows=row_block or RowBlock.whole(len(batch["input_ids"])), action_mask=batch["action_mask"], epochs=ppo.ppo_epochs,
            minibatch_size=ppo.minibatch_size, micro_batch_size=trainer.micro_batch_size,
            seed=trainer.seed * 1_000_003 + step + 7, micro_loss=micro_loss, stage_loss=stage_loss,
        )
        return {f"critic/{key}": value for key, value in metrics.items()}

    def state_dict(self) -> dict:
        return {"updater": self.updater.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.updater.load_state_dict(state["updater"])

    def export(self, path: str, *, merge_lora: bool) -> str:
        return export_model(self.model, self.tokenizer, self.world, path, merge_lora=merge_lora)


def _sharded_token_values(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """`token_values` of an FSDP2-sharded classifier: `[B, T]`, the score head's per-position
    output captured during the model's own forward (calling the backbone and head directly, as
    `token_values` does, would skip the root's all-gather of the embeddings and the head)."""
    captured = []
    hook = model.score.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        hook.remove()
    return captured[0].squeeze(-1)  # [B, T, 1] -> [B, T]
