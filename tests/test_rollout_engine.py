"""GenerationEngine against the Hugging Face model it was built from (tiny Llama, Qwen2 and
Mistral): logits at every position, greedy tokens, sampling log-probs against the trainer's
recompute, EOS / stop strings / length, top-k / top-p, seeds, the static cache and the errors."""

from __future__ import annotations

import math

import pytest
import torch

from stema.models.families import build_family_model, tiny_family_config
from stema.models.tiny import build_tokenizer
from stema.rollout import (
    GenerationEngine,
    SamplingParams,
    UnsupportedModelError,
    logprob_mismatch,
    response_token_logprobs,
)
from stema.rollout.sampling import StopStringMatcher, prompt_generators, sample_next_tokens, step_seed

from tiny_models import scramble

FAMILIES = ["llama", "qwen2", "mistral"]
PROMPTS = [[5, 17, 30], [40, 41, 42, 43, 44, 45, 46, 47, 48], [60, 9, 70, 12, 80, 33], [90]]
MAX_NEW = 12


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, tokenizer):
    return request.param, scramble(build_family_model(request.param, tokenizer=tokenizer), seed=1)


def left_padded(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    input_ids = torch.full((len(prompts), width), pad)
    mask = torch.zeros(len(prompts), width, dtype=torch.int64)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    return input_ids, mask


def hf_greedy(model, prompts, pad: int, *, eos: int | None) -> list[list[int]]:
    """model.generate(do_sample=False) per prompt (left-padded batch), cut after the first EOS."""
    input_ids, mask = left_padded(prompts, pad)
    output = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False, max_new_tokens=MAX_NEW,
                            eos_token_id=eos, pad_token_id=pad)
    responses = []
    for row in output[:, input_ids.shape[1]:].tolist():
        responses.append(row[: row.index(eos) + 1] if eos is not None and eos in row else row)
    return responses


def test_logits_equal_hf_forward_at_every_position(family_model, tokenizer):
    family, model = family_model
    engine = GenerationEngine.from_hf(model, max_batch=4, max_total_len=32)
    assert engine.dtype == torch.float32
    input_ids, mask = left_padded(PROMPTS, tokenizer.pad_token_id)
    mask[0, -1] = 0  # right padding too
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    expected = model(input_ids=input_ids, attention_mask=mask, position_ids=positions).logits
    actual = engine.forward(input_ids, attention_mask=mask)
    valid = mask.bool()
    assert expected[valid].abs().max() > 1.0  # non-trivial logits
    torch.testing.assert_close(actual[valid], expected[valid], rtol=1e-5, atol=1e-5)


def test_greedy_equals_hf_generate(family_model, tokenizer):
    family, model = family_model
    engine = GenerationEngine.from_hf(model, max_batch=4, max_total_len=32)
    batch = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=MAX_NEW, eos_token_ids=()))
    assert batch.token_ids == hf_greedy(model, PROMPTS, tokenizer.pad_token_id, eos=None)
    assert batch.finish_reasons == ["length"] * len(PROMPTS)
    assert len({tuple(tokens) for tokens in batch.token_ids}) > 1


def test_eos_ends_sequences_early_and_the_others_continue_unchanged(family_model, tokenizer):
    """With an EOS that some sequences produce early, those stop (their cache rows leave the batch)
    and every sequence equals its unstopped generation cut after the EOS, and HF's generate."""
    family, model = family_model
    engine = GenerationEngine.from_hf(model, max_batch=4, max_total_len=32)
    free = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=MAX_NEW, eos_token_ids=()))
    eos = free.token_ids[1][2]
    stopped = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=MAX_NEW, eos_token_ids=[eos]))
    for tokens, sequence in zip(free.token_ids, stopped.sequences):
        if eos in tokens:
            assert sequence.token_ids == tokens[: tokens.index(eos) + 1] and sequence.finish_reason == "eos"
        else:
            assert sequence.token_ids == tokens and sequence.finish_reason == "length"
    assert len(stopped.sequences[1].token_ids) <= 3
    assert stopped.token_ids == hf_greedy(model, PROMPTS, tokenizer.pad_token_id, eos=eos)


