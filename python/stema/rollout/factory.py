"""The one place that chooses a rollout backend: `build_generator`.

    generator = build_generator(model, config.rollout, world=world, max_batch=64, max_total_len=256, say=run.say)
    refitter = generator.refitter(model, world=world, bucket_bytes=256 << 20)
    batch = generate_once(model, tokenizer, prompts, config.sampling)      # `stema generate`, the demo

Backends (`rollout.backend` for PPO/GRPO, `sampling.backend` for generate, rs and spin) are
registered by name with `@register_backend(name)`:

- `stema` (default): STEMA's own engine (`GenerationEngine`) for the Llama, Qwen2 and Mistral
  families. For a family it does not serve (GPT-2, Gemma, Phi-3, ...; `UnsupportedModelError`) it
  falls back to `hf`, said once through `say`.
- `hf`: transformers' own `generate` on the live model (`HFGenerator`): slower, nothing to refit,
  one process only (a model sharded over several processes cannot generate different numbers of
  blocks per rank), so it is refused in a distributed world.
- `vllm`: `stema.rollout.vllm`, imported on first use (it registers itself), so that `import stema`
  never imports vLLM; without the module or vLLM it is a ConfigError naming the field.

A builder is `builder(model, rollout_config, *, world, max_batch, max_total_len, dtype, say)` and
returns a `Generator` (`stema.rollout.base`) built from `model`'s current weights, before the model
is sharded.
"""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path
from typing import Callable, Sequence

import torch

from stema.config import ConfigError, PPOConfig, SamplingConfig
from stema.registry import Registry

from .architecture import SUPPORTED_MODEL_TYPES, UnsupportedModelError
from .base import Generator
from .sampling import SamplingParams

BACKENDS: Registry[Callable[..., Generator]] = Registry("rollout backend")
# Backends whose module is imported only when a run asks for them (each registers itself on import).
LAZY_BACKEND_MODULES = {"vllm": "stema.rollout.vllm"}
ENGINE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def register_backend(name: str):
    """`@register_backend("name")` adds a backend builder (module docstring)."""
    return BACKENDS.register(name)


def backend_builder(name: str, *, field: str = "rollout.backend") -> Callable[..., Generator]:
    """The builder registered as `name`, importing its module first when it is a lazy one;
    ConfigError naming `field` when it is unknown or its module cannot be imported."""
    if name not in BACKENDS and name in LAZY_BACKEND_MODULES:
        try:
            importlib.import_module(LAZY_BACKEND_MODULES[name])
        except ImportError as error:
            raise ConfigError(f"{field}: the {name!r} backend is not available here ({error})") from None
    if name not in BACKENDS:
        known = sorted({*BACKENDS.names(), *LAZY_BACKEND_MODULES})
        raise ConfigError(f"{field}: unknown rollout backend {name!r} (known: {', '.join(known)})")
    return BACKENDS.get(name)


def engine_dtype(name: str) -> torch.dtype | None:
    """`rollout.engine_dtype` as a torch dtype; None for 'auto' (the engine's default)."""
    return None if name == "auto" else ENGINE_DTYPES[name]


def build_generator(model: torch.nn.Module, rollout_config, *, world=None, max_batch: int, max_total_len: int,
                    dtype: torch.dtype | None = None, say: Callable[[str], None] | None = None,
                    field: str = "rollout.backend") -> Generator:
    """The generator of `rollout_config.backend` (a `RolloutConfig` or `SamplingConfig`; `field`
    names its backend field in errors) holding `model`'s current weights, for batches of at most
    `max_batch` prompts of at most `max_total_len` tokens with their responses. `world` (a
    `stema.distributed.World`, None: one process) and `say` (default: a logging warning) as in the
    module docstring; `dtype` None: the backend's default."""
    builder = backend_builder(rollout_config.backend, field=field)
    return builder(model, rollout_config, world=world, max_batch=max_batch, max_total_len=max_total_len, dtype=dtype,
                   say=say or logging.getLogger(__name__).warning)


