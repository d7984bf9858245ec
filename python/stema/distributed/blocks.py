"""Work spread over the data-parallel ranks in fixed blocks, the results gathered in order; and a
batch's rows split into one contiguous block per rank (`RowBlock`, `row_blocks`: PPO's role groups).

    results = spread_blocks(world, prompts, block_size=64, work=generate_block)
    # generate_block(first, block) -> one result per item of block = prompts[first:first + 64]

Block b (items `b * block_size ...`) runs on data-parallel rank `b % dp_size`; every rank returns
all the results in item order. The blocks do not depend on the world size, so work that depends
only on its block and its first index (generation seeded with `seed + first`, a reward model
scoring the block) gives the same results in one process and in N. A single process runs every
block itself. `work` must not run collectives: the ranks run different numbers of blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import torch.distributed as dist

from .world import World

Item = TypeVar("Item")
Result = TypeVar("Result")


def block_starts(count: int, block_size: int) -> list[int]:
    """First item index of each block of `block_size` consecutive items among `count`."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return list(range(0, count, block_size))


def spread_blocks(
    world: World, items: Sequence[Item], *, block_size: int, work: Callable[[int, Sequence[Item]], Sequence[Result]]
) -> list[Result]:
    """`work(first, items[first:first + block_size])` for every block, block b on data-parallel rank
    `b % world.dp_size`; every rank gets all the results (one per item) in item order through one
    `all_gather_object` over the data-parallel group (the results must pickle)."""
    mine = []
    for block, first in enumerate(block_starts(len(items), block_size)):
        if block % world.dp_size != world.dp_rank:
            continue
        chunk = items[first : first + block_size]
        results = list(work(first, chunk))
        if len(results) != len(chunk):
            raise ValueError(f"spread_blocks: work returned {len(results)} results for a block of {len(chunk)} items")
        mine.append((first, results))
    if world.dp_size > 1:
        per_rank: list = [None] * world.dp_size
        dist.all_gather_object(per_rank, mine, group=world.mesh["dp"].get_group())
        mine = [block for blocks in per_rank for block in blocks]
    return [result for _, results in sorted(mine, key=lambda block: block[0]) for result in results]


@dataclass(frozen=True)
class RowBlock:
    """Rows [start, stop) of a batch of `total` rows: one rank's share of a data call."""

    start: int
    stop: int
    total: int

    @classmethod
    def whole(cls, rows: int) -> RowBlock:
        return cls(0, rows, rows)

    def __len__(self) -> int:
        return self.stop - self.start


def row_blocks(total: int, parts: int) -> list[RowBlock]:
    """`parts` contiguous blocks covering rows 0..total-1, sizes differing by at most one (the
    first `total % parts` blocks one longer)."""
    size, extra = divmod(total, parts)
    blocks, start = [], 0
    for part in range(parts):
        stop = start + size + (part < extra)
        blocks.append(RowBlock(start, stop, total))
        start = stop
    return blocks
