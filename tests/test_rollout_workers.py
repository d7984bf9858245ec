"""RolloutPool: engines in threads pull prompt batches from the kernel Scheduler; results come back
in prompt order and a slow worker ends up with clearly fewer prompts."""

from __future__ import annotations

import time

import pytest

from stema.models.families import build_family_model
from stema.models.tiny import build_tokenizer
from stema.rollout import GenerationEngine, RolloutPool, SamplingParams

PROMPTS = [[5 + index % 50, 17, 30 + index % 7][: 1 + index % 3] + [40] * (index % 5) for index in range(24)]
GREEDY = SamplingParams(temperature=0, max_new_tokens=4, eos_token_ids=())


@pytest.fixture(scope="module")
def model():
    return build_family_model("llama", tokenizer=build_tokenizer()).eval()


class SlowEngine:
    """An engine that sleeps `extra_seconds` before every batch: a worker of unequal speed."""

    def __init__(self, engine: GenerationEngine, extra_seconds: float):
        self.engine = engine
        self.extra_seconds = extra_seconds
        self.max_batch = engine.max_batch

    def generate(self, prompts, params, *, tokenizer=None):
        time.sleep(self.extra_seconds)
        return self.engine.generate(prompts, params, tokenizer=tokenizer)


class FailingEngine:
    max_batch = 4

    def generate(self, prompts, params, *, tokenizer=None):
        raise RuntimeError("engine fell over")


def engine_of(model) -> GenerationEngine:
    return GenerationEngine.from_hf(model, max_batch=4, max_total_len=16)


def test_results_come_back_in_prompt_order(model):
    pool = RolloutPool([engine_of(model), engine_of(model)], max_batch=3)
    result = pool.generate(PROMPTS, GREEDY)
    assert [sequence.prompt_token_ids for sequence in result.batch.sequences] == PROMPTS
    assert result.batch.token_ids == engine_of(model).generate(PROMPTS, GREEDY).token_ids
    assert sum(stats.prompts for stats in result.worker_stats) == len(PROMPTS)
    assert sum(stats.generated_tokens for stats in result.worker_stats) == 4 * len(PROMPTS)
    assert result.scheduler_stats["remaining"] == 0 and result.scheduler_stats["handed"] == len(PROMPTS)
    assert result.batch.padded().input_ids.shape[0] == len(PROMPTS)


def test_a_slow_worker_gets_clearly_fewer_prompts(model):
    """Two engines, one sleeping 0.2 s per batch of 2: the fast one pulls (and steals) the most."""
    fast, slow = engine_of(model), SlowEngine(engine_of(model), extra_seconds=0.2)
    start = time.perf_counter()
    result = RolloutPool([fast, slow], max_batch=2).generate(PROMPTS, GREEDY)
    elapsed = time.perf_counter() - start
    fast_stats, slow_stats = result.worker_stats
    assert fast_stats.prompts + slow_stats.prompts == len(PROMPTS)
    assert 2 * slow_stats.prompts < fast_stats.prompts, result.worker_stats
    assert slow_stats.seconds / slow_stats.batches > fast_stats.seconds / fast_stats.batches
    assert result.scheduler_stats["items_stolen"][0] > 0
    assert elapsed < 3.0
    assert [sequence.prompt_token_ids for sequence in result.batch.sequences] == PROMPTS


def test_an_engine_error_is_raised_to_the_caller(model):
    pool = RolloutPool([engine_of(model), FailingEngine()], max_batch=2)
    with pytest.raises(RuntimeError, match="engine fell over"):
        pool.generate(PROMPTS, GREEDY)


def test_pool_arguments_are_checked(model):
    with pytest.raises(ValueError, match="at least one engine"):
        RolloutPool([], max_batch=2)
    with pytest.raises(ValueError, match="at most 4 prompts"):
        RolloutPool([engine_of(model)], max_batch=8)