@register_backend("stema")
def _stema_engine(model, rollout_config, *, world, max_batch, max_total_len, dtype, say) -> Generator:
    from .engine import GenerationEngine

    try:
        return GenerationEngine.from_hf(model, dtype=dtype, max_batch=max_batch, max_total_len=max_total_len)
    except UnsupportedModelError as unsupported:
        generator = _hf_generate(model, rollout_config, world=world, max_batch=max_batch, max_total_len=max_total_len,
                                 dtype=dtype, say=say, why=f"the rollout engine does not serve it: {unsupported}")
        say(f"the rollout engine does not serve {generator.model_type!r} models; generating with transformers' "
            f"generate() instead (slower). Engine: {unsupported}")
        return generator


@register_backend("hf")
def _hf_generate(model, rollout_config, *, world, max_batch, max_total_len, dtype, say,
                 why: str = "the rollout backend is hf") -> Generator:
    from .hf import HFGenerator

    generator = HFGenerator(model, max_batch=max_batch)
    if world is not None and world.distributed:
        raise ConfigError(
            f"model.path: {generator.model_type!r} models are generated with transformers' generate() ({why}), which "
            f"cannot generate with a model sharded over {world.world_size} processes; run stema {world.role} in one process"
        )
    return generator


def policy_backend(backend: str, model_type: str | None) -> str:
    """The backend that `build_generator` ends up using for a policy of `model_type`: `stema`
    falls back to `hf` for a family the engine does not serve."""
    return "hf" if backend == "stema" and model_type not in SUPPORTED_MODEL_TYPES else backend


def check_ppo_generation(config: PPOConfig, model_path: Path) -> None:
    """Before any PPO role starts: with the `hf` backend (chosen, or the fallback for a family the
    engine does not serve) the actor generates with transformers' `generate` on its own policy,
    which needs the colocated placement, one actor worker, one engine and the policy's own dtype;
    ConfigError naming the first setting that rules it out. Also resolves a lazy backend (vLLM)."""
    backend_builder(config.rollout.backend)
    model_type = json.loads((Path(model_path) / "config.json").read_text()).get("model_type")
    if policy_backend(config.rollout.backend, model_type) != "hf":
        return
    if config.rollout.backend == "hf":
        why = "rollout.backend is hf"
    else:
        why = f"the rollout engine does not serve {model_type!r} models (it serves {', '.join(SUPPORTED_MODEL_TYPES)})"
    for field, value, needed in (("roles.placement", config.roles.placement, "colocated"),
                                 ("roles.actor_workers", config.roles.actor_workers, 1),
                                 ("rollout.num_engines", config.rollout.num_engines, 1),
                                 ("rollout.engine_dtype", config.rollout.engine_dtype, "auto")):
        if value != needed:
            raise ConfigError(f"{field}: {why}, so the actor would generate with transformers' generate() on the "
                              f"policy itself, which needs {field} {needed} (got {value})")


def sampling_params(sampling_cfg: SamplingConfig, *, greedy: bool = False) -> SamplingParams:
    """The `SamplingParams` of `sampling_cfg` (temperature 0 when `greedy`)."""
    return SamplingParams(
        temperature=0.0 if greedy else sampling_cfg.temperature,
        top_p=sampling_cfg.top_p,
        top_k=sampling_cfg.top_k,
        max_new_tokens=sampling_cfg.max_new_tokens,
        seed=sampling_cfg.seed,
    )


def generate_once(model: torch.nn.Module, tokenizer, prompt_token_lists: Sequence[Sequence[int]],
                  sampling_cfg: SamplingConfig, *, greedy: bool = False, say: Callable[[str], None] | None = None):
    """A `RolloutBatch` of one response per prompt (in prompt order) from a generator built on the
    model's current weights (`sampling_cfg.backend`), with room for the longest prompt plus
    `max_new_tokens`: for one-off generation in one process (`stema generate`, the demo)."""
    longest = max(len(prompt) for prompt in prompt_token_lists)
    generator = build_generator(
        model, sampling_cfg, max_batch=min(sampling_cfg.batch_size, len(prompt_token_lists)),
        max_total_len=longest + sampling_cfg.max_new_tokens, say=say, field="sampling.backend",
    )
    try:
        return generator.generate([list(prompt) for prompt in prompt_token_lists], sampling_params(sampling_cfg, greedy=greedy),
                                  tokenizer=tokenizer)
    finally:
        close_generator(generator)


def close_generator(generator) -> None:
    """Shut down a generator that holds resources beyond its tensors (a vLLM engine: one is alive
    per process, so the next generator of this process can only be built once it is closed)."""
    if hasattr(generator, "close"):
        generator.close()
