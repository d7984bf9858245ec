"""A role's model on its world: placement, its weights gathered whole a bucket at a time (what the
refitters of `stema.rollout` copy into a generation engine), and the gathered state that a role's
checkpoint holds. World size 1 is the same calls on a plain model.

    model = place_on_world(model, world, config.distributed)       # FSDP2 when the world has ranks
    buckets = WeightBuckets(model, layout, bucket_bytes=256 << 20)   # layout: [(hf_name, shape)]
    for start, stop, tensors in buckets.gathered(): ...              # every rank: whole tensors
    state = gathered_state(model, optimizer)                        # rank 0: whole tensors on the CPU
"""

from __future__ import annotations

import math
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
    module: torch.nn.Module | None  # None: another pipeline stage holds it
    attribute: str
    shape: tuple[int, ...]
    owner: int  # the global rank in this rank's pipeline group that holds it (-1 without stages)


class WeightBuckets:
    """A (possibly FSDP2-sharded) trainer model's weights in an engine's refit order, gathered
    whole a bucket at a time: a rank holds at most one bucket of gathered weights beyond its
    shards (a tensor larger than the bucket is gathered alone).

        buckets = WeightBuckets(model, layout, bucket_bytes=256 << 20)
        for start, stop, tensors in buckets.gathered():   # every rank (each gather is a collective)
            ...                                           # tensors: the whole weights layout[start:stop]

    `layout` is [(hf_name, shape)], the engine's weights by Hugging Face name (in the order of
    `stema.rollout.refit.weight_pairs`); each name must be a parameter of `model` (the unwrapped
    causal LM) with that shape. On pipeline stages (`stema.distributed.pipeline.PipelineRankModel`)
    each weight is gathered whole on the stage that holds it and broadcast over the pipeline group,
    so every rank gets every weight.

    Attributes:
        names: the layout's names, in order.
        buckets: [(start, stop)] ranges of `names` gathered together.
        last_peak_bytes: the largest bucket's gathered bytes in the last `gathered` pass (0 before one).
    """

    def __init__(self, model: torch.nn.Module, layout: list[tuple[str, tuple[int, ...]]], *, bucket_bytes: int):
        from stema.models.loading import unwrap_lora

        from .pipeline import is_pipelined

        unwrapped = unwrap_lora(model)
        self._world = unwrapped.pipeline.world if is_pipelined(unwrapped) else None
        self._dtype = next(unwrapped.parameters()).dtype
        self.names = [name for name, _ in layout]
        self._sources = []
        sizes = []
        for hf_name, shape in layout:
            owner = -1 if self._world is None else self._world.pipeline_rank(unwrapped.stage_of(hf_name) % self._world.pp_size)
            held_here = self._world is None or owner == self._world.rank
            module = _weight_module(unwrapped, hf_name, shape) if held_here else None
            self._sources.append(_Source(hf_name, module, hf_name.rpartition(".")[2], tuple(shape), owner))
            sizes.append(math.prod(shape) * self._dtype.itemsize)
        self.buckets = bucket_boundaries(sizes, bucket_bytes)
        self.last_peak_bytes = 0

    @torch.no_grad()
    def gathered(self) -> Iterator[tuple[int, int, list[torch.Tensor]]]:
        """(start, stop, whole tensors of names[start:stop]) bucket by bucket; every rank must
        consume it to the end (each bucket's gather is a collective)."""
        peak = 0
        for start, stop in self.buckets:
            tensors = [self._whole(source) for source in self._sources[start:stop]]
            peak = max(peak, sum(tensor.numel() * tensor.element_size() for tensor in tensors))
            yield start, stop, tensors
            del tensors
        self.last_peak_bytes = peak

    def _whole(self, source: _Source) -> torch.Tensor:
        """The whole weight of `source` on this rank: gathered from its shards, and on pipeline
        stages broadcast from the stage that holds it (collectives in the layout's order)."""
        if source.module is not None:
            # Looked up each time: FSDP2 swaps a module's registered parameters (sharded / unsharded).
            tensor = whole_tensor(getattr(source.module, source.attribute))
        else:
            tensor = torch.empty(source.shape, dtype=self._dtype, device=self._world.device)
        if self._world is not None:
            import torch.distributed as dist

            tensor = tensor.contiguous()
            dist.broadcast(tensor, src=source.owner, group=self._world.mesh["pp"].get_group())
        return tensor


