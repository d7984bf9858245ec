"""Launchers for the multi-process tests: `torchrun` over the CLI, and plain rank processes for
scripts that need to control each rank (a rank that dies or hangs)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

PYTHON_DIR = Path(__file__).resolve().parents[1] / "python"


def environment(**extra: str) -> dict[str, str]:
    """This interpreter's environment with the package importable and one thread per process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PYTHON_DIR), env.get("PYTHONPATH", "")]))
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def torchrun_cli(nproc: int, argv: list[str], *, timeout: float = 150) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node nproc -m stema.cli *argv` (a free port each time);
    fails the test with the ranks' output when the run fails."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "stema.cli", *argv]
    done = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


def free_port() -> int:
    """A port no one listens on now (bind to port 0 and let the OS choose)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_ranks(script: Path, world_size: int, *args: str) -> list[subprocess.Popen]:
    """`python script *args` once per rank, with the environment torchrun would set."""
    port = str(free_port())
    processes = []
    for rank in range(world_size):
        env = environment(
            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=port
        )
        processes.append(
            subprocess.Popen([sys.executable, str(script), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    return processes


def finish(processes: list[subprocess.Popen], *, timeout: float) -> list[tuple[int, str]]:
    """(exit code, stderr) of each rank; kills the ones still running after `timeout` seconds."""
    results = []
    for process in processes:
        try:
            _, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            _, err = process.communicate()
        results.append((process.returncode, err))
    return results


gloo_available = torch.distributed.is_available() and torch.distributed.is_gloo_available()
