"""The generation fallback for families the rollout engine does not serve (`stema.rollout.HFGenerator`,
chosen by `stema.rollout.build_generator`), on a tiny GPT-2: its greedy output is transformers'
own, its log-probs are the model's, seeded sampling repeats, finish reasons follow the engine's rule;
and `stema generate`, `stema rs` and `stema spin` run end to end on GPT-2."""

import json
import math

import pytest
import torch

from stema.cli import main
from stema.config import ConfigError, SamplingConfig
from stema.distributed import World
from stema.models.families import build_family_model, save_family_model
from stema.models.tiny import build_tokenizer
from stema.rollout import GenerationEngine, HFGenerator, SamplingParams, build_generator, response_token_logprobs
from stema.training.logging import read_metrics

from tiny_models import spread

PROMPTS = ["hello", "ab", "what is 1+1?", "x", "The quick brown", "7*8="]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def spread_gpt2(tokenizer, *, seed: int):
    """A tiny GPT-2 (24K parameters) whose matrices are drawn from N(0, 0.3^2): varied greedy
    choices far from ties (its 0.02 initialization gives near-uniform logits)."""
    return spread(build_family_model("gpt2", tokenizer=tokenizer), seed=seed).eval()


@pytest.fixture(scope="module")
def gpt2(tokenizer):
    return spread_gpt2(tokenizer, seed=3)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [tokenizer.encode(text) for text in PROMPTS]


def recomputed_logprobs(model, batch, *, temperature: float) -> torch.Tensor:
    """The model's own log-probs of the batch's response tokens, [B, P + R] (0 off the responses)."""
    padded = batch.padded()
    logits = model(input_ids=padded.input_ids, attention_mask=padded.attention_mask, position_ids=padded.position_ids).logits
    return response_token_logprobs(logits, padded.input_ids, padded.response_mask, temperature=temperature).detach()


def test_greedy_equals_transformers_generate_prompt_by_prompt(gpt2, tokenizer, prompts):
    # Batches of 4: the first is left-padded to its longest prompt, the second is the rest.
    batch = HFGenerator(gpt2, max_batch=4).generate(prompts, SamplingParams(temperature=0, max_new_tokens=10), tokenizer=tokenizer)
    for prompt, sequence in zip(prompts, batch.sequences):
        expected = gpt2.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.int64),
                                 do_sample=False, max_new_tokens=10, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)[0, len(prompt):].tolist()
        assert sequence.prompt_token_ids == prompt and sequence.token_ids == expected
        assert sequence.text == tokenizer.decode(expected, skip_special_tokens=True)
    padded = batch.padded()
    torch.testing.assert_close(padded.sampling_logprobs, recomputed_logprobs(gpt2, batch, temperature=1.0), atol=1e-5, rtol=0)


def test_seeded_sampling_repeats_and_leaves_the_global_rng_alone(gpt2, tokenizer, prompts):
    generator = HFGenerator(gpt2, max_batch=4)
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, max_new_tokens=10, seed=5)
    torch.manual_seed(123)
    first = generator.generate(prompts, params)
    after_first = torch.rand(3)
    torch.manual_seed(123)
    second = generator.generate(prompts, params)
    assert torch.equal(torch.rand(3), after_first)  # the caller's RNG stream is not consumed
    assert first.token_ids == second.token_ids
    assert generator.generate(prompts, SamplingParams(temperature=0.8, top_p=0.9, top_k=20, max_new_tokens=10, seed=6)).token_ids != first.token_ids
    for one, other in zip(first.sequences, second.sequences):
        assert torch.equal(one.logprobs, other.logprobs)
    # Full-vocabulary log-probs at the sampling temperature, as the engine reports them.
    torch.testing.assert_close(first.padded().sampling_logprobs, recomputed_logprobs(gpt2, first, temperature=0.8), atol=1e-5, rtol=0)


def test_only_the_sampling_params_apply_not_the_checkpoints_generation_config(tokenizer, prompts):
    model = spread_gpt2(tokenizer, seed=3)
    params = SamplingParams(temperature=1.0, max_new_tokens=10, seed=0)
    plain = HFGenerator(model, max_batch=8).generate(prompts, params).token_ids
    model.generation_config.top_k = 1
    model.generation_config.repetition_penalty = 5.0
    assert HFGenerator(model, max_batch=8).generate(prompts, params).token_ids == plain
    assert model.generation_config.top_k == 1  # restored after the call
    greedy = HFGenerator(model, max_batch=8).generate(prompts, SamplingParams(temperature=0, max_new_tokens=10)).token_ids
    assert HFGenerator(model, max_batch=8).generate(prompts, SamplingParams(top_k=1, max_new_tokens=10, seed=1)).token_ids == greedy


