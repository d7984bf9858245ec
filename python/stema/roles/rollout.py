"""The rollout role and PPO's generation through rollout engines.

`build_engines` and `generate_with_pool` are how both the actor (placement colocated: its own
engines) and the rollout workers generate; `GenerationResult` is what they return.

Placement disaggregated: the rollout engines in Ray actors of their own (the rollout role), on
devices of their own, refitted from the actor after every update.

    rollout = start_rollout_role(workers=2, timeout_s=600, **rollout_arguments(config), cache_dir=...)
    receivers = engine_receivers(rollout, timeout_s=600)                   # given to every actor rank
    actor = start_role("actor", ActorWorker, ..., engine_receivers=receivers)
    generation = rollout.submit(RolloutWorker.generate, prompts, seed=7).result()   # prompts split by rows
    actor.submit(ActorWorker.train, ...).result()                          # ends with the refit below

A `RolloutWorker` holds only its `GenerationEngine`s (built from the policy checkpoint, which is
dropped once they hold its weights): no trainer model, no optimizer. Its KV caches stay allocated:
nothing else uses its device. Several rollout workers split the prompts by rows (`split_rows`);
inside one worker the kernel `Scheduler` balances its engines.

Refit (`remote_refitter`, a `stema.rollout.RemoteRefitter` run by every rank of the actor): the actor's weights are gathered
whole a bucket at a time (`WeightBuckets`, `roles.refit_bucket_mb`); rank 0 hands each bucket to
`send_bucket` and waits until every rollout worker has copied it into its engines with the
`refit_` kernel (`RolloutWorker.load_bucket`: in place, into buffers whose addresses never change,
through a name-to-buffer map built once), so at most one bucket is in flight.

Transport. `send_bucket` puts a bucket into the Ray object store once (as CPU tensors) and gives
every rollout worker the reference; `received_bucket` is the worker's half. That is right for the
CPU and for a first multi-node run, but on GPUs it copies each bucket device -> host -> object
store -> host -> device. The planned GPU transport is an NCCL broadcast from actor rank 0 to the
rollout workers over a process group of their own, straight into same-dtype engine buffers; it
would replace these two functions only (not built yet).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from stema.config import ModelConfig, RolloutConfig

from .common import role_device
from .groups import GroupFuture, RayGroupHandle, RowBlock, rank_zero, split_rows, start_group


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


def build_engines(model: torch.nn.Module, rollout_cfg: RolloutConfig, *, max_prompt_length: int, world=None) -> list:
    """`rollout.num_engines` generators of `rollout.backend` (`stema.rollout.build_generator`)
    holding copies of `model`'s weights, in `rollout.engine_dtype`, sized for `rollout.max_batch`
    prompts of `max_prompt_length` tokens plus `rollout.max_new_tokens`. A generator that uses the
    live model (transformers' generate: the `hf` backend, or `stema`'s fallback for a family the
    engine does not serve) needs one engine, which `stema.rollout.factory.check_ppo_generation`
    checks before the roles start."""
    from stema.rollout import build_generator
    from stema.rollout.factory import engine_dtype

    rollout = rollout_cfg
    dtype = engine_dtype(rollout.engine_dtype)
    max_total_len = max_prompt_length + rollout.max_new_tokens
    return [build_generator(model, rollout, world=world, max_batch=rollout.max_batch, max_total_len=max_total_len, dtype=dtype)
            for _ in range(rollout.num_engines)]


def generate_with_pool(pool, tokenizer: Any, rollout_cfg: RolloutConfig, prompt_token_ids: Sequence[Sequence[int]], *, seed: int,
                       greedy: bool, first: int) -> GenerationResult:
    """Responses to the prompts from a `RolloutPool` under `rollout_cfg`'s sampling settings.
    `first` is the index of the block's first prompt in the whole list (one rank's or rollout
    worker's block): every prompt samples from the stream of its index in the whole list
    (`SamplingParams.for_block`), so a block samples exactly what one process sampling the whole
    list does."""
    from stema.rollout import SamplingParams

    if not prompt_token_ids:  # a rank or worker given no prompts
        return GenerationResult(rollouts=[], texts=[], seconds=0.0, worker_prompts=[0] * len(pool.engines),
                                worker_seconds=[0.0] * len(pool.engines))
    rollout = rollout_cfg
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


class RolloutWorker:
    """One rollout worker: `rollout.num_engines` generators of `rollout.backend` and nothing to train.

    Attributes:
        engines: the generators (`GenerationEngine`s, or one `VLLMGenerator`: vLLM's in-process
            engine lives in this Ray actor, away from the actor's process groups).
        receivers: per engine, what takes the weights of a refit bucket by bucket
            (`engine.bucket_receiver(model)`: `stema.rollout.remote.EngineSlots`, or vLLM's);
            built once, used by every `load_bucket`.
    """

    def __init__(self, *, model_cfg: ModelConfig, rollout_cfg: RolloutConfig, max_prompt_length: int, cache_dir: str):
        from stema.models.loading import load_policy
        from stema.rollout import RolloutPool

        self.rollout_cfg = rollout_cfg
        self.device = role_device()
        model, self.tokenizer = load_policy(model_cfg, cache_dir=cache_dir)
        model.to(self.device)
        self.engines = build_engines(model, rollout_cfg, max_prompt_length=max_prompt_length)
        self.receivers = [engine.bucket_receiver(model) for engine in self.engines]
        del model  # the engines hold the weights now
        self.pool = RolloutPool(self.engines, max_batch=rollout_cfg.max_batch)

    def ready(self) -> bool:
        return True

    def weight_layout(self) -> list[tuple[str, tuple[int, ...]]]:
        """[(Hugging Face weight name, shape)] of the engines' weights, in refit order."""
        return self.receivers[0].layout

    @split_rows(merge=merge_generations, pass_block=True)
    def generate(self, prompt_token_ids: Sequence[Sequence[int]], *, seed: int, greedy: bool = False,
                 row_block: RowBlock | None = None) -> GenerationResult:
        """Responses to the prompts (this worker's `row_block` of them), load-balanced over the
        engines by the scheduler (`generate_with_pool`)."""
        return generate_with_pool(self.pool, self.tokenizer, self.rollout_cfg, prompt_token_ids, seed=seed, greedy=greedy,
                                  first=row_block.start if row_block is not None else 0)

    @torch.no_grad()
    def load_bucket(self, parcel: Any) -> int:
        """Copy one bucket of weights (what `send_bucket` sent) into every engine through its
        receiver (STEMA's engine: in place, cast to its dtype by `refit_`); returns the number of
        weights copied."""
        bucket = received_bucket(parcel)
        for receiver in self.receivers:
            receiver.load(bucket)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return len(bucket)

    def engine_buffer_addresses(self) -> list[dict[str, int]]:
        """Each engine's weight buffer addresses (refit writes into them; they never change)."""
        return [{name: tensor.data_ptr() for name, tensor in engine.weights.buffers().items()} for engine in self.engines]

    def engine_weights(self) -> list[dict[str, torch.Tensor]]:
        """Each engine's weight buffers as CPU copies (for tests and debugging)."""
        return [{name: tensor.detach().cpu().clone() for name, tensor in engine.weights.buffers().items()}
                for engine in self.engines]


def send_bucket(bucket: dict[str, torch.Tensor], receivers: Sequence) -> list:
    """Hand one bucket {weight name: whole tensor} to every rollout worker (`receivers`: the rollout
    group's Ray actors) and start their `load_bucket`; returns the pending calls' references.
    Transport: the Ray object store, the bucket put once as CPU tensors (module docstring)."""
    import ray

    parcel = [ray.put({name: tensor.detach().cpu() for name, tensor in bucket.items()})]  # a list: Ray leaves it unresolved
    return [receiver.call.remote(RolloutWorker.load_bucket, (parcel,), {}) for receiver in receivers]


def received_bucket(parcel: Any) -> dict[str, torch.Tensor]:
    """The bucket `send_bucket` sent, on the receiving rollout worker."""
    import ray

    return ray.get(parcel[0])


@dataclass(frozen=True)
class EngineReceivers:
    """What an actor rank needs to refit a rollout role: its Ray actors, the engines' weight
    layout ([(name, shape)] in refit order) and the seconds a bucket may take."""

    members: list
    layout: list[tuple[str, tuple[int, ...]]]
    timeout_s: float


def start_rollout_role(*, workers: int, timeout_s: float, ray_address: str = "", **worker_kwargs: Any) -> RayGroupHandle:
    """The rollout role: `workers` (`roles.rollout_workers`) Ray actors, each a
    `RolloutWorker(**worker_kwargs)`, one per bundle of a placement group (a GPU each on GPU
    machines, a token CPU share on the CPU)."""
    return start_group("rollout", RolloutWorker, workers=workers, timeout_s=timeout_s, ray_address=ray_address,
                       **worker_kwargs)


def engine_receivers(rollout: RayGroupHandle, *, timeout_s: float) -> EngineReceivers:
    return EngineReceivers(members=list(rollout.members), layout=rollout.submit(RolloutWorker.weight_layout).result(),
                           timeout_s=timeout_s)


def remote_refitter(model: torch.nn.Module, receivers: EngineReceivers, *, bucket_bytes: int, world):
    """The actor side of the disaggregated refit (module docstring): a `stema.rollout.RemoteRefitter`
    whose `refit()`, on every rank of the actor, gathers the weights bucket by bucket; rank 0 sends
    each to the rollout workers (`send_bucket`) and waits for them before the next. `model` may be
    FSDP2-sharded or plain (one actor worker)."""
    from stema.rollout.remote import RemoteRefitter

    def send_and_wait(bucket: dict[str, torch.Tensor]) -> None:
        calls = send_bucket(bucket, receivers.members)
        GroupFuture("rollout", "load_bucket", calls, rank_zero, timeout_s=receivers.timeout_s).result()

    return RemoteRefitter(model, receivers.layout, send=send_and_wait, bucket_bytes=bucket_bytes, world=world)
