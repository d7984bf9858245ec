"""A rank that dies or hangs stops the others within `distributed.timeout_s` with a
`CollectiveError` naming the role, the failing rank and the rank that fell behind, instead of a
silent hang. Two plain processes (gloo) run a few all-reduce "steps"; rank 1 misbehaves in step 2."""

import time

import pytest
from distributed_launch import finish, gloo_available, start_ranks

pytestmark = pytest.mark.skipif(not gloo_available, reason="torch.distributed with gloo is not available")

TIMEOUT_S = 4

SCRIPT = """
import os, sys, time
import torch
import torch.distributed as dist
from stema.config import DistributedConfig
from stema.distributed import init_world

behaviour = sys.argv[1]
world = init_world(DistributedConfig(timeout_s={timeout}), role="actor")
with world.failures_named():
    for step in range(1, 4):
        dist.all_reduce(torch.ones(4))
        if world.rank == 1 and step == 2:
            if behaviour == "exit":
                os._exit(3)
            time.sleep(120)
        world.mark(step)
print("finished", flush=True)
"""


@pytest.mark.parametrize("behaviour", ["hang", "exit"])
def test_distributed_dead_or_hung_rank_fails_the_others_naming_it(tmp_path, behaviour):
    script = tmp_path / "ranks.py"
    script.write_text(SCRIPT.format(timeout=TIMEOUT_S))
    started = time.monotonic()
    rank_0, rank_1 = start_ranks(script, 2, behaviour)
    ((code_0, err_0),) = finish([rank_0], timeout=TIMEOUT_S + 40)
    elapsed = time.monotonic() - started
    if behaviour == "hang":
        rank_1.kill()
    ((code_1, _),) = finish([rank_1], timeout=10)
    assert code_0 not in (0, None, -9), err_0[-2000:]  # rank 0 failed by itself (it was not killed)
    message = next(line for line in err_0.splitlines() if "CollectiveError:" in line)
    print(f"{behaviour}: rank 0 stopped after {elapsed:.1f}s: {message}")
    assert "actor rank 0 of 2" in message
    assert "rank 1 (last finished step 1)" in message
    assert elapsed < TIMEOUT_S + 30  # process start-up and imports included
    if behaviour == "exit":
        assert code_1 == 3
