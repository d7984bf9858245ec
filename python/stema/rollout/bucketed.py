"""Refit of a `GenerationEngine` from an FSDP2-sharded trainer model, and the choice of an engine's
refitter.

    refitter = engine.refitter(model, world=world, bucket_bytes=256 << 20)   # engine_refitter below
    refitter.refit()          # every rank: gathers bucket by bucket, copies into its engine in place

`BucketedRefitter` gathers the model's weights whole a bucket at a time
(`stema.distributed.role_model.WeightBuckets`) and copies each bucket into the engine's buffers with
the `refit_` kernel; `engine_refitter` picks it when the world has several ranks, else the plain
`EngineRefitter` (`stema.rollout.refit`, which also merges LoRA).
"""

from __future__ import annotations

import torch

from .architecture import decoder_spec_from_hf, unwrap_hf_model
from .refit import EngineRefitter, check_same_architecture, copy_into, weight_pairs


class BucketedRefitter:
    """Copies a (possibly FSDP2-sharded) trainer model's weights into a `GenerationEngine` in the
    same process, in place, a `WeightBuckets` bucket at a time: a rank holds at most one bucket of
    gathered weights beyond its shards and its engine.

    The engine must have been built for the same architecture (e.g. `GenerationEngine.from_hf` on
    the model before it was sharded); the weight-to-engine mapping is the plain `EngineRefitter`'s
    (`weight_pairs`), and each bucket is copied (and cast, or packed) by `copy_into`. LoRA models are refused: the buckets carry the base weights, not merged adapters.
    `pairs` (default: `refit_pairs(engine, model)`) must be given for a model on pipeline stages,
    taken from the model before it was split.

    Attributes:
        views: the engine view each weight of `weights.names` fills.
        weights: the `WeightBuckets` (its `buckets` and `last_peak_bytes`).
    """

    def __init__(self, engine, model: torch.nn.Module, *, bucket_bytes: int, pairs: list | None = None):
        from stema.distributed.role_model import WeightBuckets
        from stema.models.loading import is_lora_model

        if is_lora_model(model):
            raise ValueError("BucketedRefitter refits whole weights, not merged LoRA adapters; the engine would "
                             "generate with the base weights")
        self.engine = engine
        pairs = pairs if pairs is not None else refit_pairs(engine, model)
        self.views = [view for _, view in pairs]
        self.weights = WeightBuckets(model, [(hf_name, tuple(view.shape)) for hf_name, view in pairs],
                                     bucket_bytes=bucket_bytes)

    @torch.no_grad()
    def refit(self) -> None:
        """Write the model's current weights into the engine's buffers, bucket by bucket (every rank)."""
        for start, stop, tensors in self.weights.gathered():
            copy_into(self.views[start:stop], [tensor.to(self.engine.device) for tensor in tensors])
        self.engine.weights_written()


def refit_pairs(engine, model: torch.nn.Module) -> list:
    """(Hugging Face name, engine `Destination`) of every weight `engine` holds, in refit order, read from
    `model` (whole or FSDP2-sharded; its architecture checked against the engine's). A model split
    into pipeline stages holds only its stages' layers: take the pairs from it before it is split
    and give them to `BucketedRefitter`."""
    check_same_architecture(engine.spec, decoder_spec_from_hf(model))
    return [(hf_name, view) for hf_name, _, _, _, view in weight_pairs(unwrap_hf_model(model), engine)]


def engine_refitter(engine, model: torch.nn.Module, *, world=None, bucket_bytes: int = 256 << 20):
    """The refitter that keeps `engine` (built by `stema.rollout.build_generator` on `model` before
    `place_on_world`) up to date with `model`: a `BucketedRefitter` gathering the FSDP2 shards when
    `world` (a `stema.distributed.World`; None: one process) has several ranks (every rank calls
    `refit()`), else the plain `EngineRefitter` (which also merges LoRA). A LoRA model with several
    ranks raises ConfigError naming `model.lora` (the buckets do not merge adapters)."""
    from stema.config import ConfigError
    from stema.models.loading import is_lora_model

    distributed = world is not None and world.distributed
    if distributed and is_lora_model(model):
        raise ConfigError(f"model.lora: stema {world.role} with LoRA runs in one process only (its generation engine is "
                          "refit from the shards without the adapters); run it in one process")
    if distributed:
        return BucketedRefitter(engine, model, bucket_bytes=bucket_bytes)
    return EngineRefitter(engine, model)
