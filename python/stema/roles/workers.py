"""PPO's role workers: actor, critic, reference and reward, each a plain class that a handle runs
in this process or in a Ray actor (`stema.roles.handles`).

Each worker builds its own model from the run's `PPOConfig`, so a worker in another process needs
only the config. Tensors cross role boundaries on the CPU (`stema.roles.experience` layout).

- `ActorWorker`: the policy, its optimizer and its rollout engines (STEMA's generation engine,
  refitted in place from the policy after every update; for a family the engine does not serve,
  transformers' `generate` on the policy itself); generates, scores its own tokens, trains
  with the clipped PPO loss. With `roles.reference: lora` it is also the reference (adapters off).
  With `roles.placement: disaggregated` it holds no engines: the rollout role does
  (`stema.roles.disaggregated.RolloutWorker`), and the actor's refit sends it the weights.
- `CriticWorker`: the value model (a one-output sequence classifier, `token_values`), trained with
  the clipped value loss.
- The actor and the critic may each run as a group of ranks (`roles.actor_workers`,
  `roles.critic_workers`; `stema.roles.groups`): each rank joins the role's torch.distributed world
  (`init_world`), shards its model with FSDP2, and data calls (`split_rows`) get a block of the
  batch's rows. World size 1 (a local role, or one Ray actor) runs the same code on a plain model.
- `ReferenceWorker`: a frozen copy of the starting policy (optionally kept in CPU memory between
  calls).
- `RewardWorker`: a reward function (`module:function`) or a trained reward model.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from stema.config import OptimConfig, PPOConfig
from stema.distributed import World, init_world
from stema.distributed.parallelize import clip_grad_norm_, set_gradient_sync
from stema.distributed.role_model import gathered_state, load_gathered_state, place_on_world
from stema.losses.ppo import ppo_policy_loss, ppo_value_loss
from stema.models.loading import eval_mode
from stema.training.checkpoint import rng_state, set_rng_state
from stema.training.loop import autocast_context
from stema.training.optim import build_optimizer, build_scheduler
from stema.training.setup import seed_everything

from .colocation import kv_cache_held, release_kv_cache
from .experience import model_inputs
from .groups import RowBlock, concat_rows, rank_zero, row_blocks, split_rows

def role_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class GenerationResult:
    """What `ActorWorker.generate` returns: the rollouts in prompt order and how generation went."""

    rollouts: list  # list[stema.rollout.Rollout]
    texts: list[str]
    seconds: float
    worker_prompts: list[int]  # prompts each engine generated (the scheduler's hand-out)
    worker_seconds: list[float]


def merge_generations(results: list[GenerationResult]) -> GenerationResult:
    """The ranks' generations (each a block of the prompts) as one, in prompt order; the seconds
    are the slowest rank's, the engines listed rank by rank."""
    return GenerationResult(
        rollouts=[rollout for result in results for rollout in result.rollouts],
        texts=[text for result in results for text in result.texts],
        seconds=max(result.seconds for result in results),
        worker_prompts=[count for result in results for count in result.worker_prompts],
        worker_seconds=[seconds for result in results for seconds in result.worker_seconds],
    )


def build_engines(model: torch.nn.Module, config: PPOConfig, *, world=None) -> list:
    """`rollout.num_engines` generators of `rollout.backend` (`stema.rollout.build_generator`)
    holding copies of `model`'s weights, in `rollout.engine_dtype`, sized for `rollout.max_batch`
    prompts of `data.max_length` tokens plus `rollout.max_new_tokens`. A generator that uses the
    live model (transformers' generate: the `hf` backend, or `stema`'s fallback for a family the
    engine does not serve) needs one engine, which `stema.rollout.factory.check_ppo_generation`
    checks before the roles start."""
    from stema.rollout import build_generator
    from stema.rollout.factory import engine_dtype

    rollout = config.rollout
    dtype = engine_dtype(rollout.engine_dtype)
    max_total_len = config.data.max_length + rollout.max_new_tokens
    return [build_generator(model, rollout, world=world, max_batch=rollout.max_batch, max_total_len=max_total_len, dtype=dtype)
            for _ in range(rollout.num_engines)]


