"""Rollout engine: generation throughput against Hugging Face generate, continuous against static
batching, refit against a rebuild.

Models (random weights made in code, no download): the built-in tiny Llama (1.3M parameters,
vocabulary 100) and a ~55M-parameter Llama (hidden 512, 12 layers, 8 heads, intermediate 1408,
vocabulary 32000, tied embeddings). Each in fp32 and bf16, at batch 8 and 64.

- generate: tokens/s of `GenerationEngine.generate` (continuous batching) against the Hugging Face
  model's own `generate(do_sample=False)` on the same batch: prompt 32 tokens, greedy, exactly 64
  new tokens per sequence (EOS off).
- continuous vs static, same lengths: the same workload through the engine's static batches
  (`continuous_batching=False`): equal lengths give continuous batching nothing to refill, so this
  row shows its bookkeeping cost.
- continuous vs static, mixed lengths: 2 x batch prompts (so 2 static batches), sampled at
  temperature 1 with seed 0 and 1/64 of the vocabulary as EOS tokens (geometric response lengths,
  at most 64): a static batch runs as long as its longest sequence, continuous batching refills a
  finished sequence's slot. The tokens are identical in both modes (one sampling stream per prompt).
- refit vs rebuild: `EngineRefitter.refit()` (one RefitPlan apply into the existing buffers)
  against building the engine again with `GenerationEngine.from_hf` (allocate + copy).

No goals: figures to follow. Timings are best-of-`repeats` (common.best_seconds) after one
warm-up call of 2 new tokens per path (first-call kernel and allocator set-up); on a shared machine
read the ratios, measured side by side, not the absolute numbers. Rows print as they are measured.

    python benchmarks/bench_rollout.py [--device cuda] [--quick] [--repeats N] [--models tiny,55M]
"""

from __future__ import annotations

import argparse
from typing import NamedTuple

import torch

from common import best_seconds, device_label


class Model(NamedTuple):
    """A model of the benchmark (a NamedTuple: run_all loads this file without registering it as a
    module, which dataclasses need). `None` sizes: the built-in tiny model."""

    name: str
    hidden: int | None = None
    layers: int | None = None
    heads: int | None = None
    intermediate: int | None = None
    vocab: int | None = None