def test_finish_reasons_eos_stop_and_length(gpt2, tokenizer, prompts):
    generator = HFGenerator(gpt2, max_batch=4)
    free = generator.generate(prompts, SamplingParams(temperature=0, max_new_tokens=8, eos_token_ids=())).token_ids
    assert all(len(tokens) == 8 for tokens in free)
    eos = next(token for token in free[0] if any(token not in tokens for tokens in free))  # ends some rows, not all
    batch = generator.generate(prompts, SamplingParams(temperature=0, max_new_tokens=8, eos_token_ids=(eos,)))
    for tokens, sequence in zip(free, batch.sequences):
        cut = tokens.index(eos) + 1 if eos in tokens else len(tokens)
        assert sequence.token_ids == tokens[:cut] and len(sequence.logprobs) == cut
        assert sequence.finish_reason == ("eos" if eos in tokens else "length")
    assert set(batch.finish_reasons) == {"eos", "length"}
    stop = tokenizer.decode([free[1][2]])  # one character: row 1 stops by its 3rd token
    stopped = generator.generate(prompts, SamplingParams(temperature=0, max_new_tokens=8, eos_token_ids=(), stop_strings=(stop,)),
                                 tokenizer=tokenizer)
    for tokens, sequence in zip(free, stopped.sequences):
        text = tokenizer.decode(tokens)
        cut = text.index(stop) + 1 if stop in text else len(tokens)  # one token per character
        assert sequence.token_ids == tokens[:cut]
        assert sequence.finish_reason == ("stop" if stop in text else "length")
    assert stopped.finish_reasons[1] == "stop"
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generator.generate([prompts[0]], SamplingParams(max_new_tokens=200))


def test_build_generator_falls_back_once_refits_by_following_the_model_and_refuses_several_processes(gpt2, tokenizer, prompts):
    lines = []
    llama = build_family_model("llama", tokenizer=tokenizer)
    sampling = SamplingConfig()
    assert isinstance(build_generator(llama, sampling, max_batch=2, max_total_len=32, say=lines.append), GenerationEngine) and not lines
    generator = build_generator(gpt2, sampling, max_batch=2, max_total_len=32, world=World(role="rs"), say=lines.append)
    assert isinstance(generator, HFGenerator) and len(lines) == 1 and "'gpt2'" in lines[0]
    # "Refit" after training: generate with the trained model itself.
    trained = spread_gpt2(tokenizer, seed=4)
    greedy = SamplingParams(temperature=0, max_new_tokens=6)
    before = generator.generate(prompts, greedy).token_ids
    generator.refitter(trained, world=World(role="rs")).refit()
    assert generator.model is trained
    assert generator.generate(prompts, greedy).token_ids == HFGenerator(trained, max_batch=2).generate(prompts, greedy).token_ids != before
    with pytest.raises(ConfigError, match=r"'gpt2' models.*sharded over 2 processes; run stema spin in one process"):
        build_generator(gpt2, sampling, max_batch=2, max_total_len=32, world=World(role="spin", world_size=2), say=lines.append)


SMALL = [
    "data.train=builtin", "data.builtin_size=8", "data.eval=builtin", "data.builtin_eval_size=4", "data.max_length=48",
    "trainer.global_batch_size=4", "trainer.micro_batch_size=2", "trainer.max_steps=2", "trainer.progress_bar=false",
    "trainer.tensorboard=false", "sampling.max_new_tokens=8", "optim.lr=1e-3",
]


def reward_short(prompt, completion):
    """A test reward: shorter completions are better."""
    return -float(len(completion))


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    return save_family_model(tmp_path_factory.mktemp("model") / "gpt2", "gpt2")


def test_generate_rs_and_spin_run_on_gpt2(tmp_path, gpt2_folder, capsys):
    from transformers import AutoModelForCausalLM

    generations = tmp_path / "generations.jsonl"
    assert main(["generate", f"model.path={gpt2_folder}", "data.train=builtin", "data.builtin_size=3", "sampling.max_new_tokens=8",
                 f"generate.output={generations}"]) == 0
    rows = [json.loads(line) for line in generations.read_text().splitlines()]
    assert len(rows) == 3 and all(row["finish_reason"] in ("eos", "length") and isinstance(row["completion"], str) for row in rows)
    assert capsys.readouterr().err.count("generating with transformers' generate() instead") == 1

    rs = tmp_path / "rs"
    # Winners must end with EOS, which the untrained model samples about once in 100 tokens.
    assert main(["rs", f"model.path={gpt2_folder}", f"trainer.output_dir={rs}", *SMALL, "sampling.max_new_tokens=24",
                 "rs.num_samples=8", f"reward.function={__name__}:reward_short"]) == 0
    summary = json.loads((rs / "rs_summary.json").read_text())
    assert summary["steps"] == 2 and summary["winners"] >= 4
    assert math.isfinite(summary["greedy_reward_before"]) and math.isfinite(summary["greedy_reward_after"])
    assert len((rs / "rs_samples.jsonl").read_text().splitlines()) == 8 * 8
    assert AutoModelForCausalLM.from_pretrained(rs / "hf").config.model_type == "gpt2"

    spin = tmp_path / "spin"
    assert main(["spin", f"model.path={gpt2_folder}", f"trainer.output_dir={spin}", *SMALL, "spin.iterations=2"]) == 0
    history = json.loads((spin / "spin_summary.json").read_text())["iterations"]
    assert [entry["iteration"] for entry in history] == [0, 1, 2]
    # The held-out numbers move between iterations: generation and scoring follow the trained model.
    assert history[0]["gt_logprob"] != history[1]["gt_logprob"] != history[2]["gt_logprob"]
    assert [(r["iteration"], r["step"]) for r in read_metrics(spin, "train")] == [(1, 1), (1, 2), (2, 3), (2, 4)]
    assert AutoModelForCausalLM.from_pretrained(spin / "hf").config.model_type == "gpt2"
    assert capsys.readouterr().err.count("generating with transformers' generate() instead") == 2  # once per run