def generate_with_pool(pool, tokenizer: Any, config: PPOConfig, prompt_token_ids: Sequence[Sequence[int]], *, seed: int,
                       greedy: bool, first: int) -> GenerationResult:
    """Responses to the prompts from a `RolloutPool` under `config.rollout`'s sampling settings.
    `first` is the index of the block's first prompt in the whole list (one rank's or rollout
    worker's block): every prompt samples from the stream of its index in the whole list
    (`SamplingParams.for_block`), so a block samples exactly what one process sampling the whole
    list does."""
    from stema.rollout import SamplingParams

    if not prompt_token_ids:  # a rank or worker given no prompts
        return GenerationResult(rollouts=[], texts=[], seconds=0.0, worker_prompts=[0] * len(pool.engines),
                                worker_seconds=[0.0] * len(pool.engines))
    rollout = config.rollout
    params = SamplingParams(
        temperature=0.0 if greedy else rollout.temperature,
        top_p=rollout.top_p,
        top_k=rollout.top_k,
        max_new_tokens=rollout.max_new_tokens,
        stop_strings=tuple(rollout.stop_strings),
        seed=seed,
    ).for_block(first)
    started = time.perf_counter()
    result = pool.generate([list(prompt) for prompt in prompt_token_ids], params, tokenizer=tokenizer)
    return GenerationResult(
        rollouts=result.batch.sequences,
        texts=[sequence.text for sequence in result.batch.sequences],
        seconds=time.perf_counter() - started,
        worker_prompts=[stats.prompts for stats in result.worker_stats],
        worker_seconds=[stats.seconds for stats in result.worker_stats],
    )


