"""Continuous batching in GenerationEngine: the same tokens as the static-batched path for greedy
and seeded sampling, with more prompts than cache slots, prompts of mixed lengths and sequences
ending by EOS, stop string and max_new_tokens; a freed slot is refilled at once; a prompt's sample
does not depend on its batch or slot; the engine's buffers keep their addresses, so refit in place
still holds.

Log-prob tolerance: both paths compute the same fp32 arithmetic, but the static path runs left-
padded batches and the continuous one unpadded, right-padded prefills and per-slot decode steps,
so sums are taken in other orders and over other GEMM shapes. Each logit is a dot product over at
most 2 * intermediate (= 128) terms per layer, two layers deep, of values of order 1: a relative
error of a few 128 * 2^-24 ~ 1e-5 of logits of order 10, the bound 1e-5 x 10 that
`test_rollout_engine` holds the engine to against transformers; a log-prob moves by at most twice
its logits' error, so 2e-4 covers it on any x86 kernel (AVX2 or AVX-512).
"""

from __future__ import annotations

import pytest
import torch

from stema.models.families import build_family_model
from stema.models.tiny import build_tokenizer
from stema.rollout import EngineRefitter, GenerationEngine, SamplingParams

from tiny_models import scramble

# Ten prompts of lengths 1 to 12, more than the 3 cache slots.
PROMPTS = [[5, 17, 30], [40, 41, 42, 43, 44, 45, 46, 47, 48], [60, 9, 70, 12, 80, 33], [90], [7, 8],
           [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22], [33, 34, 35, 36], [50], [61, 62, 63, 64, 65], [70, 71]]
MAX_NEW = 10
LOGPROB_TOLERANCE = 2e-4


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return scramble(build_family_model("llama", tokenizer=tokenizer), seed=21)


def engines(model, *, max_batch: int = 3) -> tuple[GenerationEngine, GenerationEngine]:
    """(continuous, static) engines on the same weights."""
    return (GenerationEngine.from_hf(model, max_batch=max_batch, max_total_len=32),
            GenerationEngine.from_hf(model, max_batch=max_batch, max_total_len=32, continuous_batching=False))


def assert_same_generations(continuous, static) -> None:
    assert continuous.token_ids == static.token_ids
    assert continuous.finish_reasons == static.finish_reasons
    for a, b in zip(continuous.sequences, static.sequences):
        assert a.prompt_token_ids == b.prompt_token_ids
        torch.testing.assert_close(a.logprobs, b.logprobs, rtol=0, atol=LOGPROB_TOLERANCE)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_continuous_equals_static_with_eos_stop_strings_and_length(model, tokenizer, temperature):
    continuous, static = engines(model)
    free = static.generate(PROMPTS, SamplingParams(temperature=temperature, max_new_tokens=MAX_NEW, eos_token_ids=(), seed=4))
    eos = free.token_ids[1][2]  # a token some sequences produce early
    stop = tokenizer.decode(free.token_ids[2][3:5])
    params = SamplingParams(temperature=temperature, max_new_tokens=MAX_NEW, eos_token_ids=[eos], stop_strings=[stop], seed=4)
    static_batch = static.generate(PROMPTS, params, tokenizer=tokenizer)
    continuous_batch = continuous.generate(PROMPTS, params, tokenizer=tokenizer)
    assert_same_generations(continuous_batch, static_batch)
    reasons = set(continuous_batch.finish_reasons)
    assert {"eos", "length"} <= reasons and ("stop" in reasons or temperature > 0), continuous_batch.finish_reasons
    assert len({len(tokens) for tokens in continuous_batch.token_ids}) > 2  # sequences of mixed lengths


@pytest.mark.parametrize("max_batch", [1, 2, 4, 16])
def test_seeded_samples_do_not_depend_on_slots_or_batches(model, max_batch):
    """Any max_batch, either mode, gives the tokens of one engine with room for all prompts; a
    prompt generated alone with seed + its index samples what it samples in the whole list."""
    params = SamplingParams(temperature=1.0, top_k=20, max_new_tokens=MAX_NEW, eos_token_ids=(), seed=9)
    reference = GenerationEngine.from_hf(model, max_batch=len(PROMPTS), max_total_len=32).generate(PROMPTS, params)
    continuous, static = engines(model, max_batch=max_batch)
    assert_same_generations(continuous.generate(PROMPTS, params), reference)
    assert_same_generations(static.generate(PROMPTS, params), reference)
    index = 5
    alone = continuous.generate([PROMPTS[index]], params.for_block(index))
    assert alone.token_ids[0] == reference.token_ids[index]
    assert len({tuple(tokens) for tokens in reference.token_ids}) == len(PROMPTS)


