"""Rollout: STEMA's own generation engine for PPO, refitted in place, and a worker pool.

- `engine`: `GenerationEngine` (inference-only Llama-family decoder with fused weights and a
  static KV cache), `SamplingParams`, `RolloutBatch` / `Rollout` / `PaddedRollout`.
- `refit`: `EngineRefitter`, which copies the trainer's weights (LoRA merged) into the engine
  in place through one `stema_kernels.RefitPlan` built once.
- `hf`: `HFGenerator`, the same interface over transformers' own `generate`, for model families
  the engine does not implement (GPT-2, Gemma, Phi-3, ...).
- `workers`: `RolloutPool`, several engines in threads pulling prompt batches from
  `stema_kernels.Scheduler`.
- `metrics`: `response_token_logprobs` (the trainer's recompute) and `logprob_mismatch`.

Importing this package does not import transformers or peft.
"""

from .architecture import UnsupportedModelError
from .engine import GenerationEngine, PaddedRollout, Rollout, RolloutBatch
from .hf import HFGenerator
from .metrics import logprob_mismatch, response_token_logprobs
from .refit import EngineRefitter
from .sampling import SamplingParams
from .workers import RolloutPool

__all__ = [
    "EngineRefitter",
    "GenerationEngine",
    "HFGenerator",
    "PaddedRollout",
    "Rollout",
    "RolloutBatch",
    "RolloutPool",
    "SamplingParams",
    "UnsupportedModelError",
    "logprob_mismatch",
    "response_token_logprobs",
]