def test_default_eos_comes_from_the_model(tokenizer):
    model = scramble(build_family_model("llama", tokenizer=tokenizer), seed=1)
    engine = GenerationEngine.from_hf(model, max_batch=2, max_total_len=16)
    assert engine.eos_token_ids == (tokenizer.eos_token_id,)
    assert engine.pad_token_id == tokenizer.pad_token_id


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_sampling_logprobs_equal_the_trainer_recompute(family_model, temperature):
    """The engine-vs-trainer metric: the engine's log-probs of sampled tokens against
    token_logprobs on the HF model's logits of prompt + response, within 1e-4. With top-k/top-p
    on, the reported log-prob is still the full temperature-scaled policy's, not the truncated one."""
    family, model = family_model
    engine = GenerationEngine.from_hf(model, max_batch=4, max_total_len=32)
    params = SamplingParams(temperature=temperature, top_k=20, top_p=0.9, max_new_tokens=MAX_NEW, seed=3,
                            eos_token_ids=())
    padded = engine.generate(PROMPTS, params).padded()
    logits = model(input_ids=padded.input_ids, attention_mask=padded.attention_mask,
                   position_ids=padded.position_ids).logits
    trainer = response_token_logprobs(logits, padded.input_ids, padded.response_mask, temperature=temperature)
    mismatch = logprob_mismatch(padded.sampling_logprobs, trainer, padded.response_mask)
    assert mismatch["max"] < 1e-4 and mismatch["mean"] <= mismatch["max"]
    assert padded.sampling_logprobs[padded.response_mask].max() < 0

    # The truncated-and-renormalized log-prob differs (it is larger by log 1/kept mass).
    scaled = logits[:, :-1].detach() / temperature
    kept = scaled >= scaled.topk(20, dim=-1).values[..., -1:]
    truncated = torch.log_softmax(scaled.masked_fill(~kept, -math.inf), dim=-1)
    truncated = truncated.gather(-1, padded.input_ids[:, 1:, None]).squeeze(-1)
    gap = (truncated - padded.sampling_logprobs[:, 1:])[padded.response_mask[:, 1:]]
    assert gap.min() > 1e-3


def test_top_k_restricts_tokens_end_to_end(tokenizer):
    model = scramble(build_family_model("llama", tokenizer=tokenizer), seed=2)
    engine = GenerationEngine.from_hf(model, max_batch=4, max_total_len=32)
    padded = engine.generate(PROMPTS, SamplingParams(temperature=2.0, top_k=3, max_new_tokens=MAX_NEW, seed=0,
                                                     eos_token_ids=())).padded()
    logits = model(input_ids=padded.input_ids, attention_mask=padded.attention_mask,
                   position_ids=padded.position_ids).logits[:, :-1]
    sampled = padded.input_ids[:, 1:, None]
    rank = (logits > logits.gather(-1, sampled)).sum(-1)  # [B, T - 1]: 0 for the most likely token
    ranks = rank[padded.response_mask[:, 1:]]
    assert ranks.max() <= 2 and ranks.min() == 0 and (ranks > 0).any()


def test_top_k_1_equals_greedy(tokenizer):
    model = scramble(build_family_model("qwen2", tokenizer=tokenizer), seed=4)
    engine = GenerationEngine.from_hf(model, max_batch=4, max_total_len=32)
    greedy = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=MAX_NEW, eos_token_ids=()))
    top1 = engine.generate(PROMPTS, SamplingParams(temperature=1.5, top_k=1, max_new_tokens=MAX_NEW, seed=9,
                                                   eos_token_ids=()))
    assert top1.token_ids == greedy.token_ids


@pytest.mark.parametrize(
    ("top_k", "top_p", "allowed"),
    [(2, 1.0, [0, 1]), (0, 0.8, [0, 1]), (0, 0.9, [0, 1, 2]), (3, 0.5, [0]), (0, 1.0, [0, 1, 2, 3, 4, 5])],
)
def test_top_k_top_p_sample_the_renormalized_truncation(top_k, top_p, allowed):
    """Tiny vocabulary with probabilities 0.636, 0.234, 0.086, 0.032, 0.012, 0.004: 20000 draws
    hit exactly the allowed tokens, at their renormalized probabilities (within 0.015)."""
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0, -2.0]).repeat(20000, 1)
    params = SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p)
    tokens = sample_next_tokens(logits, params, prompt_generators(0, range(len(logits)), torch.device("cpu")))
    frequencies = torch.bincount(tokens, minlength=6).float() / tokens.numel()
    expected = torch.zeros(6)
    expected[allowed] = logits[0, allowed].softmax(-1)
    assert set(tokens.unique().tolist()) == set(allowed)
    assert (frequencies - expected).abs().max() < 0.015


