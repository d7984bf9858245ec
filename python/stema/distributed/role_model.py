"""A role's model on its world: placement, refit of a generation engine from the shards, and the
gathered state that a role's checkpoint holds. World size 1 is the same calls on a plain model.

    model = place_on_world(model, world, config.distributed)       # FSDP2 when the world has ranks
    refitter = BucketedRefitter(engine, model, bucket_bytes=256 << 20)
    refitter.refit()          # every rank: gathers bucket by bucket, copies into its engine in place
    state = gathered_state(model, optimizer)                        # rank 0: whole tensors on the CPU
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .world import World


def place_on_world(model: torch.nn.Module, world: World, distributed_cfg: Any) -> torch.nn.Module:
    """`model` on the world's device; with several ranks sharded by `parallelize` as
    `distributed_cfg` (a `DistributedConfig`) asks. LoRA models are refused when sharded."""
    if not world.distributed:
        return model.to(world.device)
    from stema.models.loading import is_lora_model

    from .parallelize import parallelize

    if is_lora_model(model):
        raise ValueError(f"{world.describe()}: LoRA is not supported with several workers per role yet; use one")
    return parallelize(
        model.to("cpu" if distributed_cfg.cpu_offload else world.device), mesh=world.mesh,
        mixed_precision=distributed_cfg.mixed_precision, cpu_offload=distributed_cfg.cpu_offload,
    )


def whole_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of a parameter: a DTensor's `full_tensor()` (a collective: every rank of its
    mesh must call it), a plain tensor itself."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor.detach()


def bucket_boundaries(sizes: list[int], bucket_bytes: int) -> list[tuple[int, int]]:
    """[(start, stop)] of consecutive runs of tensors (bytes `sizes`, in order) whose total is at
    most `bucket_bytes`; a tensor larger than that is a bucket of its own."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    boundaries, start, filled = [], 0, 0
    for index, size in enumerate(sizes):
        if index > start and filled + size > bucket_bytes:
            boundaries.append((start, index))
            start, filled = index, 0
        filled += size
    if sizes:
        boundaries.append((start, len(sizes)))
    return boundaries


@dataclass(frozen=True)
class _Target:
    hf_name: str
    module: torch.nn.Module
    attribute: str
    view: torch.Tensor  # the engine's buffer (or a view of a fused buffer) this weight fills


class BucketedRefitter:
    """Copies a (possibly FSDP2-sharded) trainer model's weights into a `GenerationEngine` in place,
    gathering whole tensors a bucket at a time: a rank holds at most one bucket of gathered
    weights beyond its shards and its engine (a tensor larger than the bucket is gathered alone).

    The engine must have been built for the same architecture (e.g. `GenerationEngine.from_hf` on
    the model before it was sharded); the weight-to-engine mapping is the plain `EngineRefitter`'s
    (`stema.rollout.refit`), and each bucket is copied (and cast) by the `refit_` kernel. LoRA
    models are not handled here (they are refused when sharded).

    Attributes:
        targets: every trainer weight and the engine view it fills, in refit order.
        buckets: [(start, stop)] ranges of `targets` gathered together.
        last_peak_bytes: the largest bucket's gathered bytes in the last `refit` (0 before one).
    """

    def __init__(self, engine, model: torch.nn.Module, *, bucket_bytes: int):
        from stema.rollout.architecture import decoder_spec_from_hf, unwrap_hf_model
        from stema.rollout.refit import check_same_architecture, weight_pairs

        check_same_architecture(engine.spec, decoder_spec_from_hf(model))
        self.engine = engine
        self.model = model
        self.targets = [_Target(hf_name, module, attribute, view)
                        for hf_name, module, attribute, _, view in weight_pairs(unwrap_hf_model(model), engine)]
        sizes = []
        for target in self.targets:
            parameter = getattr(target.module, target.attribute)
            if tuple(parameter.shape) != tuple(target.view.shape):  # a DTensor's shape is its whole shape
                raise ValueError(f"BucketedRefitter: {target.hf_name} has shape {tuple(parameter.shape)} but the engine "
                                 f"view has {tuple(target.view.shape)}")
            sizes.append(parameter.numel() * parameter.element_size())
        self.buckets = bucket_boundaries(sizes, bucket_bytes)
        self.last_peak_bytes = 0

    @torch.no_grad()
    def refit(self) -> None:
        """Write the model's current weights into the engine's buffers, bucket by bucket (every rank)."""
        from stema_kernels import refit_

        peak = 0
        for start, stop in self.buckets:
            bucket = self.targets[start:stop]
            # Looked up each time: FSDP2 swaps a module's registered parameters (sharded / unsharded).
            sources = [whole_tensor(getattr(target.module, target.attribute)) for target in bucket]
            peak = max(peak, sum(source.numel() * source.element_size() for source in sources))
            refit_([target.view for target in bucket], [source.to(target.view.device) for source, target in zip(sources, bucket)])
            del sources
        self.last_peak_bytes = peak


def gathered_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """{"model", "optimizer"}: the trainable weights and the optimizer state of a sharded model as
    whole CPU tensors keyed by parameter name, on rank 0 (empty on the others); a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
    return {"model": model_state, "optimizer": optimizer_state}


def load_gathered_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load what `gathered_state` returned (given to every rank) into this rank's shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(full_state_dict=True, ignore_frozen_params=True))
