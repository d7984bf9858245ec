"""Generation for the trainers that sample from their policy (rejection sampling, SPIN) and for
`stema generate`: the rollout engine sized for a set of prompts, and atomic JSONL output.

    batch = generate(model, tokenizer, prompt_token_lists, sampling_cfg)   # a RolloutBatch
    write_jsonl_atomic(path, rows)

The engine (`stema.rollout.GenerationEngine`) serves the Llama, Qwen2 and Mistral families; other
models raise its `UnsupportedModelError`, which names the model type.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

from stema.config import SamplingConfig


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


def generate(model, tokenizer, prompt_token_lists: Sequence[Sequence[int]], sampling_cfg: SamplingConfig, *, greedy: bool = False):
    """A `RolloutBatch` of one response per prompt (in prompt order) from an engine holding the
    model's current weights, with room for the longest prompt plus `max_new_tokens`."""
    from stema.rollout import GenerationEngine

    longest = max(len(prompt) for prompt in prompt_token_lists)
    engine = GenerationEngine.from_hf(
        model, max_batch=min(sampling_cfg.batch_size, len(prompt_token_lists)), max_total_len=longest + sampling_cfg.max_new_tokens
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