def _weight_module(model: torch.nn.Module, hf_name: str, shape: tuple[int, ...]) -> torch.nn.Module:
    """The module of `model` whose attribute is the weight `hf_name`, checked to have `shape`."""
    module_path, _, attribute = hf_name.rpartition(".")
    try:
        module = model.get_submodule(module_path)
    except AttributeError:
        raise ValueError(f"WeightBuckets: the engine's weight {hf_name} is not in the trainer model") from None
    parameter = getattr(module, attribute, None)
    if not isinstance(parameter, torch.Tensor):
        raise ValueError(f"WeightBuckets: the engine's weight {hf_name} is not in the trainer model")
    if tuple(parameter.shape) != tuple(shape):  # a DTensor's shape is its whole shape
        raise ValueError(f"WeightBuckets: {hf_name} has shape {tuple(parameter.shape)} but the engine's has {tuple(shape)}")
    return module


def _state_options(**kwargs):
    """Whole tensors, trainable weights only; the optimizer state keyed by parameter name."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, ignore_frozen_params=True, **kwargs)


def gathered_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """{"model", "optimizer"}: the trainable weights and the optimizer state of a sharded model as
    whole CPU tensors keyed by parameter name, on rank 0 (empty on the others); a collective. On
    pipeline stages each stage's part is gathered within the stage, then the parts on rank 0 and
    merged into the layout one process has (`_merged_stage_states`)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from .pipeline import is_pipelined

    if not is_pipelined(model):
        model_state, optimizer_state = get_state_dict(model, optimizer, options=_state_options(cpu_offload=True))
        return {"model": model_state, "optimizer": optimizer_state}
    import torch.distributed as dist

    world = model.pipeline.world
    # cpu_offload would keep only global rank 0's part, which holds the first stage alone
    model_state, optimizer_state = get_state_dict(model, optimizer, options=_state_options())
    per_parameter = {name: _on_cpu(values) for name, values in optimizer_state["state"].items()}
    part = {"model": _on_cpu(model_state), "optimizer": {"state": per_parameter, "param_groups": optimizer_state["param_groups"]}}
    holds_stage = world.rank % (world.dp_size * world.tp_size) == 0  # dp and tp coordinate 0
    parts = [None] * world.world_size if world.rank == 0 else None
    dist.gather_object(part if holds_stage else None, parts, dst=0)
    if parts is None:
        return {"model": {}, "optimizer": {}}
    return _merged_stage_states([stage_part for stage_part in parts if stage_part])


def _on_cpu(state: dict) -> dict:
    return {key: value.cpu() if isinstance(value, torch.Tensor) else value for key, value in state.items()}


def _merged_stage_states(parts: list[dict]) -> dict:
    """The stages' {"model", "optimizer"} parts (in stage order) as one state: the weights and the
    per-parameter optimizer state joined, each parameter group's `params` names concatenated (the
    stages share the groups' settings)."""
    groups = [dict(group, params=[name for part in parts for name in part["optimizer"]["param_groups"][index]["params"]])
              for index, group in enumerate(parts[0]["optimizer"]["param_groups"])]
    return {"model": {name: value for part in parts for name, value in part["model"].items()},
            "optimizer": {"state": {name: value for part in parts for name, value in part["optimizer"]["state"].items()},
                          "param_groups": groups}}


def rank_part(model: torch.nn.Module, state: dict) -> dict:
    """The entries of a gathered `state` that this rank's model holds: all of them, or on pipeline
    stages those of its own stages' parameters."""
    from .pipeline import is_pipelined

    if not is_pipelined(model):
        return state
    names = set(model.state_dict())
    optimizer = state["optimizer"]
    return {**state, "model": {name: value for name, value in state["model"].items() if name in names},
            "optimizer": {"state": {name: value for name, value in optimizer["state"].items() if name in names},
                          "param_groups": [dict(group, params=[name for name in group["params"] if name in names])
                                           for group in optimizer["param_groups"]]}}


def load_gathered_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load what `gathered_state` returned (given to every rank) into this rank's shards."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = rank_part(model, state)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=_state_options())
