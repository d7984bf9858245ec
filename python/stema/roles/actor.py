"""The actor role: the policy, its optimizer and its rollout engines.

It generates (colocated placement: through its own engines, STEMA's engine refitted in place from
the policy after every update, or transformers' `generate` on the policy itself for a family the
engine does not serve; `stema.rollout.build_generator` chooses), scores its own tokens and trains
with the clipped PPO loss (`stema.training.ppo_update.PPOUpdater`). With `roles.reference: lora`
it is also the reference (adapters off). With `roles.placement: disaggregated` it holds no
engines: the rollout role does (`stema.roles.rollout.RolloutWorker`), and the actor's refit sends
it the weights. As a group of ranks (`roles.actor_workers`; `stema.roles.groups`) each rank joins
the role's torch.distributed world and shards the policy with FSDP2, or, with
`distributed.pp_size > 1`, holds its pipeline stages of the policy (`stema.distributed.pipeline`):
the PPO loss runs on the last stage inside the schedule, log-probs through the stages without
gradients, and every rank's engines are refitted from all the stages (each weight gathered on its
stage and broadcast over the pipeline group).
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import torch

from stema.config import DistributedConfig, ModelConfig, OptimConfig, PPOAlgorithmConfig, RolesConfig, RolloutConfig, TrainerConfig
from stema.distributed import init_world
from stema.distributed.pipeline import is_pipelined
from stema.losses.ppo import ppo_policy_loss
from stema.training.checkpoint import rng_state, set_rng_state
from stema.training.loop import autocast_context
from stema.training.ppo_update import PPOUpdater, StageLoss
from stema.training.setup import seed_everything

from .colocation import kv_cache_held, release_kv_cache
from .common import export_model, on_device, place_role_model, policy_logprobs
from .experience import model_inputs
from .groups import RowBlock, concat_rows, rank_zero, split_rows
from .rollout import GenerationResult, build_engines, generate_with_pool, merge_generations, remote_refitter


class ActorWorker:
    """The policy: generation through its rollout engines, its own log-probs, the PPO update.

    Placement colocated (no `engine_receivers`): the engines live in this process, on its device;
    their KV caches are held only while they generate (`stema.roles.colocation`). In a role group
    every rank has its engines, generates its block of the prompts and refits them from the
    gathered shards (`BucketedRefitter`, `roles.refit_bucket_mb` at a time).

    Placement disaggregated (`engine_receivers`, `stema.roles.rollout.EngineReceivers`): no
    engines here; `refit` gathers the weights bucket by bucket and sends each bucket to the rollout
    workers (`remote_refitter`), and generation is the rollout role's."""

    def __init__(self, *, model_cfg: ModelConfig, optim_cfg: OptimConfig, trainer_cfg: TrainerConfig,
                 rollout_cfg: RolloutConfig, ppo_cfg: PPOAlgorithmConfig, roles_cfg: RolesConfig,
                 distributed_cfg: DistributedConfig, max_prompt_length: int, cache_dir: str, total_steps: int,
                 engine_receivers: Any = None):
        from stema.models.loading import load_policy
        from stema.rollout import BucketedRefitter, RolloutPool
        from stema.rollout.bucketed import refit_pairs
        from stema.training.logprobs import ReferenceModel

        seed_everything(trainer_cfg.seed)
        self.trainer_cfg, self.rollout_cfg, self.ppo_cfg = trainer_cfg, rollout_cfg, ppo_cfg
        self.world = init_world(distributed_cfg, role="actor")
        self.device = self.world.device
        model, self.tokenizer = load_policy(model_cfg, cache_dir=cache_dir)
        model.to(self.device)
        bucket_bytes = int(roles_cfg.refit_bucket_mb * 2**20)
        # Built from the whole model, before it is sharded.
        self.engines = [] if engine_receivers is not None else build_engines(
            model, rollout_cfg, max_prompt_length=max_prompt_length, world=self.world)
        release_kv_cache(self.engines)
        pairs = [refit_pairs(engine, model) for engine in self.engines] if distributed_cfg.pp_size > 1 else None
        self.model = place_role_model(model, self.world, distributed_cfg, trainer_cfg=trainer_cfg, ppo_cfg=ppo_cfg,
                                      sequences=trainer_cfg.global_batch_size * rollout_cfg.samples_per_prompt,
                                      length=max_prompt_length + rollout_cfg.max_new_tokens)
        if engine_receivers is not None:
            self.refitters = [remote_refitter(self.model, engine_receivers, bucket_bytes=bucket_bytes, world=self.world)]
        elif pairs is not None:  # each weight gathered on its pipeline stage, broadcast to every rank's engines
            self.refitters = [BucketedRefitter(engine, self.model, bucket_bytes=bucket_bytes, pairs=engine_pairs)
                              for engine, engine_pairs in zip(self.engines, pairs)]
        else:  # in place (EngineRefitter), from the shards (BucketedRefitter), or nothing to copy (HFGenerator)
            self.refitters = [engine.refitter(self.model, world=self.world, bucket_bytes=bucket_bytes)
                              for engine in self.engines]
        self.reference = ReferenceModel(self.model, adapters_disabled=True) if roles_cfg.reference == "lora" else None
        self.updater = PPOUpdater(self.model, optim_cfg, total_steps=total_steps, max_grad_norm=optim_cfg.max_grad_norm,
                                  world=self.world)
        self.pool = RolloutPool(self.engines, max_batch=rollout_cfg.max_batch) if self.engines else None

    def ready(self) -> bool:
        return True

    def close(self) -> None:
        """Shut down engines that hold resources beyond their tensors (a vLLM engine: one is alive
        per process, so a later run in this process can build its own)."""
        from stema.rollout.factory import close_generator

        for engine in self.engines:
            close_generator(engine)

    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    @split_rows(merge=merge_generations, pass_block=True, per_rank=True)
    def generate(self, prompt_token_ids: Sequence[Sequence[int]], *, seed: int, greedy: bool = False,
                 row_block: RowBlock | None = None) -> GenerationResult:
        """Responses to the prompts (token lists) from the engines, load-balanced by the scheduler
        (`generate_with_pool`; a rank of a group generates its `row_block` of the prompts)."""
        if self.pool is None:
            raise RuntimeError("the actor holds no engines (roles.placement: disaggregated): generate on the rollout role")
        with kv_cache_held(self.engines):
            return generate_with_pool(self.pool, self.tokenizer, self.rollout_cfg, prompt_token_ids, seed=seed, greedy=greedy,
                                      first=row_block.start if row_block is not None else 0)

    @split_rows(merge=concat_rows)
    @torch.no_grad()
    def logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """`[B, L]` fp32 log-probs of the response tokens under the current policy (action layout)."""
        return policy_logprobs(self.model, batch, trainer_cfg=self.trainer_cfg, temperature=self.rollout_cfg.temperature,
                               device=self.device)

    @split_rows(merge=concat_rows)
    @torch.no_grad()
    def reference_logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """`[B, L]` log-probs under the reference: this policy with its LoRA adapters disabled."""
        if self.reference is None:
            raise RuntimeError("the actor is not the reference (roles.reference is not 'lora')")
        from stema.models.loading import disable_adapters

        with disable_adapters(self.model):
            return policy_logprobs(self.model, batch, trainer_cfg=self.trainer_cfg, temperature=self.rollout_cfg.temperature,
                                   device=self.device)

    @split_rows(merge=rank_zero, pass_block=True)
    def train(self, batch: dict[str, torch.Tensor], *, advantages: torch.Tensor, old_logprobs: torch.Tensor | None,
              ref_logprobs: torch.Tensor | None, kl_coef: float, step: int, row_block: RowBlock | None = None) -> dict[str, float]:
        """One PPO step of the policy on the rollout batch (a rank of a group: its `row_block` of
        it), then the engines refitted in place. Metrics (of the whole batch): the loss terms of
        `ppo_policy_loss`, grad_norm, lr, refit_s. `old_logprobs` None (`ppo.recompute_old_logprobs`
        false): the update's own forward gives them, and `batch["engine_logprobs"]` the metric
        engine_logprob_mismatch_mean (mean |engine - policy| over the trained tokens)."""
        ppo, trainer = self.ppo_cfg, self.trainer_cfg
        device = self.device
        inputs = on_device(device, model_inputs(batch))
        advantages = advantages.to(device)
        old_logprobs = old_logprobs.to(device) if old_logprobs is not None else None
        engine_logprobs = batch["engine_logprobs"].to(device) if old_logprobs is None else None
        in_loss = ppo.kl_in == "loss" and ref_logprobs is not None
        ref_logprobs = ref_logprobs.to(device) if in_loss else None

        def micro_loss(rows: torch.Tensor, num_tokens: int):
            from stema.training.logprobs import completion_token_logprobs

            micro = {key: value[rows.to(device)] for key, value in inputs.items()}
            with autocast_context(trainer, device):
                logprobs, mask, entropy = completion_token_logprobs(
                    self.model, micro, temperature=self.rollout_cfg.temperature, return_entropy=True)
            index = rows.to(device)
            loss, metrics = ppo_policy_loss(
                logprobs, old_logprobs[index] if old_logprobs is not None else None, advantages[index], mask,
                clip_ratio=ppo.clip_ratio, num_tokens=num_tokens,
                ref_logprobs=ref_logprobs[index] if in_loss else None, kl_coef=kl_coef if in_loss else 0.0,
                kl_estimator=ppo.kl_estimator, entropy=entropy, entropy_coef=ppo.entropy_coef,
            )
            if engine_logprobs is not None:
                gap = (logprobs.detach().float() - engine_logprobs[index]).abs() * mask
                metrics["engine_logprob_mismatch_mean"] = gap.sum() / num_tokens
            return loss, metrics

        stage_loss = None
        if is_pipelined(self.model):
            tensors = {**model_inputs(batch), "action_mask": batch["action_mask"], "advantages": advantages,
                       **({"old_logprobs": old_logprobs} if old_logprobs is not None else {}),
                       **({"ref_logprobs": ref_logprobs} if in_loss else {})}
            stage_loss = StageLoss(tensors, self._stage_policy_loss(in_loss=in_loss, kl_coef=kl_coef),
                                   autocast_context(trainer, device))
        metrics = self.updater.update(
            rows=row_block or RowBlock.whole(len(batch["input_ids"])), action_mask=batch["action_mask"], epochs=ppo.ppo_epochs,
            minibatch_size=ppo.minibatch_size, micro_batch_size=trainer.micro_batch_size,
            seed=trainer.seed * 1_000_003 + step, micro_loss=micro_loss, stage_loss=stage_loss,
        )
        metrics["refit_s"] = self.refit()
        return metrics

    def _stage_policy_loss(self, *, in_loss: bool, kl_coef: float):
        """The clipped PPO loss of a pipeline micro-batch from the last stage's logits `[rows, T, V]`
        (`StageLoss.loss_of`), as `micro_loss` computes it from the model's forward."""
        from stema.training.logprobs import logits_token_logprobs

        ppo = self.ppo_cfg

        def loss_of(logits: torch.Tensor, micro: dict[str, torch.Tensor], num_tokens: int):
            logprobs, _, entropy = logits_token_logprobs(logits, micro, temperature=self.rollout_cfg.temperature,
                                                         return_entropy=True)
            return ppo_policy_loss(
                logprobs, micro.get("old_logprobs"), micro["advantages"], micro["loss_mask"], clip_ratio=ppo.clip_ratio,
                num_tokens=num_tokens, ref_logprobs=micro["ref_logprobs"] if in_loss else None,
                kl_coef=kl_coef if in_loss else 0.0, kl_estimator=ppo.kl_estimator, entropy=entropy, entropy_coef=ppo.entropy_coef,
            )

        return loss_of

    def refit(self) -> float:
        """Copy the policy's weights into every engine in place (every rank of a group; with
        disaggregated placement into the rollout workers' engines); seconds taken."""
        started = time.perf_counter()
        for refitter in self.refitters:
            refitter.refit()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    def engine_buffer_addresses(self) -> list[dict[str, int]]:
        """Each engine's weight buffer addresses (refit writes into them; they never change)."""
        return [{name: tensor.data_ptr() for name, tensor in engine.weights.buffers().items()} for engine in self.engines]

    def engine_kv_cache_bytes(self) -> list[int]:
        """Bytes each engine's KV cache holds now: 0 outside `generate` (colocated placement)."""
        from .colocation import kv_cache_bytes

        return [kv_cache_bytes(engine) for engine in self.engines]

    def state_dict(self) -> dict:
        return {"updater": self.updater.state_dict(), "rng": rng_state()}

    def load_state_dict(self, state: dict) -> None:
        self.updater.load_state_dict(state["updater"])
        set_rng_state(state["rng"])
        self.refit()

    def export(self, path: str, *, merge_lora: bool) -> str:
        return export_model(self.model, self.tokenizer, self.world, path, merge_lora=merge_lora)