TINY = Model("tiny")
LLAMA_55M = Model("55M", hidden=512, layers=12, heads=8, intermediate=1408, vocab=32000)
QUICK = Model("quick", hidden=32, layers=2, heads=4, intermediate=64, vocab=128)
PROMPT, NEW_TOKENS = 32, 64
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_model(spec: Model, dtype: torch.dtype, device: str):
    """The model in `dtype` on `device`, seeded, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from stema.models.tiny import build_model as build_tiny

    torch.manual_seed(0)
    if spec.hidden is None:
        model = build_tiny()
    else:
        config = LlamaConfig(
            vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
            num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.heads,
            max_position_embeddings=PROMPT + NEW_TOKENS, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
            pad_token_id=0,
        )
        model = LlamaForCausalLM(config)
    return model.to(device=device, dtype=dtype).eval()


def row(*, case: str, metric: str, stema: float, baseline: float, higher_is_better: bool, baseline_name: str,
        device: str) -> dict:
    ratio = stema / baseline if higher_is_better else baseline / stema
    return {
        "benchmark": "rollout", "case": case, "metric": metric, "stema": stema, "baseline": baseline,
        "ratio": ratio, "higher_is_better": higher_is_better, "goal": None, "met": None,
        "baseline_name": baseline_name, "device": device_label(device),
    }


def random_prompts(count: int, vocab: int, *, seed: int) -> list[list[int]]:
    """`count` prompts of PROMPT token ids in [3, vocab) (0-2: pad, BOS, EOS)."""
    return torch.randint(3, vocab, (count, PROMPT), generator=torch.Generator().manual_seed(seed)).tolist()


def measure_generation(model, *, label: str, batch: int, dtype: torch.dtype, device: str, repeats: int) -> list[dict]:
    """Rows for one model, dtype and batch: engine vs HF generate, continuous vs static (same and
    mixed lengths)."""
    from stema.rollout import GenerationEngine, SamplingParams

    vocab = model.get_input_embeddings().weight.shape[0]

    def engine(continuous: bool) -> GenerationEngine:
        return GenerationEngine.from_hf(model, dtype=dtype, max_batch=batch, max_total_len=PROMPT + NEW_TOKENS,
                                        device=device, continuous_batching=continuous)

    continuous, static = engine(True), engine(False)
    prompts = random_prompts(batch, vocab, seed=1)
    greedy = SamplingParams(temperature=0, max_new_tokens=NEW_TOKENS, eos_token_ids=())
    input_ids = torch.tensor(prompts, device=device)

    def hf_generate(new_tokens: int = NEW_TOKENS):
        with torch.no_grad():
            model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)

    warm_up = SamplingParams(temperature=0, max_new_tokens=2, eos_token_ids=())
    continuous.generate(prompts, warm_up)
    static.generate(prompts, warm_up)
    hf_generate(2)

    def timed(fn) -> float:
        return best_seconds(fn, device=device, repeats=repeats, warmup=0)

    tokens = batch * NEW_TOKENS
    continuous_s = timed(lambda: continuous.generate(prompts, greedy))
    static_s = timed(lambda: static.generate(prompts, greedy))
    hf_s = timed(hf_generate)

    many = random_prompts(2 * batch, vocab, seed=2)
    mixed = SamplingParams(temperature=1.0, max_new_tokens=NEW_TOKENS, seed=0,
                           eos_token_ids=tuple(range(3, 3 + max(1, vocab // 64))))
    mixed_tokens = sum(len(tokens) for tokens in continuous.generate(many, mixed).token_ids)
    mixed_continuous_s = timed(lambda: continuous.generate(many, mixed))
    mixed_static_s = timed(lambda: static.generate(many, mixed))

    case = f"{label}, batch {batch}, prompt {PROMPT}"
    common = {"device": device, "metric": "tokens/s", "higher_is_better": True}
    return [
        row(case=f"generate (continuous), {case}, {NEW_TOKENS} new tokens, greedy", stema=tokens / continuous_s,
            baseline=tokens / hf_s, baseline_name="HF model.generate(do_sample=False)", **common),
        row(case=f"continuous vs static batching, {case}, {NEW_TOKENS} new tokens each, greedy",
            stema=tokens / continuous_s, baseline=tokens / static_s, baseline_name="STEMA engine, static batches",
            **common),
        row(case=f"continuous vs static batching, {case}, {2 * batch} prompts, mixed lengths (mean "
                 f"{mixed_tokens / (2 * batch):.0f} of <= {NEW_TOKENS} new tokens), sampled",
            stema=mixed_tokens / mixed_continuous_s, baseline=mixed_tokens / mixed_static_s,
            baseline_name="STEMA engine, static batches", **common),
    ]


def measure_refit(model, *, label: str, dtype: torch.dtype, device: str, repeats: int) -> dict:
    """Refit into the existing engine vs building the engine again (batch 8's cache)."""
    from stema.rollout import EngineRefitter, GenerationEngine

    def build():
        return GenerationEngine.from_hf(model, dtype=dtype, max_batch=8, max_total_len=PROMPT + NEW_TOKENS,
                                        device=device)

    refitter = EngineRefitter(build(), model)
    refit_s = best_seconds(refitter.refit, device=device, repeats=repeats, warmup=1)
    rebuild_s = best_seconds(build, device=device, repeats=repeats, warmup=1)
    return row(case=f"refit vs rebuild, {label}", metric="time_ms", stema=1e3 * refit_s, baseline=1e3 * rebuild_s,
               higher_is_better=False, baseline_name="GenerationEngine.from_hf", device=device)


def measured_rows(*, device: str, quick: bool, repeats: int, models: tuple[Model, ...] = (TINY, LLAMA_55M)):
    """Yields every row of the module docstring as it is measured (quick: a 2-layer toy model,
    fp32, batch 2)."""
    plan = ([(QUICK, "fp32", (2,))] if quick else
            [(spec, dtype, (8, 64)) for spec in models for dtype in DTYPES])
    for spec, dtype_name, batches in plan:
        dtype = DTYPES[dtype_name]
        model = build_model(spec, dtype, device)
        parameters = sum(parameter.numel() for parameter in model.parameters())
        label = f"{spec.name} Llama ({parameters / 1e6:.1f}M params) {dtype_name}"
        for batch in batches:
            yield from measure_generation(model, label=label, batch=batch, dtype=dtype, device=device,
                                          repeats=1 if quick else repeats)
        yield measure_refit(model, label=label, dtype=dtype, device=device, repeats=1 if quick else repeats)


def measure(*, device: str = "cpu", quick: bool = False, repeats: int = 3) -> list[dict]:
    """Every row of the module docstring, as a list (for run_all)."""
    return list(measured_rows(device=device, quick=quick, repeats=repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many timed runs per figure")
    parser.add_argument("--models", default="tiny,55M", help="comma-separated: tiny, 55M")
    args = parser.parse_args()
    models = tuple({spec.name: spec for spec in (TINY, LLAMA_55M)}[name] for name in args.models.split(","))
    for result in measured_rows(device=args.device, quick=args.quick, repeats=args.repeats, models=models):
        print(
            f"{result['case']} | {result['metric']}: stema {result['stema']:.3f} | "
            f"{result['baseline_name']} {result['baseline']:.3f} | x{result['ratio']:.2f} | {result['device']}",
            flush=True,
        )


if __name__ == "__main__":
    main()
