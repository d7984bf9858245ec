"""A role as a group of N Ray actors that form one torch.distributed world (FSDP2 inside).

    actor = start_role("actor", ActorWorker, backend="ray", workers=2, timeout_s=600, config=cfg, ...)
    logprobs = actor.submit(ActorWorker.logprobs, batch).result()   # rows split, gathered in order
    actor.submit(ActorWorker.refit).result()                        # every rank, rank 0's result

Start-up: one Ray placement group with a bundle per rank (a GPU each on GPU machines; on the CPU
a token share of a core, so a 2-core test fits); one member actor per bundle; rank 0 names its
node address and a free port; every member then sets MASTER_ADDR / MASTER_PORT / RANK /
WORLD_SIZE / LOCAL_RANK and builds its worker, whose `init_world` joins the process group (gloo on
CPU, NCCL on GPU) and shards its model with FSDP2.

Calls. A worker method marked with `split_rows` is a data call: the handle gives data-parallel
replica d the d-th contiguous block of the rows of every row-indexed argument (a tensor, a dict of
tensors or a list whose length is the batch's row count) and merges the replicas' results with the
method's `merge` (rows concatenated in replica order, so in the caller's row order). A replica is
the ranks that hold one copy of the model between them (tensor-parallel shards and pipeline
stages, `model_parallel`); they all get the same block, and the result of the replica's first rank
is taken. A method marked `per_rank` (generation from each rank's own whole-weight engine) splits
the rows over all ranks instead. Any other method runs on every
rank with the same arguments (refit, state_dict, export: collectives every rank must join) and
rank 0's result is returned. A rank that fails ends the call at once with a `RoleError` naming
the role and the rank; a call that outlives `timeout_s` names the ranks still running.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from stema.distributed.blocks import RowBlock, row_blocks

from .handles import RoleError, _method_name, ensure_ray

_SPLIT_ROWS = "__stema_split_rows__"


@dataclass(frozen=True)
class _SplitRule:
    merge: Callable[[list], Any]
    pass_block: bool
    per_rank: bool


def split_rows(*, merge: Callable[[list], Any], pass_block: bool = False, per_rank: bool = False) -> Callable[[Callable], Callable]:
    """Mark a worker method as a data call of a role group (module docstring). `merge` turns the
    replicas' results (in row order) into the caller's result; with `pass_block` the method also
    receives its `row_block=RowBlock(...)` (a local or single-process call gets none and works on
    the whole batch); with `per_rank` every rank takes a block of its own. Returns the method
    itself, so typed calls (`Worker.method`) still name it."""

    def mark(method: Callable) -> Callable:
        setattr(method, _SPLIT_ROWS, _SplitRule(merge, pass_block, per_rank))
        return method

    return mark


def concat_rows(results: list) -> Any:
    """Tensors `[rows_r, ...]` concatenated along the rows, in rank order."""
    return torch.cat(results)


def rank_zero(results: list) -> Any:
    """Rank 0's result (the worker already combined what the ranks computed)."""
    return results[0]


def _row_count(args: Sequence[Any], kwargs: dict[str, Any]) -> int:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return len(value)
        if isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
            return len(next(iter(value.values())))
        if isinstance(value, (list, tuple)):
            return len(value)
    raise TypeError("a split_rows call needs a row-indexed argument (a tensor, a dict of tensors or a list)")


def _take_rows(value: Any, block: RowBlock) -> Any:
    """`value`'s rows in `block` when it is row-indexed (its length is the batch's), else itself."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and len(value) == block.total:
        return value[block.start : block.stop]
    if isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) and v.dim() > 0 and len(v) == block.total
                                                   for v in value.values()):
        return {key: v[block.start : block.stop] for key, v in value.items()}
    if isinstance(value, (list, tuple)) and len(value) == block.total:
        return value[block.start : block.stop]
    return value


class RankMember:
    """One rank of a role group, inside its Ray actor: joins the world, holds the worker."""

    def __init__(self, *, rank: int):
        self.rank = rank
        self.worker = None

    def address_and_free_port(self) -> tuple[str, int]:
        """This node's address and a port free on it now (rank 0's, for the rendezvous)."""
        import ray

        with socket.socket() as probe:
            probe.bind(("", 0))
            port = probe.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def start(self, worker_class: type, kwargs: dict[str, Any], *, world_size: int, master_addr: str, master_port: int) -> bool:
        """Set torchrun's environment for this rank, then build the worker (which joins the world)."""
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK="0")  # Ray shows each rank only its own GPU
        self.worker = worker_class(**kwargs)
        return True

    def call(self, method: Callable, args: tuple, kwargs: dict[str, Any]) -> Any:
        return method(self.worker, *args, **kwargs)


class GroupFuture:
    """The pending result of one call on every rank of a group."""

    def __init__(self, role: str, method: str, references: list, merge: Callable[[list], Any], *, timeout_s: float,
                 merged_ranks: list[int] | None = None):
        self.role, self.method = role, method
        self._references = references
        self._merge = merge
        self._timeout_s = timeout_s
        self._merged_ranks = merged_ranks if merged_ranks is not None else list(range(len(references)))

    def result(self) -> Any:
        """The merged result; RoleError naming the role and rank as soon as one rank fails, or
        naming the ranks still running after the timeout."""
        import ray

        rank_of = {reference: rank for rank, reference in enumerate(self._references)}
        pending = list(self._references)
        deadline = time.monotonic() + self._timeout_s
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                running = ", ".join(str(rank_of[reference]) for reference in pending)
                raise RoleError(f"role {self.role}: {self.method} did not return within {self._timeout_s:g} s "
                                f"(roles.call_timeout_s); ranks still running: {running}")
            try:
                ray.get(done[0])
            except Exception as error:
                cause = getattr(error, "cause", None) or error
                first_line = (str(cause).strip().splitlines() or [""])[0][:500]
                raise RoleError(f"role {self.role} rank {rank_of[done[0]]}: {self.method} failed: "
                                f"{type(cause).__name__}: {first_line}") from error
        return self._merge(ray.get([self._references[rank] for rank in self._merged_ranks]))


