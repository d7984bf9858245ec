"""A role's model on its world: placement, its weights gathered whole a bucket at a time (what the
refitters of `stema.rollout` copy into a generation engine), and the gathered state that a role's
checkpoint holds. World size 1 is the same calls on a plain model.

    model = place_on_world(model, world, config.distributed)       # FSDP2 when the world has ranks
    buckets = WeightBuckets(model, layout, bucket_bytes=256 << 20)   # layout: [(hf_name, shape)]
    for start, stop, tensors in buckets.gathered(): ...              # every rank: whole tensors
    state = gathered_state(model, optimizer)                        # rank 0: whole tensors on the CPU
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch

from .world import World


def place_on_world(model: torch.nn.Module, world: World, distributed_cfg: Any) -> torch.nn.Module:
    """`model` on the world's device; with several ranks sharded by `parallelize` as
    `distributed_cfg` (a `DistributedConfig`) asks. A LoRA (peft) model is sharded like a plain
    one (its frozen base weights and its adapters share the decoder layers' FSDP2 groups; only the
    adapters train); with tensor parallel it is refused with a ConfigError naming `model.lora` (the
    plan shards plain linear layers, not peft's wrappers)."""
    if not world.distributed:
        return model.to(world.device)
    from stema.config import ConfigError
    from stema.models.loading import is_lora_model

    from .parallelize import parallelize

    if is_lora_model(model) and world.tp_size > 1:
        raise ConfigError(f"model.lora: LoRA is not supported with tensor parallel (distributed.tp_size {world.tp_size}); "
                          "use tp_size 1")
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
class _Source:
    hf_name: str
    module: torch.nn.Module
    attribute: str


class WeightBuckets:
    """A (possibly FSDP2-sharded) trainer model's weights in an engine's refit order, gathered
    whole a bucket at a time: a rank holds at most one bucket of gathered weights beyond its
    shards (a tensor larger than the bucket is gathered alone).

        buckets = WeightBuckets(model, layout, bucket_bytes=256 << 20)
        for start, stop, tensors in buckets.gathered():   # every rank (each gather is a collective)
            ...                                           # tensors: the whole weights layout[start:stop]

    `layout` is [(hf_name, shape)], the engine's weights by Hugging Face name (in the order of
    `stema.rollout.refit.weight_pairs`); each name must be a parameter of `model` (the unwrapped
    causal LM) with that shape.

    Attributes:
        names: the layout's names, in order.
        buckets: [(start, stop)] ranges of `names` gathered together.
        last_peak_bytes: the largest bucket's gathered bytes in the last `gathered` pass (0 before one).
    """

    def __init__(self, model: torch.nn.Module, layout: list[tuple[str, tuple[int, ...]]], *, bucket_bytes: int):
        from stema.models.loading import unwrap_lora

        unwrapped = unwrap_lora(model)
        self.names = [name for name, _ in layout]
        self._sources = []
        sizes = []
        for hf_name, shape in layout:
            module_path, _, attribute = hf_name.rpartition(".")
            try:
                module = unwrapped.get_submodule(module_path)
            except AttributeError:
                raise ValueError(f"WeightBuckets: the engine's weight {hf_name} is not in the trainer model") from None
            parameter = getattr(module, attribute, None)
            if not isinstance(parameter, torch.Tensor):
                raise ValueError(f"WeightBuckets: the engine's weight {hf_name} is not in the trainer model")
            if tuple(parameter.shape) != tuple(shape):  # a DTensor's shape is its whole shape
                raise ValueError(f"WeightBuckets: {hf_name} has shape {tuple(parameter.shape)} but the engine's "
                                 f"has {tuple(shape)}")
            self._sources.append(_Source(hf_name, module, attribute))
            sizes.append(parameter.numel() * parameter.element_size())
        self.buckets = bucket_boundaries(sizes, bucket_bytes)
        self.last_peak_bytes = 0

    @torch.no_grad()
    def gathered(self) -> Iterator[tuple[int, int, list[torch.Tensor]]]:
        """(start, stop, whole tensors of names[start:stop]) bucket by bucket; every rank must
        consume it to the end (each bucket's gather is a collective)."""
        peak = 0
        for start, stop in self.buckets:
            # Looked up each time: FSDP2 swaps a module's registered parameters (sharded / unsharded).
            tensors = [whole_tensor(getattr(source.module, source.attribute)) for source in self._sources[start:stop]]
            peak = max(peak, sum(tensor.numel() * tensor.element_size() for tensor in tensors))
            yield start, stop, tensors
            del tensors
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
