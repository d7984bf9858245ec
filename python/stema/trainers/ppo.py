"""RLHF with PPO (and its critic-free variants REINFORCE, RLOO, GRPO) under one controller.

The controller is this plain loop; the roles are workers behind handles (`stema.roles`), in this
process or in Ray actors, called asynchronously (ARCHITECTURE "Roles and data flow in PPO"):

1. Take the step's global batch of prompts (seeded sampler; each prompt repeated
   `rollout.samples_per_prompt` times, the copies forming a group).
2. Actor (or, with `roles.placement: disaggregated`, the rollout role): generate the responses
   with the rollout engines (KV-cached, in-place refitted copies of the policy), prompt batches
   handed out by the load-balancing kernel `Scheduler`.
3. At once, as futures: the actor's own log-probs of the sampled tokens (and the engine-vs-trainer
   log-prob mismatch), the reference's log-probs, the critic's values, the reward's scores.
4. Scores -> (truncation penalty for responses cut at max_new_tokens, running normalization,
   clipping) -> token rewards: the score at each sequence's last token; with `ppo.kl_in: reward`
   minus kl_coef x KL estimate at every token.
5. Advantages by the registered estimator (`gae` through the GAE kernel with the critic's values;
   `reinforce`, `rloo`, `grpo` without a critic), optionally whitened.
6. Actor and critic train concurrently: `ppo.ppo_epochs` passes of minibatches, clipped policy
   loss (+ KL in the loss for GRPO, + entropy bonus) and clipped value loss; no actor update during
   the first `ppo.critic_warmup_steps`. The actor then refits the engines in place (its own, or
   the rollout workers', bucket by bucket).
7. The KL controller adapts (when a target is set); metrics, timings (generation, inference,
   training, refit) and the engine mismatch are logged; held-out prompts are evaluated greedily
   every `trainer.eval_every` steps (mean reward); checkpoints hold every role's state.
8. At the end: the actor exported to `<output_dir>/hf`, the critic to `<output_dir>/critic_hf`.

Departures: the sequence KL reported (`kl`) is the k1 sum over response tokens (log pi - log ref)
averaged over sequences, whatever estimator the penalty uses. Rewards are normalized per sequence
(running statistics of the scores), not per token.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass

import torch

from stema.config import ConfigError, PPOConfig
from stema.data import load_prompts
from stema.losses.advantages import AdvantageInputs, estimate_advantages, informative_rows, needs_critic, whiten
from stema.losses.ppo import kl_controller
from stema.models.loading import resolve_model_path
from stema.rewards import check_reward_functions
from stema.roles.experience import experience_tensors, model_inputs, place_scores
from stema.roles.handles import start_role
from stema.roles.actor import ActorWorker
from stema.roles.critic import CriticWorker
from stema.roles.reference import ReferenceWorker
from stema.roles.reward import RewardWorker
from stema.rollout import logprob_mismatch
from stema.rollout.factory import check_ppo_generation
from stema.rollout.sampling import step_seed
from stema.training import checkpoint
from stema.training.logging import MetricsLogger, progress_bar
from stema.training.sampler import EpochSampler
from stema.training.folder import truncate_metrics
from stema.training.setup import Run, load_splits, preparing, start_run
from stema_kernels.reference import kl_from_log_ratio


@dataclass
class PPOResult:
    step: int
    train_metrics: dict[str, float]
    eval_metrics: dict[str, float]
    resumed_from: int | None = None


class RunningMoments:
    """Running mean and variance of the sequence scores across steps (Chan et al.'s merge)."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, values: torch.Tensor) -> None:
        n = values.numel()
        if n == 0:
            return
        batch_mean = float(values.mean())
        batch_m2 = float(((values - batch_mean) ** 2).sum())
        delta = batch_mean - self.mean
        total = self.count + n
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta * delta * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 1.0

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = state["count"], state["mean"], state["m2"]


def actor_arguments(config: PPOConfig) -> dict:
    """The component configs `ActorWorker` takes, from the run's config."""
    return dict(model_cfg=config.model, optim_cfg=config.optim, trainer_cfg=config.trainer, rollout_cfg=config.rollout,
                ppo_cfg=config.ppo, roles_cfg=config.roles, distributed_cfg=config.distributed,
                max_prompt_length=config.data.max_length)


def rollout_arguments(config: PPOConfig) -> dict:
    """The component configs `RolloutWorker` takes, from the run's config."""
    return dict(model_cfg=config.model, rollout_cfg=config.rollout, max_prompt_length=config.data.max_length)


class Roles:
    """The run's role handles: actor, rollout (None unless placement is disaggregated: the actor
    then holds no engines), reference (None when the actor is its own reference), critic (None
    without a critic-based estimator), reward."""

    def __init__(self, config: PPOConfig, run: Run, *, total_steps: int):
        backend = dict(backend=config.roles.backend, timeout_s=config.roles.call_timeout_s, ray_address=config.roles.ray_address)
        model_parallel = (config.distributed.tp_size, config.distributed.pp_size)
        cache_dir = str(run.cache_dir)
        self.rollout = receivers = None
        if config.roles.placement == "disaggregated":
            from stema.roles.rollout import engine_receivers, start_rollout_role

            self.rollout = start_rollout_role(workers=config.roles.rollout_workers, timeout_s=config.roles.call_timeout_s,
                                              ray_address=config.roles.ray_address, cache_dir=cache_dir,
                                              **rollout_arguments(config))
            receivers = engine_receivers(self.rollout, timeout_s=config.roles.call_timeout_s)
        self.actor = start_role("actor", ActorWorker, **actor_arguments(config), cache_dir=cache_dir, total_steps=total_steps,
                                workers=config.roles.actor_workers, model_parallel=model_parallel, engine_receivers=receivers,
                                **backend)
        self.reference = None
        if config.roles.reference != "lora":
            self.reference = start_role("reference", ReferenceWorker, model_cfg=config.model, trainer_cfg=config.trainer,
                                        temperature=config.rollout.temperature, cache_dir=cache_dir,
                                        offload=config.roles.reference == "cpu_offload", **backend)
        self.critic = None
        if needs_critic(config.ppo.advantage):
            critic_cfg = dataclasses.replace(config.critic, path=critic_path(config, cache_dir=cache_dir))
            self.critic = start_role("critic", CriticWorker, model_cfg=critic_cfg, optim_cfg=config.critic_optim,
                                     trainer_cfg=config.trainer, ppo_cfg=config.ppo, rollout_cfg=config.rollout,
                                     distributed_cfg=config.distributed, max_prompt_length=config.data.max_length,
                                     cache_dir=cache_dir, total_steps=total_steps, workers=config.roles.critic_workers,
                                     model_parallel=model_parallel, **backend)
        self.reward = start_role("reward", RewardWorker, reward_cfg=config.reward, dtype=config.model.dtype, cache_dir=cache_dir,
                                 folder=os.getcwd(), **backend)

    def generate(self, prompt_token_ids: list, *, seed: int, greedy: bool = False):
        """Future of the responses (`GenerationResult`) from the rollout role when there is one,
        else from the actor's own engines."""
        if self.rollout is not None:
            from stema.roles.rollout import RolloutWorker

            return self.rollout.submit(RolloutWorker.generate, prompt_token_ids, seed=seed, greedy=greedy)
        return self.actor.submit(ActorWorker.generate, prompt_token_ids, seed=seed, greedy=greedy)

    def score(self, prompts: list, generation, *, evaluation: bool = False):
        """Future of the reward role's `[B]` scores of `generation`'s responses to `prompts` (TokenizedPrompts)."""
        rollouts = generation.rollouts
        return self.reward.submit(
            RewardWorker.score, [p.prompt for p in prompts], generation.texts,
            [r.prompt_token_ids for r in rollouts], [r.token_ids for r in rollouts], evaluation=evaluation,
            locations=[p.location for p in prompts])

    def reference_logprobs(self, batch):
        if self.reference is None:
            return self.actor.submit(ActorWorker.reference_logprobs, batch)
        return self.reference.submit(ReferenceWorker.logprobs, batch)

    def close(self) -> None:
        for handle in (self.actor, self.rollout, self.reference, self.critic, self.reward):
            if handle is not None:
                handle.close()


def critic_path(config: PPOConfig, *, cache_dir: str) -> str:
    """The critic's starting weights: critic.path, or with 'auto' the reward model (NeMo-Aligner's
    default) when there is one, else the policy (with a new value head)."""
    if config.critic.path != "auto":
        return config.critic.path
    if config.reward.model:
        return config.reward.model
    return str(resolve_model_path(config.model, cache_dir=cache_dir))


def shaped_scores(scores: torch.Tensor, finish_reasons: list[str], config: PPOConfig, moments: RunningMoments) -> torch.Tensor:
    """Scores after the truncation penalty, running normalization and clipping (in that order)."""
    ppo = config.ppo
    scores = scores.clone().float()
    if ppo.truncation_penalty is not None:
        truncated = torch.tensor([reason == "length" for reason in finish_reasons])
        scores[truncated] = ppo.truncation_penalty
    if ppo.normalize_rewards:
        moments.update(scores)
        scores = (scores - moments.mean) / (moments.std + 1e-8)
    if ppo.reward_clip > 0:
        scores = scores.clamp(-ppo.reward_clip, ppo.reward_clip)
    return scores


class PPOController:
    """Runs the steps of the module docstring over a set of role handles."""

    def __init__(self, config: PPOConfig, run: Run, roles: Roles, *, prompts: list, eval_prompts: list | None, total_steps: int):
        self.config, self.run, self.roles = config, run, roles
        self.prompts, self.eval_prompts = prompts, eval_prompts
        self.total_steps = total_steps
        ppo = config.ppo
        self.kl = kl_controller(ppo.kl_coef, target=ppo.kl_target, horizon=ppo.kl_horizon)
        self.moments = RunningMoments()
        self.sampler = EpochSampler(len(prompts), batch_size=config.trainer.global_batch_size, seed=config.trainer.seed,
                                    shuffle=config.data.shuffle)
        self.pad_id = roles.actor.submit(ActorWorker.pad_token_id).result()

    # -- one step ---------------------------------------------------------------------------------

    def step(self, step: int) -> dict[str, float]:
        config, roles, ppo = self.config, self.roles, self.config.ppo
        step_started = time.perf_counter()
        samples = config.rollout.samples_per_prompt
        chosen = [self.prompts[index] for index in self.sampler.next_batch()]
        prompts = [prompt for prompt in chosen for _ in range(samples)]  # [B = prompts x samples]
        group_ids = torch.arange(len(chosen)).repeat_interleave(samples)

        generation = roles.generate([p.input_ids for p in prompts], seed=self.sample_seed(step)).result()
        rollouts = generation.rollouts
        batch = experience_tensors(rollouts, self.pad_id)
        inputs = {**model_inputs(batch), "action_mask": batch["action_mask"]}
        started = time.perf_counter()
        recompute = ppo.recompute_old_logprobs
        # Without the old log-probs' forward (so the KL is in the loss) and with uniform groups
        # skipped, the reference is needed only on the rows the actor trains on: it runs after the
        # scores have chosen them, and the KL metric is those rows'.
        reference_after_scores = not recompute and ppo.skip_uniform_groups
        old_future = roles.actor.submit(ActorWorker.logprobs, inputs) if recompute else None
        ref_future = None if reference_after_scores else roles.reference_logprobs(inputs)
        value_future = roles.critic.submit(CriticWorker.values, inputs) if roles.critic else None
        score_future = roles.score(prompts, generation)
        old_logprobs = old_future.result() if recompute else None
        values = value_future.result() if value_future else None
        raw_scores = score_future.result()
        mask = batch["action_mask"]
        scores = shaped_scores(raw_scores, [r.finish_reason for r in rollouts], config, self.moments)
        kept = self.actor_rows(scores, group_ids)
        rows = (lambda tensor: tensor) if kept is None else (lambda tensor: tensor[kept])  # no copy when every row trains
        ref_rows = rows if reference_after_scores else (lambda tensor: tensor)  # the rows the reference scored
        ref_logprobs = (roles.reference_logprobs({key: rows(value) for key, value in inputs.items()}).result()
                        if reference_after_scores else ref_future.result())
        inference_s = time.perf_counter() - started

        token_rewards = place_scores(scores, batch["last_action"], mask.shape)
        # Without the forward of its own, the sampling log-probs stand in for the policy's in the KL metric.
        policy_logprobs = old_logprobs if recompute else batch["engine_logprobs"]
        log_ratio = (ref_rows(policy_logprobs) - ref_logprobs) * ref_rows(mask)
        kl_coef = self.kl.value
        if ppo.kl_in == "reward":
            token_rewards = token_rewards - kl_coef * kl_from_log_ratio(log_ratio, ppo.kl_estimator) * mask
        advantages, returns = estimate_advantages(
            ppo.advantage, AdvantageInputs(token_rewards=token_rewards, mask=mask, values=values, group_ids=group_ids,
                                           gamma=ppo.gamma, lam=ppo.lam))
        if ppo.whiten_advantages:
            advantages = whiten(advantages, mask)

        started = time.perf_counter()
        train_actor = step >= ppo.critic_warmup_steps
        train_inputs = inputs if recompute else {**inputs, "engine_logprobs": batch["engine_logprobs"]}
        actor_future = roles.actor.submit(
            ActorWorker.train, {key: rows(value) for key, value in train_inputs.items()}, advantages=rows(advantages),
            old_logprobs=rows(old_logprobs) if recompute else None,
            ref_logprobs=ref_logprobs if reference_after_scores else rows(ref_logprobs), kl_coef=kl_coef,
            step=step) if train_actor else None
        critic_future = roles.critic.submit(CriticWorker.train, inputs, old_values=values, returns=returns, step=step) if roles.critic else None
        metrics: dict[str, float] = {}
        if actor_future:
            metrics.update(actor_future.result())
        if critic_future:
            metrics.update(critic_future.result())
        training_s = time.perf_counter() - started - metrics.get("refit_s", 0.0)

        sequence_kl = log_ratio.sum(-1)  # [B] k1 per sequence
        self.kl.update(float(sequence_kl.mean()), len(sequence_kl))
        response_lengths = torch.tensor([len(r.token_ids) for r in rollouts], dtype=torch.float32)
        generated = int(response_lengths.sum())
        step_s = time.perf_counter() - step_started
        metrics.update({
            "reward": float(raw_scores.mean()),
            "score": float(scores.mean()),
            "kl": float(sequence_kl.mean()),
            "kl_coef": kl_coef,
            "advantage_std": float(advantages[mask].std()) if int(mask.sum()) > 1 else 0.0,
            "response_length": float(response_lengths.mean()),
            "truncated": sum(r.finish_reason == "length" for r in rollouts) / len(rollouts),
            "actor_rows": 1.0 if kept is None else len(kept) / len(rollouts),
            "generation_s": generation.seconds,
            "inference_s": inference_s,
            "training_s": training_s,
            "step_s": step_s,
            "generated_tokens": generated,
            "prompts_per_s": len(chosen) / step_s,
            "generated_tokens_per_s": generated / step_s,
        })
        if recompute:  # else the actor reported the mean over its trained tokens
            mismatch = logprob_mismatch(batch["engine_logprobs"], old_logprobs, mask)
            metrics.update(engine_logprob_mismatch_max=mismatch["max"], engine_logprob_mismatch_mean=mismatch["mean"])
        if values is not None:
            metrics["values"] = float(values[mask].mean()) if int(mask.sum()) else 0.0
        for worker, prompts_done in enumerate(generation.worker_prompts):
            metrics[f"engine{worker}_prompts"] = prompts_done
        return metrics

    def actor_rows(self, scores: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor | None:
        """Indices of the rows the actor trains on, None for every row: with `ppo.skip_uniform_groups`
        the rows of groups whose scores differ (every row when no group's do: the step then trains
        on the KL term alone, as without the option)."""
        if not self.config.ppo.skip_uniform_groups:
            return None
        kept = informative_rows(scores, group_ids)
        return kept if len(kept) else None

    def sample_seed(self, step: int) -> int:
        return step_seed(self.config.trainer.seed, step)

    def evaluate(self) -> dict[str, float]:
        """Mean reward of greedy responses to the held-out prompts (exact-match accuracy for the built-in task)."""
        prompts = self.eval_prompts
        generation = self.roles.generate([p.input_ids for p in prompts], seed=0, greedy=True).result()
        scores = self.roles.score(prompts, generation, evaluation=True).result()
        lengths = [len(r.token_ids) for r in generation.rollouts]
        return {"reward": float(scores.mean()), "response_length": sum(lengths) / len(lengths)}

    # -- checkpoints ------------------------------------------------------------------------------

    def save(self, step: int) -> None:
        roles = self.roles
        state = {
            "actor": roles.actor.submit(ActorWorker.state_dict).result(),
            "critic": roles.critic.submit(CriticWorker.state_dict).result() if roles.critic else None,
            "kl": self.kl.state_dict(),
            "moments": self.moments.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": checkpoint.rng_state(),
            "algorithm": f"ppo/{self.config.ppo.advantage}",
        }
        checkpoint.save_checkpoint(self.run.output_dir / "checkpoints", step, state, keep=self.config.trainer.keep_checkpoints,
                                   settings=self.run.settings)

    def resume(self) -> int | None:
        found = checkpoint.load_latest_checkpoint(self.run.output_dir / "checkpoints")
        if found is None:
            return None
        step, state = found
        self.roles.actor.submit(ActorWorker.load_state_dict, state["actor"]).result()
        if self.roles.critic is not None:
            if state["critic"] is None:
                raise ValueError("the checkpoint has no critic state but this run uses a critic: resume needs the same ppo.advantage")
            self.roles.critic.submit(CriticWorker.load_state_dict, state["critic"]).result()
        self.kl.load_state_dict(state["kl"])
        self.moments.load_state_dict(state["moments"])
        self.sampler.load_state_dict(state["sampler"])
        checkpoint.set_rng_state(state["rng"])
        return step

    # -- the loop ---------------------------------------------------------------------------------

    def fit(self) -> PPOResult:
        trainer = self.config.trainer
        result = PPOResult(step=0, train_metrics={}, eval_metrics={})
        step = 0
        if trainer.resume:
            resumed = self.resume()
            if resumed is not None:
                step = result.resumed_from = resumed
                self.run.say(f"resumed from step {step}")
        truncate_metrics(self.run.output_dir, step, final=step >= self.total_steps)
        logger = MetricsLogger(self.run.output_dir, tensorboard=trainer.tensorboard, resumed_step=step)
        bar = progress_bar(self.total_steps, step, enabled=trainer.progress_bar, description=f"ppo/{self.config.ppo.advantage}")
        try:
            if self.eval_prompts and step == 0:
                logger.log("eval", 0, self.evaluate())
            while step < self.total_steps:
                metrics = self.step(step)
                step += 1
                result.train_metrics = metrics
                if step % max(1, trainer.log_every) == 0 or step == self.total_steps:
                    logger.log("train", step, metrics)
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward']:.3f}", kl=f"{metrics['kl']:.3f}")
                if self.eval_prompts and trainer.eval_every > 0 and step % trainer.eval_every == 0 and step < self.total_steps:
                    logger.log("eval", step, self.evaluate())
                if trainer.save_every > 0 and step % trainer.save_every == 0 and step < self.total_steps:
                    self.save(step)
            if self.eval_prompts:
                result.eval_metrics = self.evaluate()
                logger.log("eval", step, result.eval_metrics)
            self.save(step)
        finally:
            bar.close()
            logger.close()
        result.step = step
        return result

    def export(self) -> None:
        if not self.config.trainer.export_hf:
            return
        merge = self.config.model.lora.merge_on_export
        path = self.roles.actor.submit(ActorWorker.export, str(self.run.export_dir), merge_lora=merge).result()
        self.run.say(f"exported the actor to {path}")
        if self.roles.critic is not None:
            critic = self.roles.critic.submit(CriticWorker.export, str(self.run.output_dir / "critic_hf"),
                                              merge_lora=self.config.critic.lora.merge_on_export).result()
            self.run.say(f"exported the critic to {critic}")


def run(config: PPOConfig, *, command: str = "ppo") -> PPOResult:
    check_reward_functions(config.reward)  # a bad module:function stops the run before anything loads
    run_info = start_run(config, command=command, data_kind="prompt")
    if run_info.world.distributed:
        raise ConfigError(
            f"stema {command} runs as one controller process, not under torchrun with {run_info.world.world_size} processes: "
            "its roles scale out as Ray actors (roles.backend: ray)"
        )
    total_steps = config.trainer.max_steps
    from stema.models.loading import load_tokenizer

    with preparing(run_info):
        model_path = resolve_model_path(config.model, cache_dir=run_info.cache_dir)
        check_ppo_generation(config, model_path)
        tokenizer = load_tokenizer(model_path)
        prompts, eval_prompts = load_splits(run_info, config.data, tokenizer, load_prompts, batch_size=config.trainer.global_batch_size)
        if total_steps < 1:
            total_steps = config.trainer.epochs * (len(prompts) // config.trainer.global_batch_size)
        roles = Roles(config, run_info, total_steps=total_steps)
    try:
        controller = PPOController(config, run_info, roles, prompts=prompts, eval_prompts=eval_prompts, total_steps=total_steps)
        result = controller.fit()
        controller.export()
    finally:
        roles.close()
    summary = f"done after {result.step} steps; last reward {result.train_metrics.get('reward', float('nan')):.4f}"
    run_info.say(summary + (f"; eval {result.eval_metrics}" if result.eval_metrics else ""))
    return result


def run_grpo(config: PPOConfig) -> PPOResult:
    """`stema grpo`: the same controller with the GRPO config's defaults."""
    return run(config, command="grpo")
