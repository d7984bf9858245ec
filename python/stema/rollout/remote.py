"""Refit of generation engines in other processes (placement disaggregated): the trainer side.

    refitter = RemoteRefitter(model, layout, send=send_and_wait, bucket_bytes=256 << 20, world=world)
    refitter.refit()    # every rank of the trainer: gathers bucket by bucket; rank 0 sends each one

The trainer's (possibly FSDP2-sharded) weights are gathered whole a bucket at a time
(`stema.distributed.role_model.WeightBuckets`, in the engines' `layout` order); rank 0 hands each
bucket {Hugging Face weight name: whole tensor} to `send`, which returns once every receiving
engine has copied it in place, so at most one bucket is in flight. The transport is the caller's
(`stema.roles.rollout.send_bucket`: the Ray object store), so this module imports no Ray.

The receiving side is the engine's `bucket_receiver(model)`: `EngineSlots` for STEMA's engine
(each weight copied into its engine buffer, or packed weight, by `copy_into`), `VLLMBucketReceiver` for vLLM
(`stema.rollout.vllm`). Either has `layout` (what the trainer gathers, in order) and `load(bucket)`.
"""

from __future__ import annotations

from typing import Callable

import torch


class RemoteRefitter:
    """The trainer side of a refit into engines held by other processes (module docstring).

    Args:
        model: the trainer model, FSDP2-sharded or plain.
        layout: [(Hugging Face weight name, shape)] of the engines' weights, in refit order.
        send: called on rank 0 with each bucket; returns when the engines hold it.
        bucket_bytes: most bytes of gathered weights per bucket.
        world: the trainer's `stema.distributed.World`.

    Attributes:
        sent_buckets: buckets sent so far (rank 0).
    """

    def __init__(self, model: torch.nn.Module, layout: list[tuple[str, tuple[int, ...]]], *,
                 send: Callable[[dict[str, torch.Tensor]], None], bucket_bytes: int, world):
        from stema.distributed.role_model import WeightBuckets

        self.send = send
        self.world = world
        self.weights = WeightBuckets(model, layout, bucket_bytes=bucket_bytes)
        self.sent_buckets = 0

    def refit(self) -> None:
        for start, stop, tensors in self.weights.gathered():
            if self.world.rank != 0:
                continue
            self.send(dict(zip(self.weights.names[start:stop], tensors)))
            self.sent_buckets += 1


class EngineSlots:
    """The receiving side for a `GenerationEngine`: {Hugging Face weight name: the engine buffer
    (or view of a fused buffer) it fills}, built once from the model the engine was built from;
    `load` copies a bucket in place (cast to the engine's dtype by `refit_`), and once every weight
    has arrived since the last time, tells the engine (`weights_written`: where it repacks its
    prepacked copies, they are repacked once per refit, not per bucket).

    Attributes:
        slots: {Hugging Face weight name: engine `Destination` (buffer view, or packed rows)}.
    """

    def __init__(self, engine, model: torch.nn.Module):
        from .architecture import unwrap_hf_model
        from .refit import weight_pairs

        self.engine = engine
        self.slots = {hf_name: view for hf_name, _, _, _, view in weight_pairs(unwrap_hf_model(model), engine)}
        self.arrived: set[str] = set()

    @property
    def layout(self) -> list[tuple[str, tuple[int, ...]]]:
        """[(Hugging Face weight name, shape)] of the engine's weights, in refit order."""
        return named_shapes(self.slots)

    @torch.no_grad()
    def load(self, bucket: dict[str, torch.Tensor]) -> None:
        from .refit import copy_into

        check_bucket(bucket, self.slots)
        copy_into([self.slots[name] for name in bucket], [tensor.to(self.engine.device) for tensor in bucket.values()])
        self.arrived.update(bucket)
        if len(self.arrived) == len(self.slots):
            self.engine.weights_written()
            self.arrived.clear()


def named_shapes(tensors: dict) -> list[tuple[str, tuple[int, ...]]]:
    """[(name, shape)] of `tensors` (tensors or other destinations with a shape), in order: a
    receiver's layout."""
    return [(name, tuple(tensor.shape)) for name, tensor in tensors.items()]


def check_bucket(bucket: dict[str, torch.Tensor], held: dict[str, torch.Tensor]) -> None:
    """ValueError naming (up to 5) weights of `bucket` that the receiver (`held`: its weights by
    name) does not hold."""
    unknown = [name for name in bucket if name not in held]
    if unknown:
        raise ValueError(f"rollout worker: the bucket has weights the engine does not hold: {unknown[:5]}")
