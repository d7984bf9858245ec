"""Sharded checkpoints with `torch.distributed.checkpoint` (DCP) and the Hugging Face export of a
sharded model.

    save_model_optimizer(folder, model, optimizer)   # every rank writes its shards (collective)
    load_model_optimizer(folder, model, optimizer)   # any world size: DCP reshards on load
    plain = unsharded_copy(model)                    # rank 0: a plain HF model, else None

The same calls serve a single unsharded process (world size 1), so a checkpoint taken at N
processes resumes at M, 1 included. Only the trainable weights are saved (the adapters with LoRA).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch

from stema.models.loading import unwrap_lora

from .parallelize import is_sharded, restore_non_persistent_buffers


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """Silence DCP's warning that one process without a process group saves or loads alone
    (world size 1 is an intended case, not a mistake)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _options(**kwargs):
    """Trainable weights only; the optimizer state flattened to one entry per parameter name
    (`state.<name>.exp_avg`, `param_groups.<name>.lr`), so that pipeline ranks holding different
    parameters write disjoint keys and a checkpoint loads at any (dp, tp, pp) layout."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, flatten_optimizer_state_dict=True, **kwargs)


def save_model_optimizer(folder: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Write the trainable weights and the optimizer state under `folder` (called on every rank)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer, options=_options())
    with _single_process_quiet():
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder), no_dist=not _initialized())


def load_model_optimizer(folder: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Read what `save_model_optimizer` wrote, at this run's world size and sharding (every rank)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer, options=_options())
    state = {"model": model_state, "optimizer": optimizer_state}
    try:
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=str(folder), no_dist=not _initialized())
    except Exception as error:
        raise ValueError(
            f"{folder}: the checkpoint does not match the model's trainable parameters or optimizer "
            f"({str(error).splitlines()[0][:300]}): resume needs the same model and LoRA settings"
        ) from error
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"], options=_options(strict=False)
    )


def _unsharded_class(model: torch.nn.Module) -> type:
    """The model's own class: FSDP2 makes `FSDP<Class>` with the FSDPModule mixin first."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(model)
    if issubclass(cls, FSDPModule):
        return next(base for base in cls.__bases__ if base is not FSDPModule)
    return cls


def _empty_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A new model of `model`'s architecture on the meta device: its own class built from its
    config; a peft model's base rebuilt so and wrapped again with the same adapters (a reward
    model's trained head too, peft's `modules_to_save`)."""
    from stema.models.loading import is_lora_model

    base = unwrap_lora(model)
    with torch.device("meta"):
        replica = _unsharded_class(base)(base.config)
        if is_lora_model(model):
            import peft

            replica = peft.get_peft_model(replica, copy.deepcopy(model.peft_config[model.active_adapter]))
    return replica


def unsharded_copy(model: torch.nn.Module) -> torch.nn.Module | None:
    """A plain copy of a sharded Hugging Face model (or peft LoRA model) on rank 0's CPU (None on
    the other ranks), from its full state dict gathered tensor by tensor; a collective, call it
    on every rank."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from .pipeline import is_pipelined

    if is_pipelined(model):
        full = model.pipeline.gathered_state_dict()
        if full is None:
            return None
        with torch.device("meta"):
            replica = model.causal_lm_class(model.config)
        return _filled(replica, full, generation_config=model.generation_config)
    if not is_sharded(model):
        raise ValueError("unsharded_copy expects a model sharded by parallelize")
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    return _filled(_empty_copy(model), full, generation_config=getattr(model, "generation_config", None))


def _filled(replica: torch.nn.Module, full: dict[str, torch.Tensor], *, generation_config: Any) -> torch.nn.Module:
    """`replica` (built on the meta device) holding the gathered `full` state dict on the CPU, its
    non-persistent buffers rebuilt; a causal LM keeps `generation_config` (a classifier has none)."""
    result = replica.load_state_dict(full, strict=False, assign=True)
    replica.tie_weights()
    missing = [name for name in result.missing_keys if any(t.is_meta for n, t in replica.named_parameters() if n == name)]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"the gathered state does not fit {type(replica).__name__}: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}")
    restore_non_persistent_buffers(replica, torch.device("cpu"))
    if generation_config is not None:
        unwrap_lora(replica).generation_config = generation_config
    return replica.eval()
