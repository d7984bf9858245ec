"""Refit of generation engines in other processes (placement disaggregated): the trainer side.

    refitter = RemoteRefitter(model, layout, send=send_and_wait, bucket_bytes=256 << 20, world=world)
    refitter.refit()    # every rank of the trainer: gathers bucket by bucket; rank 0 sends each one

The trainer's (possibly FSDP2-sharded) weights are gathered whole a bucket at a time
(`stema.distributed.role_model.WeightBuckets`, in the engines' `layout` order); rank 0 hands each
bucket {Hugging Face weight name: whole tensor} to `send`, which returns once every receiving
engine has copied it in place, so at most one bucket is in flight. The transport is the caller's
(`stema.roles.rollout.send_bucket`: the Ray object store), so this module imports no Ray.
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