def test_temperature_scales_the_sampling_distribution():
    logits = torch.tensor([1.0, 0.0]).repeat(20000, 1)
    tokens = sample_next_tokens(logits, SamplingParams(temperature=2.0), prompt_generators(1, range(len(logits)), torch.device("cpu")))
    assert abs(float((tokens == 0).float().mean()) - torch.tensor([0.5, 0.0]).softmax(-1)[0].item()) < 0.015


def test_same_seed_same_samples_other_seed_other_samples(tokenizer):
    model = scramble(build_family_model("mistral", tokenizer=tokenizer), seed=5)
    engine = GenerationEngine.from_hf(model, max_batch=4, max_total_len=32)

    def sample(seed: int):
        return engine.generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=MAX_NEW, seed=seed,
                                                       eos_token_ids=()))

    first, again, other = sample(7), sample(7), sample(8)
    assert first.token_ids == again.token_ids
    assert all(torch.equal(a.logprobs, b.logprobs) for a, b in zip(first.sequences, again.sequences))
    assert first.token_ids != other.token_ids


def test_stop_strings_end_sequences(tokenizer):
    model = scramble(build_family_model("llama", tokenizer=tokenizer), seed=6)
    engine = GenerationEngine.from_hf(model, max_batch=4, max_total_len=32)
    free = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=MAX_NEW, eos_token_ids=()))
    tokens = free.token_ids[0]
    stop = tokenizer.decode(tokens[:4])[len(tokenizer.decode(tokens[:2])):]  # the text of tokens 2 and 3
    assert stop
    batch = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=MAX_NEW, eos_token_ids=(),
                                                    stop_strings=[stop]), tokenizer=tokenizer)
    for free_tokens, sequence in zip(free.token_ids, batch.sequences):
        ends = [k for k in range(1, len(free_tokens) + 1) if stop in tokenizer.decode(free_tokens[:k])]
        expected_length = ends[0] if ends else len(free_tokens)
        assert sequence.token_ids == free_tokens[:expected_length]
        assert sequence.finish_reason == ("stop" if ends else "length")
        assert sequence.text == tokenizer.decode(sequence.token_ids, skip_special_tokens=True)
    assert batch.sequences[0].finish_reason == "stop" and len(batch.sequences[0].token_ids) <= 4
    with pytest.raises(ValueError, match="need a tokenizer"):
        engine.generate(PROMPTS, SamplingParams(max_new_tokens=4, stop_strings=["x"]))


