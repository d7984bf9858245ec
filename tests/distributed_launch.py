"""Launchers for the multi-process tests: `torchrun` over the CLI, and plain rank processes for
scripts that need to control each rank (a rank that dies or hangs); the tiny CLI run they share
and the step-by-step comparison of its curves."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from stema.training.logging import read_metrics

PYTHON_DIR = Path(__file__).resolve().parents[1] / "python"


def environment(**extra: str) -> dict[str, str]:
    """This interpreter's environment with the package importable and one thread per process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PYTHON_DIR), env.get("PYTHONPATH", "")]))
    # PYTHONFAULTHANDLER: a rank that crashes in native code prints every thread's Python stack.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONFAULTHANDLER="1", **extra)
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


STEPS = 5
TOLERANCE = 1e-5


def argv(command, out, model, *extra):
    """CLI arguments of a tiny run: built-in data, global batch 8 in micro-batches of 2, STEPS steps."""
    return [
        command, f"trainer.output_dir={out}", f"model.path={model}", "data.train=builtin", "data.builtin_size=32",
        "data.max_length=48", "trainer.global_batch_size=8", "trainer.micro_batch_size=2", f"trainer.max_steps={STEPS}",
        "trainer.progress_bar=false", "trainer.tensorboard=false", "optim.lr=3e-3", "distributed.timeout_s=60", *extra,
    ]


def curve(out):
    """(loss, grad_norm) of each train step."""
    return [(record["loss"], record["grad_norm"]) for record in read_metrics(out, "train")]


def assert_same_curve(two, one):
    """Each step's loss within TOLERANCE (the grad norm within TOLERANCE relative); prints the
    largest differences."""
    assert len(two) == len(one) == STEPS
    for step, ((loss_2, norm_2), (loss_1, norm_1)) in enumerate(zip(two, one), start=1):
        assert abs(loss_2 - loss_1) <= TOLERANCE, f"step {step}: loss {loss_2} (2 processes) vs {loss_1} (1 process)"
        assert abs(norm_2 - norm_1) <= TOLERANCE * max(1.0, norm_1), f"step {step}: grad_norm {norm_2} vs {norm_1}"
    loss_gap = max(abs(a[0] - b[0]) for a, b in zip(two, one))
    norm_gap = max(abs(a[1] - b[1]) for a, b in zip(two, one))
    print(f"largest difference over {STEPS} steps: loss {loss_gap:.2e}, grad_norm {norm_gap:.2e}")


gloo_available = torch.distributed.is_available() and torch.distributed.is_gloo_available()
