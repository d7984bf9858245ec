"""Several rollout engines generating one set of prompts, load-balanced by the kernel Scheduler.

Each engine runs in its own Python thread (the engines' torch work releases the GIL) and pulls
batches of prompt indices from one `stema_kernels.Scheduler`, with cost = prompt length +
max_new_tokens per prompt. After each batch a worker reports its measured seconds, so the
scheduler learns each worker's speed and a slow worker ends up with fewer prompts (it steals less,
and is stolen from). Results come back in the original prompt order.

Sampling seeds: each batch is generated with `params.for_items(its prompt indices)`, so every
prompt samples from the stream it has in the whole list (`stema.rollout.sampling`): a pool's
samples do not depend on which worker or batch a prompt lands in (the greedy tokens of different
batch shapes can still differ where two logits tie to within rounding).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from stema_kernels import Scheduler

from .engine import Rollout, RolloutBatch
from .sampling import SamplingParams


@dataclass(frozen=True)
class WorkerStats:
    """What one worker did in one `RolloutPool.generate` call."""

    worker: int
    prompts: int
    batches: int
    seconds: float  # measured seconds inside the engine's generate
    generated_tokens: int


@dataclass(frozen=True)
class PoolResult:
    """`batch`: every prompt's rollout in prompt order; `worker_stats`: one per engine;
    `scheduler_stats`: `Scheduler.stats()` at the end."""

    batch: RolloutBatch
    worker_stats: list[WorkerStats]
    scheduler_stats: dict


@dataclass
class _WorkerTally:
    prompts: int = 0
    batches: int = 0
    seconds: float = 0.0
    generated_tokens: int = 0


class RolloutPool:
    """Runs `engines` (objects with `generate(prompts, params, *, tokenizer)` -> RolloutBatch,
    e.g. `GenerationEngine`s) in one thread each over a shared scheduler.

    Args:
        engines: one or more engines; each must accept batches of `max_batch` prompts.
        max_batch: most prompts per scheduler hand-out (one `generate` call).
    """

    def __init__(self, engines: list, *, max_batch: int):
        if not engines:
            raise ValueError("RolloutPool needs at least one engine")
        if max_batch < 1:
            raise ValueError(f"RolloutPool: max_batch must be >= 1, got {max_batch}")
        for index, engine in enumerate(engines):
            engine_max = getattr(engine, "max_batch", max_batch)
            if engine_max < max_batch:
                raise ValueError(f"RolloutPool: engine {index} takes at most {engine_max} prompts, max_batch is {max_batch}")
        self.engines = list(engines)
        self.max_batch = max_batch

    def generate(self, prompt_token_lists: list[list[int]], params: SamplingParams, *,
                 tokenizer=None) -> PoolResult:
        """Generate every prompt's response across the engines; see the module docstring."""
        prompts = [list(prompt) for prompt in prompt_token_lists]
        if not prompts:
            raise ValueError("RolloutPool.generate: no prompts")
        scheduler = Scheduler([len(prompt) + params.max_new_tokens for prompt in prompts],
                              num_workers=len(self.engines), max_batch=self.max_batch)
        run = _PoolRun(prompts, params, tokenizer, scheduler)
        threads = [
            threading.Thread(target=run.work, args=(worker, engine), name=f"stema-rollout-{worker}", daemon=True)
            for worker, engine in enumerate(self.engines)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if run.errors:
            raise run.errors[0]
        stats = [
            WorkerStats(worker, tally.prompts, tally.batches, tally.seconds, tally.generated_tokens)
            for worker, tally in enumerate(run.tallies(len(self.engines)))
        ]
        batch = RolloutBatch(run.results, run.pad_token_id)
        return PoolResult(batch=batch, worker_stats=stats, scheduler_stats=scheduler.stats())


class _PoolRun:
    """Shared state of one pool call; `work(worker, engine)` is each thread's loop."""

    def __init__(self, prompts: list[list[int]], params: SamplingParams, tokenizer, scheduler: Scheduler):
        self.prompts, self.params, self.tokenizer, self.scheduler = prompts, params, tokenizer, scheduler
        self.results: list[Rollout | None] = [None] * len(prompts)
        self.pad_token_id = 0
        self.errors: list[BaseException] = []
        self._tallies: dict[int, _WorkerTally] = {}
        self._failed = threading.Event()

    def tallies(self, num_workers: int) -> list[_WorkerTally]:
        return [self._tallies.get(worker, _WorkerTally()) for worker in range(num_workers)]

    def work(self, worker: int, engine) -> None:
        tally = self._tallies.setdefault(worker, _WorkerTally())
        try:
            while not self._failed.is_set():
                items = self.scheduler.next(worker)
                if items is None:
                    return
                start = time.perf_counter()
                batch = engine.generate([self.prompts[item] for item in items], self.params.for_items(items),
                                        tokenizer=self.tokenizer)
                seconds = time.perf_counter() - start
                self.scheduler.report(worker, seconds)
                self.pad_token_id = batch.pad_token_id
                for item, sequence in zip(items, batch.sequences):
                    self.results[item] = sequence
                tally.prompts += len(items)
                tally.batches += 1
                tally.seconds += seconds
                tally.generated_tokens += sum(len(sequence.token_ids) for sequence in batch.sequences)
        except BaseException as error:  # re-raised by the caller's thread
            self.errors.append(error)
            self._failed.set()
