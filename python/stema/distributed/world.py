"""The process group of one run, from the environment `torchrun` sets.

    world = init_world(cfg.distributed, role="sft")   # WORLD_SIZE unset or 1: a single process
    mine = examples[world.dp_rank * per_rank : (world.dp_rank + 1) * per_rank]
    totals = world.sum_over_data_parallel(totals)
    with world.failures_named():                      # a dead or hung rank: an error naming it
        train(...)

Backends: NCCL when CUDA is available, gloo on the CPU. Ranks form a 2-D device mesh
`("dp", "tp")`: `tp_size` consecutive ranks hold one tensor-parallel replica; the data-parallel
group of a rank is the ranks with its tp coordinate. With pipeline stages (`pp_size > 1`) the mesh
is `("pp", "dp", "tp")`: the first world_size / pp_size ranks hold stage 0 (as a dp x tp grid),
the next ones stage 1, and so on; a rank's pipeline group is the ranks with its dp and tp
coordinates.

Failures. Every collective waits at most `timeout_s` (the process group's timeout). Each rank
writes its progress (`mark(step)`) to the rendezvous store; when a collective fails or times out,
`failures_named` raises `CollectiveError` naming the role, this rank and the ranks that fell
behind or stopped reporting, instead of hanging. With NCCL the watchdog may abort the process
first (TORCH_NCCL_ASYNC_ERROR_HANDLING); its log names the rank and the collective.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as dist

PROGRESS_KEY = "stema/progress/{rank}"


class CollectiveError(RuntimeError):
    """A collective failed or timed out: another rank died, hung, or left the group."""


@dataclass
class World:
    """Where this process sits: its ranks, device and (when there are several processes) the mesh."""

    role: str
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    tp_size: int = 1
    pp_size: int = 1
    timeout_s: float = 600.0
    device: torch.device = torch.device("cpu")
    mesh: Any = None  # DeviceMesh ("dp", "tp") when world_size > 1; ("pp", "dp", "tp") when pp_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs, writes checkpoint metadata and exports."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def dp_size(self) -> int:
        return self.world_size // (self.tp_size * self.pp_size)

    @property
    def dp_rank(self) -> int:
        return (self.rank // self.tp_size) % self.dp_size

    @property
    def pp_rank(self) -> int:
        """This rank's place in its pipeline group (its stage, or its first stage when interleaved)."""
        return self.stage_of(self.rank)

    def stage_of(self, rank: int) -> int:
        return rank // (self.dp_size * self.tp_size)

    def describe_rank(self, rank: int) -> str:
        return f"rank {rank}" + (f" (pipeline stage {self.stage_of(rank)})" if self.pp_size > 1 else "")

    def describe(self) -> str:
        return f"{self.role} {self.describe_rank(self.rank)} of {self.world_size}"

    def sum_over_data_parallel(self, values: dict[str, float]) -> dict[str, float]:
        """`values` summed over the data-parallel group (all ranks get the sums); the keys must be
        the same on every rank. A single process returns them as they are."""
        if self.dp_size == 1:
            return dict(values)
        keys = sorted(values)
        packed = torch.tensor([float(values[key]) for key in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=self.mesh["dp"].get_group())
        return dict(zip(keys, packed.tolist()))

    def sum_over_pipeline(self, values: dict[str, float]) -> dict[str, float]:
        """`values` summed over this rank's pipeline group, key by key (a key missing on a rank
        counts 0): the last stage's loss and metrics reach every stage. A world without pipeline
        stages returns them as they are."""
        if self.pp_size == 1:
            return dict(values)
        per_stage: list = [None] * self.pp_size
        dist.all_gather_object(per_stage, values, group=self.mesh["pp"].get_group())
        summed: dict[str, float] = {}
        for stage_values in per_stage:
            for key, value in stage_values.items():
                summed[key] = summed.get(key, 0.0) + value
        return summed

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mark(self, step: int) -> None:
        """Record in the rendezvous store that this rank reached `step` (read when a collective fails)."""
        if self.distributed:
            _store().set(PROGRESS_KEY.format(rank=self.rank), str(step))

    def progress(self) -> dict[int, int | None]:
        """rank -> last step it marked (None: it never marked one), read from the store."""
        store = _store()
        found: dict[int, int | None] = {}
        for rank in range(self.world_size):
            key = PROGRESS_KEY.format(rank=rank)
            found[rank] = int(store.get(key)) if store.check([key]) else None
        return found

    def pipeline_rank(self, pp_rank: int) -> int:
        """The global rank of this rank's pipeline group at pipeline coordinate `pp_rank`."""
        stride = self.dp_size * self.tp_size
        return self.rank % stride + pp_rank * stride

    def pipeline_peers(self) -> list[int]:
        """The other ranks of this rank's pipeline group (the stages it exchanges activations with)."""
        return [self.pipeline_rank(stage) for stage in range(self.pp_size) if stage != self.pp_rank]

    def _laggards(self) -> str:
        try:
            progress = self.progress()
        except Exception as error:  # the store may have gone with a dead rank
            return f"the other ranks' progress is unknown (store: {type(error).__name__})"
        text = _laggards_text(progress, self.rank, name=self.describe_rank)
        if self.pp_size > 1:
            peers = ", ".join(f"{self.describe_rank(peer)}, last finished step {progress.get(peer)}" for peer in self.pipeline_peers())
            text += f"; this stage waits on the stages of its pipeline: {peers}"
        return text

    @contextlib.contextmanager
    def failures_named(self) -> Iterator[None]:
        """Turn a failed or timed-out collective inside the block into `CollectiveError` naming the
        role, this rank and the ranks behind it."""
        if not self.distributed:
            yield
            return
        try:
            yield
        except CollectiveError:
            raise  # already named by an inner block
        except (dist.DistError, RuntimeError) as error:
            if not _is_collective_failure(error):
                raise
            raise CollectiveError(
                f"{self.describe()}: a collective failed (a rank that dies or hangs fails the others after "
                f"distributed.timeout_s={self.timeout_s:g}s); {self._laggards()} "
                f"({type(error).__name__}: {str(error).splitlines()[0][:300]})"
            ) from error


def _store():
    """The rendezvous key-value store of the default process group."""
    from torch.distributed.distributed_c10d import _get_default_store

    return _get_default_store()


def _is_collective_failure(error: BaseException) -> bool:
    if isinstance(error, dist.DistError):
        return True
    text = str(error).lower()
    return any(marker in text for marker in ("gloo", "nccl", "timed out", "timeout", "connection closed", "connection reset"))


def _laggards_text(progress: dict[int, int | None], rank: int, *, name=lambda rank: f"rank {rank}") -> str:
    """Which ranks fell behind this one, from their marked steps; `name(rank)` says who a rank is."""
    mine = progress.get(rank)
    if mine is None:
        return "no rank had finished a step" if all(step is None for step in progress.values()) else "this rank finished no step"
    behind = [
        f"{name(other)} ({'finished no step' if step is None else f'last finished step {step}'})"
        for other, step in progress.items()
        if other != rank and (step is None or step < mine)
    ]
    if not behind:
        return f"every rank finished step {mine}: a rank died or hung within the next one"
    return f"behind this rank (which finished step {mine}): " + ", ".join(behind)


def init_world(distributed_cfg: Any, *, role: str) -> World:
    """The `World` of this process, from torchrun's RANK / WORLD_SIZE / LOCAL_RANK.

    One process (WORLD_SIZE unset or 1): no process group, device cuda if available else cpu.
    Several: `init_process_group` (NCCL on GPU, gloo on CPU) with `distributed_cfg.timeout_s`,
    and the ("dp", "tp") device mesh, ("pp", "dp", "tp") with pipeline stages. `role` names the process in errors ("sft", "actor", ...).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world_size == 1:
        return World(role=role, timeout_s=distributed_cfg.timeout_s, device=torch.device("cuda" if cuda else "cpu"))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    tp_size, pp_size = distributed_cfg.tp_size, getattr(distributed_cfg, "pp_size", 1)
    if world_size % (tp_size * pp_size):
        raise ValueError(f"distributed.tp_size={tp_size} x distributed.pp_size={pp_size} does not divide the world size {world_size}")
    if distributed_cfg.strategy == "none":
        raise ValueError(f"distributed.strategy=none runs in one process, but WORLD_SIZE is {world_size}: use strategy fsdp")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if cuda else "gloo",
            timeout=timedelta(seconds=distributed_cfg.timeout_s),
            device_id=device if cuda else None,
        )
    from torch.distributed.device_mesh import init_device_mesh

    dp_size = world_size // (tp_size * pp_size)
    if pp_size > 1:
        mesh = init_device_mesh(device.type, (pp_size, dp_size, tp_size), mesh_dim_names=("pp", "dp", "tp"))
    else:
        mesh = init_device_mesh(device.type, (dp_size, tp_size), mesh_dim_names=("dp", "tp"))
    return World(
        role=role, rank=rank, world_size=world_size, local_rank=local_rank, tp_size=tp_size, pp_size=pp_size,
        timeout_s=distributed_cfg.timeout_s, device=device, mesh=mesh,
    )


def close_world(world: World) -> None:
    """Leave the process group (a no-op in a single process), after a barrier: no rank tears its
    connections down while another is still finishing the last collective."""
    if world.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