class _Updater:
    """A trainable model with its AdamW and lr schedule, updated by PPO's minibatch passes.

    One `update` call is one PPO step: `epochs` passes over the rollout batch's rows in seeded
    random order, one optimizer step per minibatch of `minibatch_size` rows, each minibatch in
    micro-batches whose losses use the minibatch's token count as the denominator (so micro-batching
    does not change the result); the lr schedule steps once per PPO step.

    In a role group each rank holds one block of the rows (`RowBlock`, the split of
    `stema.roles.groups.row_blocks`). Every rank draws the same global order; a rank runs the
    minibatch's rows that it holds; the denominator is the minibatch's token count over all ranks;
    FSDP2 sums the ranks' gradients, so a step equals the one-process step. Every rank makes as
    many micro-batch passes as the rank with the most rows of the minibatch (a rank with none left
    runs one of its rows with weight 0), since each pass is a collective of the sharded model.
    """

    def __init__(self, model: torch.nn.Module, optim_cfg: OptimConfig, *, total_steps: int, max_grad_norm: float, world: World):
        self.model = model
        self.world = world
        self.optimizer = build_optimizer(model, optim_cfg)
        self.scheduler = build_scheduler(self.optimizer, optim_cfg, total_steps=total_steps)
        self.max_grad_norm = max_grad_norm

    def _row_tokens(self, action_mask: torch.Tensor, rows: RowBlock) -> torch.Tensor:
        """`[total]` action tokens of every row of the global batch (this rank knows its block)."""
        counts = torch.zeros(rows.total, dtype=torch.int64, device=self.world.device)
        counts[rows.start : rows.stop] = action_mask.sum(-1).to(self.world.device)
        if self.world.dp_size > 1:
            import torch.distributed as dist

            dist.all_reduce(counts, group=self.world.mesh["dp"].get_group())
        return counts.cpu()

    def update(self, *, rows: RowBlock, action_mask: torch.Tensor, epochs: int, minibatch_size: int, micro_batch_size: int,
               seed: int, micro_loss: Callable[[torch.Tensor, int], tuple[torch.Tensor, dict]]) -> dict[str, float]:
        """Metrics averaged over the optimizer steps (each a sum of micro-batch contributions over
        the ranks); `action_mask` is this rank's `[rows, L]`, `micro_loss` takes this rank's row
        indices and the global denominator."""
        blocks = row_blocks(rows.total, self.world.dp_size)
        if blocks[self.world.dp_rank] != rows:
            raise ValueError(f"{self.world.describe()}: got rows {rows}, expected {blocks[self.world.dp_rank]}")
        row_tokens = self._row_tokens(action_mask, rows)
        generator = torch.Generator().manual_seed(seed)
        minibatch_size = minibatch_size or rows.total
        sums: dict[str, float] = {}
        steps = 0
        self.model.train()
        for _ in range(epochs):
            order = torch.randperm(rows.total, generator=generator)
            for start in range(0, rows.total, minibatch_size):
                minibatch = order[start : start + minibatch_size]
                num_tokens = max(1, int(row_tokens[minibatch].sum()))
                mine = minibatch[(minibatch >= rows.start) & (minibatch < rows.stop)] - rows.start  # in draw order
                passes = max(math.ceil(int(((minibatch >= b.start) & (minibatch < b.stop)).sum()) / micro_batch_size)
                             for b in blocks)
                totals: dict[str, float] = {}
                for index in range(passes):
                    part = mine[index * micro_batch_size : (index + 1) * micro_batch_size]
                    set_gradient_sync(self.model, index == passes - 1)
                    loss, metrics = micro_loss(part if len(part) else torch.zeros(1, dtype=torch.int64), num_tokens)
                    if not len(part):  # a pass only to join the other ranks' collectives
                        loss, metrics = loss * 0.0, {key: value * 0.0 for key, value in metrics.items()}
                    loss.backward()
                    for key, value in {"loss": loss.detach(), **metrics}.items():
                        totals[key] = totals.get(key, 0.0) + float(value)
                totals = self.world.sum_over_data_parallel(totals)
                if self.max_grad_norm > 0:
                    parameters = [p for p in self.model.parameters() if p.requires_grad]
                    totals["grad_norm"] = float(clip_grad_norm_(parameters, self.max_grad_norm))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                for key, value in totals.items():
                    sums[key] = sums.get(key, 0.0) + value
                steps += 1
        metrics = {key: value / steps for key, value in sums.items()}
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        return metrics

    def state_dict(self) -> dict:
        """The model's trainable weights and the optimizer state keyed by parameter name (whole
        tensors on the CPU; a sharded model's gathered on rank 0: a collective), and the schedule.
        The same layout at every world size, so a checkpoint taken with N workers resumes with M."""
        return {**gathered_state(self.model, self.optimizer), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        check_trainable_names(self.model, state["model"])
        load_gathered_state(self.model, self.optimizer, state)
        self.scheduler.load_state_dict(state["scheduler"])


def check_trainable_names(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Refuse a checkpoint that lacks one of the role's trainable parameters or holds a weight the
    model does not have (tied weights appear under each of their names)."""
    missing = {name for name, parameter in model.named_parameters() if parameter.requires_grad} - set(state)
    unexpected = set(state) - set(model.state_dict())
    if missing or unexpected:
        raise ValueError(
            f"the checkpoint does not match the role's trainable parameters (missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}): resume needs the same model and LoRA settings"
        )


def _on(device: torch.device, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


class ActorWorker:
    """The policy: generation through its rollout engines, its own log-probs, the PPO update.

    Placement colocated (no `engine_receivers`): the engines live in this process, on its device;
    their KV caches are held only while they generate (`stema.roles.colocation`). In a role group
    every rank has its engines, generates its block of the prompts and refits them from the
    gathered shards (`BucketedRefitter`, `roles.refit_bucket_mb` at a time).

    Placement disaggregated (`engine_receivers`, `stema.roles.disaggregated.EngineReceivers`): no
    engines here; `refit` gathers the weights bucket by bucket and sends each bucket to the rollout
    workers (`remote_refitter`), and generation is the rollout role's."""

    def __init__(self, *, config: PPOConfig, cache_dir: str, total_steps: int, engine_receivers: Any = None):
        from stema.models.loading import load_policy
        from stema.rollout import RolloutPool
        from stema.training.logprobs import ReferenceModel

        seed_everything(config.trainer.seed)
        self.config = config
        self.world = init_world(config.distributed, role="actor")
        self.device = self.world.device
        model, self.tokenizer = load_policy(config.model, cache_dir=cache_dir)
        model.to(self.device)
        bucket_bytes = int(config.roles.refit_bucket_mb * 2**20)
        # Built from the whole model, before it is sharded.
        self.engines = [] if engine_receivers is not None else build_engines(model, config, world=self.world)
        release_kv_cache(self.engines)
        self.model = place_on_world(model, self.world, config.distributed)
        if engine_receivers is not None:
            from .disaggregated import remote_refitter

            self.refitters = [remote_refitter(self.model, engine_receivers, bucket_bytes=bucket_bytes, world=self.world)]
        else:  # in place (EngineRefitter), from the shards (BucketedRefitter), or nothing to copy (HFGenerator)
            self.refitters = [engine.refitter(self.model, world=self.world, bucket_bytes=bucket_bytes)
                              for engine in self.engines]
        self.reference = ReferenceModel(self.model, adapters_disabled=True) if config.roles.reference == "lora" else None
        self.updater = _Updater(self.model, config.optim, total_steps=total_steps, max_grad_norm=config.optim.max_grad_norm,
                                world=self.world)
        self.pool = RolloutPool(self.engines, max_batch=config.rollout.max_batch) if self.engines else None

    def ready(self) -> bool:
        return True

    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    @split_rows(merge=merge_generations, pass_block=True)
    def generate(self, prompt_token_ids: Sequence[Sequence[int]], *, seed: int, greedy: bool = False,
                 row_block: RowBlock | None = None) -> GenerationResult:
        """Responses to the prompts (token lists) from the engines, load-balanced by the scheduler
        (`generate_with_pool`; a rank of a group generates its `row_block` of the prompts)."""
        if self.pool is None:
            raise RuntimeError("the actor holds no engines (roles.placement: disaggregated): generate on the rollout role")
        with kv_cache_held(self.engines):
            return generate_with_pool(self.pool, self.tokenizer, self.config, prompt_token_ids, seed=seed, greedy=greedy,
                                      first=row_block.start if row_block is not None else 0)

    @split_rows(merge=concat_rows)
    @torch.no_grad()
    def logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """`[B, L]` fp32 log-probs of the response tokens under the current policy (action layout)."""
        return _policy_logprobs(self.model, batch, self.config, self.device)

    @split_rows(merge=concat_rows)
    @torch.no_grad()
    def reference_logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """`[B, L]` log-probs under the reference: this policy with its LoRA adapters disabled."""
        if self.reference is None:
            raise RuntimeError("the actor is not the reference (roles.reference is not 'lora')")
        from stema.models.loading import disable_adapters

        with disable_adapters(self.model):
            return _policy_logprobs(self.model, batch, self.config, self.device)

    @split_rows(merge=rank_zero, pass_block=True)
    def train(self, batch: dict[str, torch.Tensor], *, advantages: torch.Tensor, old_logprobs: torch.Tensor,
              ref_logprobs: torch.Tensor | None, kl_coef: float, step: int, row_block: RowBlock | None = None) -> dict[str, float]:
        """One PPO step of the policy on the rollout batch (a rank of a group: its `row_block` of
        it), then the engines refitted in place. Metrics (of the whole batch): the loss terms of
        `ppo_policy_loss`, grad_norm, lr, refit_s."""
        ppo, trainer = self.config.ppo, self.config.trainer
        device = self.device
        inputs = _on(device, model_inputs(batch))
        advantages, old_logprobs = advantages.to(device), old_logprobs.to(device)
        in_loss = ppo.kl_in == "loss" and ref_logprobs is not None
        ref_logprobs = ref_logprobs.to(device) if in_loss else None

        def micro_loss(rows: torch.Tensor, num_tokens: int):
            from stema.training.logprobs import completion_token_logprobs

            micro = {key: value[rows.to(device)] for key, value in inputs.items()}
            with autocast_context(trainer, device):
                logprobs, mask, entropy = completion_token_logprobs(
                    self.model, micro, temperature=self.config.rollout.temperature, return_entropy=True)
            index = rows.to(device)
            return ppo_policy_loss(
                logprobs, old_logprobs[index], advantages[index], mask, clip_ratio=ppo.clip_ratio, num_tokens=num_tokens,
                ref_logprobs=ref_logprobs[index] if in_loss else None, kl_coef=kl_coef if in_loss else 0.0,
                kl_estimator=ppo.kl_estimator, entropy=entropy, entropy_coef=ppo.entropy_coef,
            )

        metrics = self.updater.update(
            rows=row_block or RowBlock.whole(len(batch["input_ids"])), action_mask=batch["action_mask"], epochs=ppo.ppo_epochs,
            minibatch_size=ppo.minibatch_size, micro_batch_size=trainer.micro_batch_size,
            seed=trainer.seed * 1_000_003 + step, micro_loss=micro_loss,
        )
        metrics["refit_s"] = self.refit()
        return metrics

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
        return _export(self.model, self.tokenizer, self.world, path, merge_lora=merge_lora)


def _export(model: torch.nn.Module, tokenizer: Any, world: World, path: str, *, merge_lora: bool) -> str:
    """The model exported to `path` in Hugging Face format; a sharded model is gathered first (a
    collective) and rank 0 writes it (the other ranks return '')."""
    from stema.models.loading import export_hf

    if world.distributed:
        from stema.distributed.checkpoint import unsharded_copy

        model = unsharded_copy(model)
        if model is None:
            return ""
    return str(export_hf(model, tokenizer, Path(path), merge_lora=merge_lora))


def _policy_logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor], config: PPOConfig, device: torch.device) -> torch.Tensor:
    from stema.training.logprobs import completion_token_logprobs

    with eval_mode(model):
        outputs = []
        micro = config.trainer.micro_batch_size
        inputs = model_inputs(batch)
        for start in range(0, len(inputs["input_ids"]), micro):
            chunk = _on(device, {key: value[start : start + micro] for key, value in inputs.items()})
            with autocast_context(config.trainer, device):
                logprobs, _ = completion_token_logprobs(model, chunk, temperature=config.rollout.temperature)
            outputs.append(logprobs.float().cpu())
        return torch.cat(outputs)


