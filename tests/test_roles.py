"""Role handles: typed calls, futures that overlap, errors naming the role; PPO with every role in
its own Ray actor equals PPO with local roles (Ray started locally, on the CPU)."""

import threading
import time

import pytest

from stema.cli import main
from stema.roles.handles import LocalHandle, RoleError, start_role
from stema.training.logging import read_metrics


class Sleeper:
    def __init__(self, *, name: str):
        self.name = name

    def ready(self) -> bool:
        return True

    def nap(self, seconds: float) -> str:
        time.sleep(seconds)
        return f"{self.name} on {threading.current_thread().name}"

    def fail(self) -> None:
        raise ValueError("bad input 7")


def test_calls_to_two_roles_overlap_and_calls_to_one_role_keep_their_order():
    first = start_role("first", Sleeper, backend="local", timeout_s=10, name="a")
    second = start_role("second", Sleeper, backend="local", timeout_s=10, name="b")
    started = time.perf_counter()
    futures = [first.submit(Sleeper.nap, 0.3), second.submit(Sleeper.nap, 0.3)]
    results = [future.result() for future in futures]
    assert time.perf_counter() - started < 0.55  # both slept at once
    assert results[0].startswith("a on stema-first") and results[1].startswith("b on stema-second")
    for handle in (first, second):
        handle.close()


def test_role_errors_name_the_role_and_method_and_timeouts_do_not_hang():
    handle = LocalHandle("critic", Sleeper(name="c"), timeout_s=0.2)
    with pytest.raises(RoleError, match=r"role critic: fail failed: ValueError: bad input 7"):
        handle.submit(Sleeper.fail).result()
    with pytest.raises(RoleError, match=r"role critic: nap did not return within 0.2 s"):
        handle.submit(Sleeper.nap, 1.0).result()
    with pytest.raises(TypeError, match="is not a method of Sleeper"):
        handle.submit(str.upper, "x")
    handle.close()


def test_a_worker_that_cannot_start_names_its_role():
    with pytest.raises(RoleError, match="role reward: could not start Sleeper: TypeError"):
        start_role("reward", Sleeper, backend="local", timeout_s=1, wrong_argument=1)


PPO = [
    "data.train=builtin", "data.builtin_size=32", "data.max_length=32", "rollout.max_new_tokens=4",
    "trainer.global_batch_size=4", "trainer.micro_batch_size=4", "reward.function=builtin", "trainer.max_steps=2",
    "trainer.progress_bar=false", "trainer.tensorboard=false", "trainer.export_hf=false", "optim.lr=1e-3",
]


@pytest.mark.slow
def test_ray_roles_run_ppo_to_the_same_result_as_local_roles(tmp_path):
    ray = pytest.importorskip("ray")
    assert main(["ppo", f"trainer.output_dir={tmp_path / 'local'}", *PPO]) == 0
    try:
        assert main(["ppo", f"trainer.output_dir={tmp_path / 'ray'}", *PPO, "roles.backend=ray"]) == 0
    finally:
        ray.shutdown()
    keys = ("loss", "reward", "kl", "critic/vf_loss", "response_length")
    local = [{k: r[k] for k in keys} for r in read_metrics(tmp_path / "local", "train")]
    remote = [{k: r[k] for k in keys} for r in read_metrics(tmp_path / "ray", "train")]
    assert len(remote) == len(local) == 2
    for remote_step, local_step in zip(remote, local):
        assert remote_step == pytest.approx(local_step, rel=1e-5, abs=1e-7)
