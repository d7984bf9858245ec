"""Rollout: the only owner of generation and refit (see docs/architecture.md).

- `base`: the `Generator` and `Refitter` interfaces every backend implements.
- `factory`: `build_generator`, the one place that chooses the backend (`rollout.backend` /
  `sampling.backend`: `stema`, `hf`, `vllm`), registered by name.
- `engine`: `GenerationEngine` (inference-only Llama-family decoder with fused weights and a
  static KV cache), `SamplingParams`, `RolloutBatch` / `Rollout` / `PaddedRollout`.
- `refit`: `EngineRefitter`, which copies the trainer's weights (LoRA merged) into the engine
  in place through one `stema_kernels.RefitPlan` built once.
- `bucketed`: `BucketedRefitter`, the same from an FSDP2-sharded model, a bucket of gathered
  weights at a time; `remote`: `RemoteRefitter`, buckets sent to engines in other processes.
- `hf`: `HFGenerator`, the same interface over transformers' own `generate`, for model families
  the engine does not implement (GPT-2, Gemma, Phi-3, ...).
- `vllm` (not imported here: it imports vLLM): `VLLMGenerator` / `VLLMRefitter`, the `vllm`
  backend, registered when the factory first asks for it.
- `workers`: `RolloutPool`, several engines in threads pulling prompt batches from
  `stema_kernels.Scheduler`.
- `metrics`: `response_token_logprobs` (the trainer's recompute) and `logprob_mismatch`.

Importing this package does not import transformers or peft.
"""

from .architecture import UnsupportedModelError
from .base import Generator, Refitter
from .bucketed import BucketedRefitter
from .engine import GenerationEngine, PaddedRollout, Rollout, RolloutBatch
from .factory import build_generator, register_backend
from .hf import HFGenerator
from .metrics import logprob_mismatch, response_token_logprobs
from .refit import EngineRefitter
from .remote import RemoteRefitter
from .sampling import SamplingParams
from .workers import RolloutPool

__all__ = [
    "BucketedRefitter",
    "EngineRefitter",
    "GenerationEngine",
    "Generator",
    "HFGenerator",
    "PaddedRollout",
    "Refitter",
    "RemoteRefitter",
    "Rollout",
    "RolloutBatch",
    "RolloutPool",
    "SamplingParams",
    "UnsupportedModelError",
    "build_generator",
    "logprob_mismatch",
    "register_backend",
    "response_token_logprobs",
]