class ReferenceWorker:
    """A frozen copy of the starting policy; with `offload` its weights stay in CPU memory and move
    to the device only for the duration of a call."""

    def __init__(self, *, config: PPOConfig, cache_dir: str, offload: bool):
        from stema.models.loading import load_policy

        reference_model_cfg = type(config.model)(**{**vars(config.model), "lora": type(config.model.lora)()})
        self.model, _ = load_policy(reference_model_cfg, cache_dir=cache_dir)
        self.model.eval().requires_grad_(False)
        self.config = config
        self.device = role_device()
        self.offload = offload
        if not offload:
            self.model.to(self.device)

    def ready(self) -> bool:
        return True

    @split_rows(merge=concat_rows)
    @torch.no_grad()
    def logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """`[B, L]` fp32 log-probs of the response tokens under the reference."""
        if self.offload:
            self.model.to(self.device)
        try:
            return _policy_logprobs(self.model, batch, self.config, self.device)
        finally:
            if self.offload:
                self.model.to("cpu")


class CriticWorker:
    """The value model: per-token values and the clipped value-loss update."""

    def __init__(self, *, config: PPOConfig, cache_dir: str, path: str, total_steps: int):
        from stema.models.loading import load_reward_model

        seed_everything(config.trainer.seed + 1)
        self.config = config
        self.world = init_world(config.distributed, role="critic")
        self.device = self.world.device
        critic_cfg = type(config.critic)(**{**vars(config.critic), "path": path})
        model, self.tokenizer = load_reward_model(critic_cfg, num_labels=1, cache_dir=cache_dir, seed=config.trainer.seed)
        self.model = place_on_world(model, self.world, config.distributed)
        self.updater = _Updater(self.model, config.critic_optim, total_steps=total_steps,
                                max_grad_norm=config.critic_optim.max_grad_norm, world=self.world)

    def ready(self) -> bool:
        return True

    def _values(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        from stema.models.value_head import token_values

        with autocast_context(self.config.trainer, self.device):
            if self.world.distributed:
                return _sharded_token_values(self.model, inputs["input_ids"], inputs["attention_mask"]).float()
            return token_values(self.model, inputs["input_ids"], inputs["attention_mask"]).float()

    @split_rows(merge=concat_rows)
    @torch.no_grad()
    def values(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """`[B, L]` fp32 values (column t: the state after tokens 0..t, where action t is taken)."""
        with eval_mode(self.model):
            micro = self.config.trainer.micro_batch_size
            inputs = model_inputs(batch)
            chunks = []
            for start in range(0, len(inputs["input_ids"]), micro):
                chunk = _on(self.device, {key: value[start : start + micro] for key, value in inputs.items()})
                chunks.append(self._values(chunk).cpu())
            return torch.cat(chunks)

    @split_rows(merge=rank_zero, pass_block=True)
    def train(self, batch: dict[str, torch.Tensor], *, old_values: torch.Tensor, returns: torch.Tensor, step: int,
              row_block: RowBlock | None = None) -> dict[str, float]:
        """One PPO step of the critic on the rollout batch (a rank of a group: its `row_block`).
        Metrics (of the whole batch): vf_loss, vf_clipfrac, grad_norm, lr."""
        ppo, trainer = self.config.ppo, self.config.trainer
        device = self.device
        inputs = _on(device, model_inputs(batch))
        action_mask = batch["action_mask"].to(device)
        old_values, returns = old_values.to(device), returns.to(device)

        def micro_loss(rows: torch.Tensor, num_tokens: int):
            index = rows.to(device)
            values = self._values({key: value[index] for key, value in inputs.items()})
            return ppo_value_loss(values, old_values[index], returns[index], action_mask[index],
                                  value_clip=ppo.value_clip, num_tokens=num_tokens)

        metrics = self.updater.update(
            rows=row_block or RowBlock.whole(len(batch["input_ids"])), action_mask=batch["action_mask"], epochs=ppo.ppo_epochs,
            minibatch_size=ppo.minibatch_size, micro_batch_size=trainer.micro_batch_size,
            seed=trainer.seed * 1_000_003 + step + 7, micro_loss=micro_loss,
        )
        return {f"critic/{key}": value for key, value in metrics.items()}

    def state_dict(self) -> dict:
        return {"updater": self.updater.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.updater.load_state_dict(state["updater"])

    def export(self, path: str, *, merge_lora: bool) -> str:
        return _export(self.model, self.tokenizer, self.world, path, merge_lora=merge_lora)


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


class RewardWorker:
    """Sequence scores from a reward function or a trained reward model (`reward.function` /
    `reward.model`)."""

    def __init__(self, *, config: PPOConfig, cache_dir: str):
        from stema.rewards import load_reward_function

        self.function = load_reward_function(config.reward.function) if config.reward.function else None
        self.eval_function = load_reward_function(config.reward.eval_function, field="reward.eval_function") if config.reward.eval_function else None
        self.scorer = None
        if config.reward.model:
            from stema.config import ModelConfig
            from stema.models.loading import load_reward_model
            from stema.rewards import RewardModelScorer

            model, _ = load_reward_model(ModelConfig(path=config.reward.model), num_labels=1, cache_dir=cache_dir)
            model.to(role_device()).eval().requires_grad_(False)
            self.scorer = RewardModelScorer(model, micro_batch_size=config.reward.micro_batch_size)

    def ready(self) -> bool:
        return True

    def score(self, prompts: Sequence[Any], texts: Sequence[str], prompt_token_ids: Sequence[Sequence[int]],
              response_token_ids: Sequence[Sequence[int]], *, evaluation: bool = False) -> torch.Tensor:
        """`[B]` fp32 scores of the responses (texts for a function, token ids for a model); with
        `evaluation`, by `reward.eval_function` when one is set."""
        function = self.eval_function if evaluation and self.eval_function is not None else self.function
        if function is not None:
            from stema.rewards import score_with_function

            return score_with_function(function, prompts, texts)
        return self.scorer.score(prompt_token_ids, response_token_ids)
