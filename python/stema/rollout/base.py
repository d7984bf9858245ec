"""The two interfaces every rollout backend implements: `Generator` and `Refitter`.

    generator = build_generator(model, config.rollout, world=world, max_batch=8, max_total_len=256)
    refitter = generator.refitter(model, world=world, bucket_bytes=256 << 20)     # once
    batch = generator.generate(prompts, SamplingParams(...), tokenizer=tok)       # a RolloutBatch
    ... optimizer step on `model` ...
    refitter.refit()                                                             # sampler <- model

A `Generator` turns prompts (lists of token ids) into a `RolloutBatch` (responses in prompt order,
each with the sampling log-prob of every token, see `stema.rollout.sampling`). A `Refitter` brings
the generator's weights back in line with the trained model after an update. Which generator a run
gets is decided in one place, `stema.rollout.factory.build_generator` (`rollout.backend`).

Implementations: `GenerationEngine` (STEMA's engine; refitters `EngineRefitter` in one process,
`BucketedRefitter` from FSDP2 shards), `HFGenerator` (transformers' generate; its refitter copies
nothing), `VLLMGenerator` (`stema.rollout.vllm`, an in-process vLLM engine; `VLLMRefitter`), and
`RemoteRefitter` for engines in other processes (placement disaggregated).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from .engine import RolloutBatch
    from .sampling import SamplingParams


@runtime_checkable
class Refitter(Protocol):
    """Brings a generator's weights up to date with the trainer's model."""

    def refit(self) -> None:
        """Make the generator sample from the model's current weights (every rank of a sharded
        model calls it: a refit from shards is a collective)."""


@runtime_checkable
class Generator(Protocol):
    """Generates responses to prompts; `max_batch` is the most prompts it decodes at once."""

    max_batch: int

    def generate(self, prompt_token_lists: list[list[int]], params: SamplingParams, *, tokenizer=None) -> RolloutBatch:
        """One response per prompt, in prompt order. `tokenizer` is needed for
        `params.stop_strings` and fills `Rollout.text`."""

    def refitter(self, model: torch.nn.Module, *, world, bucket_bytes: int) -> Refitter:
        """The `Refitter` that keeps this generator up to date with `model` (the trained, possibly
        sharded model this generator was built from), on `world` (a `stema.distributed.World`)."""