def test_equal_prompts_get_streams_of_their_own(model):
    params = SamplingParams(temperature=1.0, max_new_tokens=MAX_NEW, eos_token_ids=(), seed=2)
    group = GenerationEngine.from_hf(model, max_batch=4, max_total_len=32).generate([PROMPTS[0]] * 4, params)
    assert len({tuple(tokens) for tokens in group.token_ids}) > 1


def test_repeated_prompts_are_prefilled_once_and_sample_as_if_each_were(model):
    """Groups of equal prompts (as GRPO sends them): each admission prefills every distinct prompt
    once and copies its cache to the other slots, and the tokens and log-probs are the static
    path's, which prefills every row."""
    distinct = [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[4], PROMPTS[5]]  # lengths 3, 9, 6, 2, 12
    prompts = [prompt for prompt in distinct for _ in range(4)]
    continuous, static = engines(model, max_batch=6)
    prefilled = []
    prefill = continuous.decoder.prefill_hidden_states

    def counting_prefill(input_ids, valid, slots):
        prefilled.append(len(input_ids))
        return prefill(input_ids, valid, slots)

    continuous.decoder.prefill_hidden_states = counting_prefill
    params = SamplingParams(temperature=1.0, max_new_tokens=MAX_NEW, eos_token_ids=(), seed=3)
    assert_same_generations(continuous.generate(prompts, params), static.generate(prompts, params))
    # Every sequence runs MAX_NEW tokens, so slots free 6 at a time: [p0 x4, p1 x2], [p1 x2, p2 x4],
    # [p4 x4, p5 x2], [p5 x2].
    assert prefilled == [2, 2, 2, 1]


def test_a_finished_slot_is_refilled_at_once(model):
    """While prompts wait every decode step runs all 3 slots; the batch shrinks only once none wait
    (then for at most max_new_tokens steps), and it takes fewer steps than static batches of 3, each
    of which runs as long as its longest sequence."""
    continuous, static = engines(model)
    free = static.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=MAX_NEW, eos_token_ids=()))
    eos = free.token_ids[0][1]
    params = SamplingParams(temperature=0, max_new_tokens=MAX_NEW, eos_token_ids=[eos])
    batch_sizes = []
    decode = continuous.decoder.decode_hidden_states

    def counting_decode(tokens, columns):
        batch_sizes.append(len(tokens))
        return decode(tokens, columns)

    continuous.decoder.decode_hidden_states = counting_decode
    lengths = [len(tokens) for tokens in continuous.generate(PROMPTS, params).token_ids]
    assert min(lengths) < MAX_NEW  # some sequences end early
    assert sum(batch_sizes) == sum(lengths)  # one decoded token per generated token
    assert batch_sizes == sorted(batch_sizes, reverse=True) and batch_sizes[0] == 3
    assert sum(size < 3 for size in batch_sizes) <= MAX_NEW
    static_steps = sum(max(lengths[start:start + 3]) for start in range(0, len(PROMPTS), 3))
    assert len(batch_sizes) < static_steps


def test_buffers_keep_their_addresses_and_refit_in_place_holds(tokenizer):
    model = scramble(build_family_model("llama", tokenizer=tokenizer), seed=21)
    continuous, _ = engines(model)
    addresses = {name: tensor.data_ptr() for name, tensor in continuous.buffers().items()}
    refitter = EngineRefitter(continuous, model)
    params = SamplingParams(temperature=1.0, max_new_tokens=MAX_NEW, seed=3)
    continuous.generate(PROMPTS, params)
    trained = scramble(build_family_model("llama", tokenizer=tokenizer), seed=22)
    model.load_state_dict(trained.state_dict())  # in place: the plan's source addresses stay
    refitter.refit()
    after = continuous.generate(PROMPTS, params)
    assert {name: tensor.data_ptr() for name, tensor in continuous.buffers().items()} == addresses
    fresh = GenerationEngine.from_hf(trained, max_batch=3, max_total_len=32).generate(PROMPTS, params)
    assert after.token_ids == fresh.token_ids


def test_a_pool_samples_what_one_engine_samples_whatever_the_batches(model):
    """Two engines pulling batches of 3 (the scheduler hands out prompts longest first, so a batch's
    prompts are not consecutive) sample each prompt as one engine does over the whole list."""
    from stema.rollout import RolloutPool

    params = SamplingParams(temperature=1.0, max_new_tokens=MAX_NEW, eos_token_ids=(), seed=5)
    reference = GenerationEngine.from_hf(model, max_batch=len(PROMPTS), max_total_len=32).generate(PROMPTS, params)
    pool = RolloutPool([GenerationEngine.from_hf(model, max_batch=3, max_total_len=32) for _ in range(2)], max_batch=3)
    result = pool.generate(PROMPTS, params)
    assert_same_generations(result.batch, reference)
    assert sum(stats.batches for stats in result.worker_stats) >= 4
