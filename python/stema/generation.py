"""Generation for the trainers that sample from their policy (rejection sampling, SPIN) and for
`stema generate`: the rollout engine (or its fallback) sized for a set of prompts, and atomic JSONL
output.

    engine = build_generator(model, max_batch=64, max_total_len=256, world=world, say=run.say)
    batch = generate(model, tokenizer, prompt_token_lists, sampling_cfg)   # a RolloutBatch
    write_jsonl_atomic(path, rows)

The engine (`stema.rollout.GenerationEngine`) serves the Llama, Qwen2 and Mistral families. For a
model it does not serve (GPT-2, Gemma, Phi-3, ...; it raises `UnsupportedModelError`),
`build_generator` falls back to `stema.rollout.HFGenerator`, transformers' own `generate` behind
the same interface (slower; said once through `say`). The fallback generates with the live model,
so it runs in one process only: with a model sharded over several processes it is refused.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from stema.config import ConfigError, SamplingConfig


def sampling_params(sampling_cfg: SamplingConfig, *, greedy: bool = False):
    """The engine's `SamplingParams` for `sampling_cfg` (temperature 0 when `greedy`)."""
    from stema.rollout import SamplingParams

    return SamplingParams(
        temperature=0.0 if greedy else sampling_cfg.temperature,
        top_p=sampling_cfg.top_p,
        top_k=sampling_cfg.top_k,
        max_new_tokens=sampling_cfg.max_new_tokens,
        seed=sampling_cfg.seed,
    )


def build_generator(model, *, max_batch: int, max_total_len: int, world=None, say: Callable[[str], None] | None = None):
    """`GenerationEngine.from_hf(model, ...)` when the engine serves the model, else an
    `HFGenerator` over the model itself (one line through `say`, default a logging warning, names
    the model type). Both have `generate(prompts, params, *, tokenizer=None)` -> RolloutBatch, and
    `stema.distributed.role_model.engine_refitter` refits either.

    Raises ConfigError for the fallback when `world` (a `stema.distributed.World`) has several
    processes: the ranks generate different numbers of blocks, which a sharded model (each forward
    a collective) cannot do.
    """
    from stema.rollout import GenerationEngine, HFGenerator, UnsupportedModelError

    try:
        return GenerationEngine.from_hf(model, max_batch=max_batch, max_total_len=max_total_len)
    except UnsupportedModelError as unsupported:
        generator = HFGenerator(model, max_batch=max_batch)
        if world is not None and world.distributed:
            raise ConfigError(
                f"model.path: {generator.model_type!r} models are generated with transformers' generate() (the rollout "
                f"engine does not serve them: {unsupported}), which cannot generate with a model sharded over "
                f"{world.world_size} processes; run stema {world.role} in one process"
            ) from None
        (say or logging.getLogger(__name__).warning)(
            f"the rollout engine does not serve {generator.model_type!r} models; generating with transformers' "
            f"generate() instead (slower). Engine: {unsupported}"
        )
        return generator


def generate(model, tokenizer, prompt_token_lists: Sequence[Sequence[int]], sampling_cfg: SamplingConfig, *, greedy: bool = False,
             say: Callable[[str], None] | None = None):
    """A `RolloutBatch` of one response per prompt (in prompt order) from `build_generator` on the
    model's current weights, with room for the longest prompt plus `max_new_tokens`."""
    longest = max(len(prompt) for prompt in prompt_token_lists)
    engine = build_generator(
        model, max_batch=min(sampling_cfg.batch_size, len(prompt_token_lists)), max_total_len=longest + sampling_cfg.max_new_tokens,
        say=say,
    )
    return engine.generate([list(prompt) for prompt in prompt_token_lists], sampling_params(sampling_cfg, greedy=greedy), tokenizer=tokenizer)


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Write `rows` as JSON Lines to `path` through a temporary file renamed into place, so a
    crash never leaves a half-written file where a finished one is expected."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            for row in rows:
                file.write(json.dumps(row) + "\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