def subword_tokenizer(kind: str):
    """A small BPE tokenizer trained in code: `bytelevel` (GPT-2's byte-level pieces, so one
    character may take several tokens) or `metaspace` (Llama/sentencepiece style, with byte
    fallback: a decoded window may drop the leading space of its first word)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["the cat sat on the mat. ### User: café naïve 日本語 tokens 1234"] * 4 + ["日本 the end ### Assistant:"] * 4
    if kind == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tok = Tokenizer(models.BPE(byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[f"<0x{b:02X}>" for b in range(256)])
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
def test_stop_strings_are_found_from_a_window_as_from_the_whole_response(kind):
    """The matcher decodes only the response's last tokens; it stops at the same token as
    decoding the whole response each time would, including stop strings of multi-byte characters
    split across tokens and stop strings that start with a space."""
    tokenizer = subword_tokenizer(kind)
    rng = torch.Generator().manual_seed(0)
    vocab = len(tokenizer)
    found = 0
    for stop in ("### User:", " the end", "日本", "🙂", "€ü", "\n\n"):  # the last three: not in the corpus
        matcher = StopStringMatcher((stop,), tokenizer)  # its window: 4 tokens per character + 8
        for _ in range(40):
            before = torch.randint(vocab, (int(torch.randint(0, 3 * matcher.window, (1,), generator=rng)),), generator=rng).tolist()
            after = torch.randint(vocab, (5,), generator=rng).tolist()
            response = before + tokenizer.encode("x" + stop + "y", add_special_tokens=False) + after
            whole = next((k for k in range(1, len(response) + 1) if stop in tokenizer.decode(response[:k])), None)
            windowed = next((k for k in range(1, len(response) + 1) if matcher.matches(response[:k])), None)
            assert windowed == whole, stop
            found += whole is not None
    assert found == 240  # every response holds its stop string somewhere


def test_max_new_tokens_and_the_padded_form(tokenizer):
    model = scramble(build_family_model("llama", tokenizer=tokenizer), seed=7)
    engine = GenerationEngine.from_hf(model, max_batch=4, max_total_len=32)
    free = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=MAX_NEW, eos_token_ids=()))
    eos = free.token_ids[2][4]
    batch = engine.generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=5, seed=1, eos_token_ids=[eos]))
    assert all(len(tokens) <= 5 for tokens in batch.token_ids)
    assert all(len(s.token_ids) == 5 for s in batch.sequences if s.finish_reason == "length")
    padded = batch.padded()
    width = max(map(len, PROMPTS))
    assert padded.prompt_width == width
    for row, sequence in enumerate(batch.sequences):
        length = len(sequence.token_ids)
        response = padded.input_ids[row, width:width + length].tolist()
        assert response == sequence.token_ids
        assert padded.response_mask[row].sum() == length and padded.response_mask[row, width:width + length].all()
        assert padded.attention_mask[row].sum() == len(PROMPTS[row]) + length
        assert padded.input_ids[row, width - len(PROMPTS[row]):width].tolist() == PROMPTS[row]
        assert padded.position_ids[row, width + length - 1] == len(PROMPTS[row]) + length - 1
        torch.testing.assert_close(padded.sampling_logprobs[row, width:width + length], sequence.logprobs)
    assert (padded.sampling_logprobs[~padded.response_mask] == 0).all()


def test_more_prompts_than_max_batch_run_in_batches(tokenizer):
    model = scramble(build_family_model("qwen2", tokenizer=tokenizer), seed=8)
    params = SamplingParams(temperature=0, max_new_tokens=6, eos_token_ids=())
    small = GenerationEngine.from_hf(model, max_batch=2, max_total_len=32).generate(PROMPTS, params)
    singles = [GenerationEngine.from_hf(model, max_batch=1, max_total_len=32).generate([p], params).token_ids[0]
               for p in PROMPTS]
    assert small.token_ids == singles


def test_static_cache_and_weights_are_allocated_once(tokenizer):
    model = scramble(build_family_model("llama", tokenizer=tokenizer), seed=9)
    engine = GenerationEngine.from_hf(model, max_batch=4, max_total_len=32)
    buffers = engine.buffers()
    assert buffers["kv_cache"].shape == (2, 2, 4, 2, 32, 8)  # [layers, 2, max_batch, KV, max_total_len, d]
    addresses = {name: tensor.data_ptr() for name, tensor in buffers.items()}
    for seed in range(2):
        engine.generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=MAX_NEW, seed=seed))
    engine.forward(torch.tensor(PROMPTS[1])[None])
    assert {name: tensor.data_ptr() for name, tensor in engine.buffers().items()} == addresses


def test_fused_layout(tokenizer):
    model = scramble(build_family_model("qwen2", tokenizer=tokenizer), seed=11)
    engine = GenerationEngine.from_hf(model, max_batch=1, max_total_len=8, dtype=torch.bfloat16)
    attention, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    q_rows = attention.q_proj.weight.shape[0]
    kv_rows = attention.k_proj.weight.shape[0]
    weights = engine.weights
    assert weights.qkv_weight.dtype == torch.bfloat16 and weights.lm_head is weights.embed
    assert torch.equal(weights.qkv_weight[1, q_rows:q_rows + kv_rows], attention.k_proj.weight.to(torch.bfloat16))
    assert torch.equal(weights.qkv_bias[1, q_rows + kv_rows:], attention.v_proj.bias.to(torch.bfloat16))
    assert torch.equal(weights.gate_up_weight[1, mlp.up_proj.weight.shape[0]:], mlp.up_proj.weight.to(torch.bfloat16))


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 16, "rope_theta": 10000.0},
    ],
    ids=["linear", "llama3"],
)
def test_supported_rope_scaling_matches_hf(rope, tokenizer):
    from transformers import LlamaForCausalLM

    config = tiny_family_config("llama", vocab_size=len(tokenizer))
    config.rope_parameters = rope
    torch.manual_seed(0)
    model = scramble(LlamaForCausalLM(config), seed=10)
    engine = GenerationEngine.from_hf(model, max_batch=1, max_total_len=40)
    input_ids = torch.arange(4, 40)[None]
    torch.testing.assert_close(engine.forward(input_ids), model(input_ids=input_ids).logits, rtol=1e-5, atol=1e-5)


def test_unsupported_models_raise_clear_errors(tokenizer):
    from transformers import LlamaForCausalLM

    for family, architecture in (("gpt2", "GPT2"), ("gemma", "Gemma")):
        with pytest.raises(UnsupportedModelError, match=rf"{architecture}.*Llama family.*HFGenerator"):
            GenerationEngine.from_hf(build_family_model(family, tokenizer=tokenizer), max_batch=1, max_total_len=8)
    config = tiny_family_config("llama", vocab_size=len(tokenizer))
    config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(UnsupportedModelError, match="'dynamic' is not implemented"):
        GenerationEngine.from_hf(LlamaForCausalLM(config), max_batch=1, max_total_len=8)


def test_sliding_window_must_cover_the_sequence(tokenizer):
    from transformers import MistralForCausalLM

    config = tiny_family_config("mistral", vocab_size=len(tokenizer))
    config.sliding_window = 16
    model = MistralForCausalLM(config)
    with pytest.raises(UnsupportedModelError, match="sliding window of 16"):
        GenerationEngine.from_hf(model, max_batch=1, max_total_len=32)
    GenerationEngine.from_hf(model, max_batch=1, max_total_len=16)


def test_bad_inputs_raise(tokenizer):
    engine = GenerationEngine.from_hf(build_family_model("llama", tokenizer=tokenizer), max_batch=2, max_total_len=16)
    with pytest.raises(ValueError, match="exceeds the engine's max_total_len"):
        engine.generate([[5] * 10], SamplingParams(max_new_tokens=7))
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[5], []], SamplingParams())
    with pytest.raises(ValueError, match="outside"):
        engine.generate([[10**6]], SamplingParams())
    with pytest.raises(ValueError, match="max_batch"):
        engine.forward(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="move the model there first"):
        GenerationEngine.from_hf(build_family_model("llama", tokenizer=tokenizer), max_batch=1, max_total_len=8,
                                 device="meta")
    for bad in (dict(temperature=-1), dict(top_p=0.0), dict(top_k=-1), dict(max_new_tokens=0), dict(stop_strings=[""])):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)
    with pytest.raises(TypeError, match="stop_strings"):
        SamplingParams(stop_strings="abc")


def test_consecutive_training_steps_draw_new_streams(tokenizer):
    """PPO seeds step k's prompts with step_seed(seed, k) + index. With base seed + k instead,
    prompt i of step k + 1 would sample prompt i + 1's stream of step k: a group of equal prompts
    (GRPO) would get the previous step's samples back, shifted by one."""
    model = scramble(build_family_model("llama", tokenizer=tokenizer), seed=1)
    engine = GenerationEngine.from_hf(model, max_batch=8, max_total_len=32)
    group = [PROMPTS[0]] * 8
    samples = [engine.generate(group, SamplingParams(temperature=1.0, max_new_tokens=MAX_NEW, seed=step_seed(0, step),
                                                     eos_token_ids=())).token_ids for step in (1, 2)]
    assert len({tuple(tokens) for tokens in samples[0]}) == len(group)  # a group's samples differ
    assert not set(map(tuple, samples[1])) & set(map(tuple, samples[0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_query_attention_equals_attention_in_float64(dtype):
    """`single_query_attention` (the decode step's attention, grouped-query heads) against
    softmax(q k^T / sqrt(d) + bias) v in float64, columns masked out by the bias included.

    Tolerance: fp32 sums of at most T + d products of inputs below max|v| (|q|, |k| < 4 here),
    each rounding by eps: (T + d) * eps * max|v| * 8 (the 8 covers the scores' magnitude in the
    softmax's exponent). bf16: the scores are rounded to bf16 once (relative 2^-8, so absolute
    2^-8 * max|score|), which moves each probability by up to that relative amount; probabilities and
    outputs are rounded to bf16 once more each: max|v| * 2^-8 * (2 * max|score| + 2)."""
    from stema.rollout.decoder import additive_bias, single_query_attention

    generator = torch.Generator().manual_seed(0)
    n, heads, kv_heads, columns, d = 3, 4, 2, 10, 16
    q = torch.randn(n, heads, 1, d, generator=generator)
    keys = torch.randn(n, kv_heads, columns, d, generator=generator)
    values = torch.randn(n, kv_heads, columns, d, generator=generator)
    allowed = torch.rand(n, columns, generator=generator) > 0.3
    allowed[:, 0] = True
    bias = additive_bias(allowed[:, None, None])
    scale = d**-0.5
    scores = (q.double().view(n, kv_heads, heads // kv_heads, d) @ keys.double().transpose(-1, -2)) * scale
    expected = (scores + bias.double()).softmax(-1) @ values.double()  # [n, KV, H / KV, d]
    expected = expected.view(n, heads, 1, d)
    actual = single_query_attention(q.to(dtype), keys.to(dtype), values.to(dtype), bias=bias, scale=scale)
    assert actual.dtype == dtype and actual.shape == (n, heads, 1, d)
    largest_value = values.abs().max().item()
    if dtype == torch.float32:
        tolerance = (columns + d) * torch.finfo(torch.float32).eps * largest_value * 8
    else:
        tolerance = largest_value * 2**-8 * (2 * scores.abs().max().item() + 2)
    torch.testing.assert_close(actual.double(), expected, rtol=0, atol=tolerance)


def test_prepacked_and_plain_engines_agree(family_model, tokenizer):
    """The prepacked linear weights (default on the CPU) give the plain engine's logits (fp32: the
    two GEMMs differ only in the order of their sums, 1e-5 as against HF) and its greedy tokens."""
    from stema.rollout.packed import can_prepack

    _, model = family_model
    packed = GenerationEngine.from_hf(model, max_batch=4, max_total_len=32)
    plain = GenerationEngine.from_hf(model, max_batch=4, max_total_len=32, prepack=False)
    assert packed.prepacked == can_prepack(device=torch.device("cpu"), dtype=torch.float32)
    assert not plain.prepacked
    input_ids, mask = left_padded(PROMPTS, tokenizer.pad_token_id)
    torch.testing.assert_close(packed.forward(input_ids, attention_mask=mask),
                               plain.forward(input_ids, attention_mask=mask), rtol=1e-5, atol=1e-5)
    params = SamplingParams(temperature=0, max_new_tokens=MAX_NEW, eos_token_ids=())
    assert packed.generate(PROMPTS, params).token_ids == plain.generate(PROMPTS, params).token_ids


def test_prepack_is_refused_where_it_cannot_run(tokenizer):
    model = build_family_model("llama", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="prepack=True needs a CPU engine in float32"):
        GenerationEngine.from_hf(model, max_batch=1, max_total_len=8, dtype=torch.float16, prepack=True)
    assert not GenerationEngine.from_hf(model, max_batch=1, max_total_len=8, dtype=torch.float16).prepacked


def test_decode_attention_paths_agree(family_model):
    """The CPU decode step (`single_query_attention` over every cache column) and the one CUDA
    keeps (scaled_dot_product_attention over the filled columns), run here on the CPU: the same
    greedy tokens and log-probs within fp32 summation-order error (1e-5, as against HF)."""
    _, model = family_model
    params = SamplingParams(temperature=0, max_new_tokens=MAX_NEW, eos_token_ids=())
    cpu_path = GenerationEngine.from_hf(model, max_batch=2, max_total_len=32)
    sdpa_path = GenerationEngine.from_hf(model, max_batch=2, max_total_len=32)
    sdpa_path.decoder.single_query_matmuls = False
    expected, actual = sdpa_path.generate(PROMPTS, params), cpu_path.generate(PROMPTS, params)
    assert actual.token_ids == expected.token_ids
    for a, b in zip(actual.sequences, expected.sequences):
        torch.testing.assert_close(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-5)