def replica_of_ranks(world_size: int, *, tp_size: int = 1, pp_size: int = 1) -> list[int]:
    """The data-parallel coordinate of each rank of a ("pp", "dp", "tp") world (`init_world`'s mesh)."""
    replicas = world_size // (tp_size * pp_size)
    return [(rank // tp_size) % replicas for rank in range(world_size)]


class RayGroupHandle:
    """A role run by `len(members)` Ray actors forming one torch.distributed world; `replica_of`
    gives each rank's data-parallel coordinate (`replica_of_ranks`; default: each rank its own)."""

    def __init__(self, role: str, worker_class: type, members: list, placement_group: Any, *, timeout_s: float,
                 replica_of: list[int] | None = None):
        self.role = role
        self.worker_class = worker_class
        self.members = members
        self.placement_group = placement_group
        self.timeout_s = timeout_s
        self.replica_of = replica_of if replica_of is not None else list(range(len(members)))

    @property
    def world_size(self) -> int:
        return len(self.members)

    def submit(self, method: Callable, *args: Any, **kwargs: Any) -> GroupFuture:
        name = _method_name(self.worker_class, method)
        rule: _SplitRule | None = getattr(method, _SPLIT_ROWS, None)
        if rule is None:
            references = [member.call.remote(method, args, kwargs) for member in self.members]
            return GroupFuture(self.role, name, references, rank_zero, timeout_s=self.timeout_s)
        replica_of = list(range(self.world_size)) if rule.per_rank else self.replica_of
        blocks = row_blocks(_row_count(args, kwargs), max(replica_of) + 1)
        references = []
        for member, replica in zip(self.members, replica_of):
            block = blocks[replica]
            rank_args = tuple(_take_rows(value, block) for value in args)
            rank_kwargs = {key: _take_rows(value, block) for key, value in kwargs.items()}
            if rule.pass_block:
                rank_kwargs["row_block"] = block
            references.append(member.call.remote(method, rank_args, rank_kwargs))
        first_ranks = [replica_of.index(replica) for replica in range(len(blocks))]
        return GroupFuture(self.role, name, references, rule.merge, timeout_s=self.timeout_s, merged_ranks=first_ranks)

    def close(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for member in self.members:
            ray.kill(member)
        remove_placement_group(self.placement_group)


def rank_bundles(world_size: int, *, gpus: bool) -> list[dict[str, float]]:
    """The placement group's bundles, one per rank: a GPU (and a CPU) each on GPU machines; on the
    CPU a token 0.01 CPU (Ray refuses all-zero bundles) so that ranks only get placed, not
    reserved cores, and a 2-core machine holds several role groups."""
    return [{"GPU": 1.0, "CPU": 1.0} if gpus else {"CPU": 0.01} for _ in range(world_size)]


def start_group(role: str, worker_class: type, *, workers: int, timeout_s: float, ray_address: str = "",
                model_parallel: tuple[int, int] = (1, 1), **kwargs: Any) -> RayGroupHandle:
    """`workers` Ray actors, one per bundle of a PACK placement group, each building
    `worker_class(**kwargs)` as one rank of a torch.distributed world whose replicas are
    `model_parallel` = (tp_size, pp_size) ranks each; a rank that cannot start raises RoleError
    naming the role and rank."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    ensure_ray(ray_address)
    gpus = torch.cuda.is_available()
    if gpus and ray.cluster_resources().get("GPU", 0) < workers:
        raise RoleError(f"role {role}: {workers} ranks need a GPU each; the Ray cluster has "
                        f"{ray.cluster_resources().get('GPU', 0):g}")
    group = placement_group(rank_bundles(workers, gpus=gpus), strategy="PACK")
    if not group.wait(timeout_seconds=timeout_s):
        raise RoleError(f"role {role}: Ray could not place {workers} ranks ({rank_bundles(1, gpus=gpus)[0]} each) "
                        f"within {timeout_s:g} s")
    members = [
        ray.remote(RankMember).options(
            num_cpus=rank_bundles(1, gpus=gpus)[0]["CPU"], num_gpus=1 if gpus else 0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank),
        ).remote(rank=rank)
        for rank in range(workers)
    ]
    tp_size, pp_size = model_parallel
    handle = RayGroupHandle(role, worker_class, members, group, timeout_s=timeout_s,
                            replica_of=replica_of_ranks(workers, tp_size=tp_size, pp_size=pp_size))
    try:
        address, port = GroupFuture(role, "address_and_free_port", [members[0].address_and_free_port.remote()],
                                    rank_zero, timeout_s=timeout_s).result()
        starts = [member.start.remote(worker_class, kwargs, world_size=workers, master_addr=address, master_port=port)
                  for member in members]
        GroupFuture(role, f"start {worker_class.__name__}", starts, rank_zero, timeout_s=timeout_s).result()
    except Exception:
        handle.close()
        raise
    return handle
