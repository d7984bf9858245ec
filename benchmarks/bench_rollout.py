"""Rollout engine: generation throughput against Hugging Face generate, refit against a rebuild.

One randomly initialized Llama-architecture model per size; the same prompts (all of one length),
greedy decoding, exactly `new_tokens` tokens per sequence (EOS off) for both sides.

- generation: tokens generated per second by `GenerationEngine.generate` against the Hugging Face
  model's own `generate(do_sample=False)` on the same batch (no goal: a figure to follow).
- roofline: the engine's tokens/s against the memory-bandwidth roofline, batch * bandwidth /
  (bytes read per decode step: every weight once plus the mean KV cache), the bandwidth measured
  here by one large `copy_` (reads + writes). Prefill counts in the engine's time, so this is a
  lower bound on the decode fraction of the roofline. No goal.
- refit: `EngineRefitter.refit()` (one RefitPlan apply into the existing buffers) against
  building the engine again with `GenerationEngine.from_hf` (allocate + copy). No goal.

Sizes: CPU hidden 256, 4 layers, vocab 2048, batch 8, prompt 32, 64 new tokens, fp32;
CUDA the shape of Qwen2-0.5B (hidden 896, 24 layers, 14 heads / 2 KV heads, intermediate 4864,
vocab 151936: 494M parameters), batch 32, prompt 128, 128 new tokens, bf16;
quick hidden 32, 2 layers, batch 2, prompt 8, 8 new tokens.

    python benchmarks/bench_rollout.py [--device cuda] [--quick]
"""

from __future__ import annotations

import argparse
from typing import NamedTuple

import torch

from common import best_seconds, device_label


class Size(NamedTuple):
    """Model and workload of one benchmark size (a NamedTuple: run_all loads this file without
    registering it as a module, which dataclasses need)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    batch: int
    prompt: int
    new_tokens: int
    dtype: torch.dtype
    repeats: int


SIZES = {
    "quick": Size(32, 2, 4, 2, 64, 128, batch=2, prompt=8, new_tokens=8, dtype=torch.float32, repeats=2),
    "cpu": Size(256, 4, 8, 4, 688, 2048, batch=8, prompt=32, new_tokens=64, dtype=torch.float32, repeats=3),
    "cuda": Size(896, 24, 14, 2, 4864, 151936, batch=32, prompt=128, new_tokens=128, dtype=torch.bfloat16,
                 repeats=3),
}


def build_model(size: Size, device: str):
    """A random LlamaForCausalLM of `size` in its dtype on `device` (seeded, no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=size.vocab, hidden_size=size.hidden, intermediate_size=size.intermediate,
        num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
        max_position_embeddings=size.prompt + size.new_tokens, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(size.dtype).eval()


def copy_bandwidth(device: str, *, repeats: int) -> float:
    """Bytes per second (read + written) of one fp32 copy_ of 256 MB (CUDA) or 64 MB (CPU)."""
    elements = (64 if device.startswith("cuda") else 16) * 2**20
    src = torch.randn(elements, device=device)
    dst = torch.empty_like(src)
    seconds = best_seconds(lambda: dst.copy_(src), device=device, repeats=repeats, warmup=1)
    return 2 * src.nbytes / seconds


def decode_bytes_per_step(engine, size: Size) -> float:
    """Bytes one decode step reads: every weight once, plus the KV cache at the mean length."""
    weight_bytes = sum(tensor.nbytes for name, tensor in engine.weights.buffers().items())
    mean_length = size.prompt + size.new_tokens / 2
    spec = engine.spec
    kv_bytes = (spec.num_layers * 2 * size.batch * spec.num_kv_heads * mean_length * spec.head_dim
                * engine.cache.tensor.element_size())
    return weight_bytes + kv_bytes


def row(*, case: str, metric: str, stema: float, baseline: float, higher_is_better: bool, baseline_name: str,
        device: str) -> dict:
    ratio = stema / baseline if higher_is_better else baseline / stema
    return {
        "benchmark": "rollout", "case": case, "metric": metric, "stema": stema, "baseline": baseline,
        "ratio": ratio, "higher_is_better": higher_is_better, "goal": None, "met": None,
        "baseline_name": baseline_name, "device": device_label(device),
    }


def measure(*, device: str = "cpu", quick: bool = False) -> list[dict]:
    """Rows: engine vs HF generate (tokens/s), engine vs bandwidth roofline (tokens/s), refit vs
    rebuild (ms)."""
    from stema.rollout import EngineRefitter, GenerationEngine, SamplingParams

    size = SIZES["quick" if quick else ("cuda" if device.startswith("cuda") else "cpu")]
    model = build_model(size, device)
    max_total_len = size.prompt + size.new_tokens

    def build_engine():
        return GenerationEngine.from_hf(model, dtype=size.dtype, max_batch=size.batch, max_total_len=max_total_len,
                                        device=device)

    engine = build_engine()
    generator = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, size.vocab, (size.batch, size.prompt), generator=generator)
    params = SamplingParams(temperature=0, max_new_tokens=size.new_tokens, eos_token_ids=())
    prompt_lists = prompts.tolist()
    prompts = prompts.to(device)

    def hf_generate():
        with torch.no_grad():
            model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                           max_new_tokens=size.new_tokens, min_new_tokens=size.new_tokens, pad_token_id=0)

    engine_seconds = best_seconds(lambda: engine.generate(prompt_lists, params), device=device, repeats=size.repeats, warmup=1)
    hf_seconds = best_seconds(hf_generate, device=device, repeats=size.repeats, warmup=1)
    refitter = EngineRefitter(engine, model)
    refit_seconds = best_seconds(refitter.refit, device=device, repeats=size.repeats, warmup=1)
    rebuild_seconds = best_seconds(build_engine, device=device, repeats=size.repeats, warmup=1)
    roofline_steps_per_second = copy_bandwidth(device, repeats=size.repeats) / decode_bytes_per_step(engine, size)

    tokens = size.batch * size.new_tokens
    parameters = sum(parameter.numel() for parameter in model.parameters())
    case = (f"{parameters / 1e6:.1f}M-param Llama {str(size.dtype).removeprefix('torch.')}, batch {size.batch}, "
            f"prompt {size.prompt}, {size.new_tokens} new tokens, greedy")
    common = {"device": device}
    return [
        row(case=f"generate, {case}", metric="tokens/s", stema=tokens / engine_seconds, baseline=tokens / hf_seconds,
            higher_is_better=True, baseline_name="HF model.generate(do_sample=False)", **common),
        row(case=f"generate vs roofline, {case}", metric="tokens/s", stema=tokens / engine_seconds,
            baseline=size.batch * roofline_steps_per_second, higher_is_better=True,
            baseline_name="memory-bandwidth roofline (copy_ GB/s)", **common),
        row(case=f"refit vs rebuild, {parameters / 1e6:.1f}M params", metric="time_ms", stema=1e3 * refit_seconds,
            baseline=1e3 * rebuild_seconds, higher_is_better=False, baseline_name="GenerationEngine.from_hf",
            **common),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    for result in measure(device=args.device, quick=args.quick):
        print(
            f"{result['case']} | {result['metric']}: stema {result['stema']:.3f} | "
            f"{result['baseline_name']} {result['baseline']:.3f} | x{result['ratio']:.2f} | {result['device']}"
        )


if __name__ == "__main__":
    main()
