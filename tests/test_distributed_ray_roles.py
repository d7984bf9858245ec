"""PPO roles as Ray actor groups, each group one torch.distributed world (gloo on the CPU):

- a group handle splits the rows of data calls over the ranks and gathers the results in row
  order, runs every other call on all ranks (rank 0's result), and a failing or slow rank ends the
  call with a RoleError naming the role and the rank, long before the collective timeout;
- PPO with the actor and the critic each 2 FSDP2-sharded ranks equals PPO with local roles;
- the bucketed refit (whole tensors gathered a bucket at a time) fills every engine weight in
  place, and a colocated engine holds its KV cache only while it generates;
- disaggregated placement (2 FSDP2 actor ranks, the engines in a rollout worker of their own,
  refitted over the object store) equals local roles, its engine buffers never move, and its
  engine ends holding the exported actor's weights;
- a sharded actor's `hf/` export loads in transformers and equals the local run's.

One local Ray session (2 CPUs) serves the file."""

import sys
import time
from pathlib import Path

import pytest
import torch

import stema.trainers.ppo as ppo_trainer
from stema.cli import main
from stema.config import ConfigError, DistributedConfig, PPOConfig, load_config
from stema.distributed.role_model import bucket_boundaries
from stema.roles.groups import RowBlock, concat_rows, row_blocks, split_rows
from stema.roles.handles import RoleError, start_role
from stema.rollout import BucketedRefitter
from stema.training.logging import read_metrics

from run_folders import died_after

ray = pytest.importorskip("ray")
two_ranks = pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2,
                               reason="a 2-rank group on a GPU machine needs 2 GPUs (NCCL: one GPU per rank)")
disaggregated_fits = pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 4,
                                        reason="a 2-rank actor, a rollout worker and 3 shared single roles need 4 GPUs")


@pytest.fixture(scope="module")
def ray_session():
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the test's worker class, in the Ray actors
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


class RankProbe:
    """A tiny group worker: which rank saw which rows, a collective, a failure, a nap."""

    def __init__(self):
        from stema.distributed import init_world

        self.world = init_world(DistributedConfig(timeout_s=60), role="probe")

    @split_rows(merge=concat_rows, pass_block=True)
    def tag_rows(self, rows: torch.Tensor, *, row_block: RowBlock | None = None) -> torch.Tensor:
        """`[rows, 3]`: each row's value, this rank, the block start."""
        tags = torch.tensor([[self.world.rank, row_block.start]] * len(rows))
        return torch.cat([rows[:, None], tags], dim=1)

    def world_sum(self, value: float) -> float:
        import torch.distributed as dist

        total = torch.tensor([value], device=self.world.device)
        dist.all_reduce(total)
        return float(total)

    def fail_on(self, rank: int) -> None:
        import torch.distributed as dist

        if self.world.rank == rank:
            raise ValueError(f"bad shard on rank {rank}")
        dist.barrier()  # the others wait for it (up to the 60 s gloo timeout)

    def nap(self, rank: int, seconds: float) -> None:
        if self.world.rank == rank:
            time.sleep(seconds)


@two_ranks
def test_ray_group_splits_rows_gathers_in_order_and_names_a_failing_rank(ray_session):
    group = start_role("probe", RankProbe, backend="ray", workers=2, timeout_s=60)
    try:
        tagged = group.submit(RankProbe.tag_rows, torch.arange(5)).result()
        assert tagged[:, 0].tolist() == [0, 1, 2, 3, 4]  # gathered in row order
        assert tagged[:, 1].tolist() == [0, 0, 0, 1, 1]  # rank 0 took rows 0-2, rank 1 rows 3-4
        assert tagged[:, 2].tolist() == [0, 0, 0, 3, 3]
        assert group.submit(RankProbe.world_sum, 2.5).result() == 5.0  # every rank joined the collective
        started = time.perf_counter()
        with pytest.raises(RoleError, match=r"role probe rank 1: fail_on failed: ValueError: bad shard on rank 1"):
            group.submit(RankProbe.fail_on, 1).result()
        failed_after = time.perf_counter() - started
        assert failed_after < 20  # rank 0 still waits in its barrier; the error did not
    finally:
        group.close()
    group = start_role("probe", RankProbe, backend="ray", workers=2, timeout_s=60)
    group.timeout_s = 1.0  # calls from now on (start-up had 60 s)
    try:
        with pytest.raises(RoleError, match=r"role probe: nap did not return within 1 s .*ranks still running: 1"):
            group.submit(RankProbe.nap, 1, 30.0).result()
    finally:
        group.close()
    print(f"a failing rank surfaced after {failed_after:.2f} s")


def test_row_blocks_cover_the_batch_in_order():
    assert row_blocks(5, 2) == [RowBlock(0, 3, 5), RowBlock(3, 5, 5)]
    assert row_blocks(4, 2) == [RowBlock(0, 2, 4), RowBlock(2, 4, 4)]
    assert [len(block) for block in row_blocks(7, 3)] == [3, 2, 2]


PPO = [
    "data.train=builtin", "data.builtin_size=32", "data.max_length=32", "rollout.max_new_tokens=4", "rollout.max_batch=1",
    "trainer.global_batch_size=4", "trainer.micro_batch_size=1", "ppo.minibatch_size=2", "ppo.ppo_epochs=2",
    "reward.function=builtin", "trainer.max_steps=2", "trainer.progress_bar=false", "trainer.tensorboard=false",
    "trainer.export_hf=false", "optim.lr=1e-3", "critic_optim.lr=1e-3", "trainer.save_every=1",
]
GROUPS = ["roles.backend=ray", "roles.actor_workers=2", "roles.critic_workers=2", "distributed.timeout_s=60",
          "roles.call_timeout_s=120", "roles.refit_bucket_mb=0.01"]
DISAGGREGATED = ["roles.backend=ray", "roles.actor_workers=2", "roles.placement=disaggregated", "roles.rollout_workers=1",
                 "distributed.timeout_s=60", "roles.call_timeout_s=120", "roles.refit_bucket_mb=0.01"]


KEYS = ("loss", "pg_loss", "grad_norm", "reward", "kl", "critic/vf_loss", "critic/grad_norm", "response_length",
        "engine_logprob_mismatch_max")


def train_records(out):
    return [{k: r[k] for k in KEYS} for r in read_metrics(out, "train")]


@pytest.fixture(scope="module")
def ppo_runs(ray_session, tmp_path_factory):
    """The same 2-step PPO run with local roles and with Ray role groups (checkpoints every step,
    the actor exported to hf/)."""
    root = tmp_path_factory.mktemp("ppo")
    assert main(["ppo", f"trainer.output_dir={root / 'local'}", *PPO, "trainer.export_hf=true"]) == 0
    assert main(["ppo", f"trainer.output_dir={root / 'groups'}", *PPO, *GROUPS, "trainer.export_hf=true"]) == 0
    return root / "local", root / "groups"


@pytest.fixture(scope="module")
def disaggregated_run(ray_session, tmp_path_factory):
    """The PPO run with disaggregated placement, and what its rollout worker showed before the
    first refit and after the last: {"addresses": [...], "engine_weights": ...}."""
    from stema.roles.rollout import RolloutWorker

    seen = {}

    class WatchedRoles(ppo_trainer.Roles):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen["addresses"] = [self.rollout.submit(RolloutWorker.engine_buffer_addresses).result()]

        def close(self):
            seen["addresses"].append(self.rollout.submit(RolloutWorker.engine_buffer_addresses).result())
            seen["engine_weights"] = self.rollout.submit(RolloutWorker.engine_weights).result()
            super().close()

    out = tmp_path_factory.mktemp("ppo") / "disaggregated"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ppo_trainer, "Roles", WatchedRoles)
        started = time.perf_counter()
        assert main(["ppo", f"trainer.output_dir={out}", *PPO, *DISAGGREGATED, "trainer.export_hf=true"]) == 0
        seen["seconds"] = time.perf_counter() - started
    return out, seen


@two_ranks
def test_ppo_with_ray_role_groups_of_two_fsdp_ranks_equals_local_roles(ppo_runs):
    """Actor and critic each 2 sharded ranks (minibatches of 2 rows drawn at random, so a rank
    sometimes holds none of a minibatch), reference and reward one actor each."""
    seed = PPOConfig().trainer.seed
    minibatches = [order[start : start + 2] for step in range(2) for offset in (0, 7)
                   for order in _epoch_orders(seed * 1_000_003 + step + offset) for start in (0, 2)]
    assert any(bool((minibatch < 2).all() or (minibatch >= 2).all()) for minibatch in minibatches)  # a 0-weight pass happens
    local, groups = (train_records(out) for out in ppo_runs)
    keys = KEYS
    assert len(groups) == len(local) == 2
    gaps = {k: max(abs(g[k] - l[k]) / max(1.0, abs(l[k])) for g, l in zip(groups, local)) for k in keys}
    print("largest relative difference over 2 steps: " + ", ".join(f"{k} {gap:.1e}" for k, gap in gaps.items()))
    for group_step, local_step in zip(groups, local):
        assert group_step == pytest.approx(local_step, rel=1e-5, abs=1e-6)
    # Step 2's rollouts came from engines refitted from the shards: same responses, same rewards.
    assert groups[1]["engine_logprob_mismatch_max"] < 1e-4


@two_ranks
@pytest.mark.parametrize(("taken_with", "resumed_with"), [("groups", "groups"), ("groups", "local"), ("local", "groups")])
def test_ppo_resumes_onto_the_same_curve_with_another_number_of_workers(ppo_runs, tmp_path, taken_with, resumed_with):
    """Step 1's checkpoint (each role's state whole, keyed by parameter name, whatever its number
    of workers) loaded by 2-rank groups (each rank takes its shards) or by local roles: step 2 as
    in the straight run (the local and the group runs agree within 1e-5, see above)."""
    source = dict(zip(("local", "groups"), ppo_runs))[taken_with]
    died_after(tmp_path, 1, source=source)
    workers = GROUPS if resumed_with == "groups" else []
    assert main(["ppo", f"trainer.output_dir={tmp_path}", *PPO, *workers, "trainer.resume=true"]) == 0
    resumed, straight = train_records(tmp_path), train_records(source)
    assert len(resumed) == 2
    assert resumed[1] == pytest.approx(straight[1], rel=1e-5, abs=1e-6)


@disaggregated_fits
def test_ppo_with_disaggregated_rollout_workers_equals_local_roles(ppo_runs, disaggregated_run):
    """Actor 2 FSDP2 ranks without engines, one rollout worker holding the engine, refitted over
    the object store after each update in buckets of 0.01 MiB: the same metrics and exported
    actor as local roles, the engine's buffers where they were before the first refit, and after
    the last refit the engine holds exactly what an engine built from the exported actor holds."""
    from transformers import AutoModelForCausalLM

    from stema.rollout import GenerationEngine

    local, _ = ppo_runs
    out, seen = disaggregated_run
    disaggregated, straight = train_records(out), train_records(local)
    assert len(disaggregated) == len(straight) == 2
    gaps = {k: max(abs(d[k] - l[k]) / max(1.0, abs(l[k])) for d, l in zip(disaggregated, straight)) for k in KEYS}
    print(f"disaggregated run {seen['seconds']:.1f} s; largest relative difference to local over 2 steps: "
          + ", ".join(f"{k} {gap:.1e}" for k, gap in gaps.items()))
    for disaggregated_step, local_step in zip(disaggregated, straight):
        assert disaggregated_step == pytest.approx(local_step, rel=1e-5, abs=1e-6)
    assert disaggregated[1]["engine_logprob_mismatch_max"] < 1e-4  # step 2 sampled from the refitted engine
    before, after = seen["addresses"]
    assert before == after and len(before[0]) >= 5
    exported = AutoModelForCausalLM.from_pretrained(out / "hf")
    expected = GenerationEngine.from_hf(exported, max_batch=1, max_total_len=8).weights.buffers()
    engine = seen["engine_weights"][0]
    assert set(engine) == set(expected)
    for name, tensor in engine.items():
        assert torch.equal(tensor, expected[name]), name
    assert_export_matches(out / "hf", local)


def export_gap(exported: Path, reference: Path) -> float:
    """Largest absolute weight difference between two exported causal LMs (same tensor names)."""
    from transformers import AutoModelForCausalLM

    exported_state, reference_state = (AutoModelForCausalLM.from_pretrained(path).state_dict() for path in (exported, reference))
    assert set(exported_state) == set(reference_state)
    return max(float((exported_state[name] - reference_state[name]).abs().max()) for name in reference_state)


# Why the export is held to a fraction of the training update rather than to an absolute 1e-6:
# the sharded and the local run sum the same per-row gradients in another order (gloo's reduce-
# scatter, GEMMs of other shapes), which leaves each gradient element off by about 2^-24 of the
# magnitude of the terms summed into it. AdamW divides each update by the element's running RMS
# gradient (+ eps 1e-8), so where terms cancel to a gradient near zero (|g| ~ 1e-8 .. 1e-7) that
# absolute error becomes a relative error of the update of up to ~1e-2: the 8 updates of lr 1e-3
# here then differ by up to ~8 x 1e-3 x 1e-2 = 8e-5 in the worst element, while every element
# with a clear gradient agrees to ~1e-7 x lr. Measured: 1.3e-5 on an Intel Xeon (AVX-512/AMX),
# below 1e-6 on an AMD EPYC. The bound below is 1% of the largest weight change training made
# (about lr x updates = 8e-3): a stale export, a shard gathered into the wrong place or a missing
# update is off by the whole change, 100x the bound.
EXPORT_GAP_OF_UPDATE = 1e-2


def assert_export_matches(exported: Path, local: Path) -> None:
    """`exported` equals the local run's export up to EXPORT_GAP_OF_UPDATE of the largest weight
    change that training made (the local export against the tiny model it started from)."""
    gap, update = export_gap(exported, local / "hf"), export_gap(local / "hf", local / "cache" / "tiny")
    print(f"{exported}: largest weight difference to the local export {gap:.1e}; largest training update {update:.1e}")
    assert update > 1e-4  # training moved the weights, so the bound below is not vacuous
    assert gap <= EXPORT_GAP_OF_UPDATE * update


@two_ranks
def test_a_sharded_actor_exports_the_hf_model_of_the_local_run(ppo_runs):
    """hf/ written from the 2-rank actor (gathered from its shards on rank 0) loads in transformers
    and holds the local run's weights."""
    local, groups = ppo_runs
    assert_export_matches(groups / "hf", local)


def _epoch_orders(seed: int) -> list[torch.Tensor]:
    """The row orders of the 2 PPO epochs of one update (`PPOUpdater.update`'s draw)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randperm(4, generator=generator) for _ in range(2)]


def test_ray_role_group_config_is_checked():
    with pytest.raises(ConfigError, match="roles.actor_workers: 2 workers need roles.backend ray"):
        load_config(PPOConfig, None, [*PPO, "roles.actor_workers=2"])
    with pytest.raises(ConfigError, match=r"roles.critic_workers: 3 workers must divide the rollout batch .* = 4 sequences"):
        load_config(PPOConfig, None, [*PPO, "roles.backend=ray", "roles.critic_workers=3"])
    with pytest.raises(ConfigError, match="roles.placement: 'disaggregated' .* needs roles.backend ray"):
        load_config(PPOConfig, None, [*PPO, "roles.placement=disaggregated"])
    with pytest.raises(ConfigError, match="roles.rollout_workers: 2 rollout workers need roles.placement disaggregated"):
        load_config(PPOConfig, None, [*PPO, "roles.backend=ray", "roles.rollout_workers=2"])
    with pytest.raises(ConfigError, match="roles.placement: 'disaggregated' does not refit LoRA policies yet"):
        load_config(PPOConfig, None, [*PPO, *DISAGGREGATED, "model.lora.enabled=true"])
    assert load_config(PPOConfig, None, [*PPO, *DISAGGREGATED, "roles.rollout_workers=3"]).roles.rollout_workers == 3


def test_bucket_boundaries_keep_each_bucket_within_its_bytes():
    assert bucket_boundaries([4, 4, 4, 10, 1, 1], 8) == [(0, 2), (2, 3), (3, 4), (4, 6)]
    assert bucket_boundaries([4, 4], 1 << 20) == [(0, 2)]
    assert bucket_boundaries([], 8) == []


@pytest.fixture(scope="module")
def tiny_actor(tmp_path_factory):
    from stema.roles.actor import ActorWorker

    out = tmp_path_factory.mktemp("actor")
    config = load_config(PPOConfig, None, [f"trainer.output_dir={out}", *PPO, "optim.lr=1e-2"])
    return ActorWorker(**ppo_trainer.actor_arguments(config), cache_dir=str(out), total_steps=2)


def test_bucketed_refit_fills_every_engine_weight_in_place_a_bucket_at_a_time(tiny_actor):
    from stema.rollout import GenerationEngine

    model, engine = tiny_actor.model, tiny_actor.engines[0]
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    addresses = {name: tensor.data_ptr() for name, tensor in engine.weights.buffers().items()}
    sizes = [p.numel() * p.element_size() for p in model.parameters()]
    bucket_bytes = 3 * max(sizes)
    refitter = BucketedRefitter(engine, model, bucket_bytes=bucket_bytes)
    buckets = refitter.weights.buckets
    covered = [index for start, stop in buckets for index in range(start, stop)]
    assert covered == list(range(len(refitter.views))) and len(buckets) > 1
    refitter.refit()
    assert 0 < refitter.weights.last_peak_bytes <= bucket_bytes
    expected = GenerationEngine.from_hf(model, max_batch=1, max_total_len=8).weights.buffers()
    for name, tensor in engine.weights.buffers().items():
        assert torch.equal(tensor, expected[name]), name
        assert tensor.data_ptr() == addresses[name], name
    tiny_actor.refit()  # the actor's own plan still finds its buffers where it recorded them


def test_colocated_engine_holds_its_kv_cache_only_while_generating(tiny_actor):
    from stema.roles.experience import experience_tensors

    engine = tiny_actor.engines[0]
    held_during = []
    generate = engine.generate

    def recording_generate(*args, **kwargs):
        held_during.append(tiny_actor.engine_kv_cache_bytes()[0])
        return generate(*args, **kwargs)

    engine.generate = recording_generate
    prompts = [[1, 5, 6, 7], [1, 8, 9]]
    assert tiny_actor.engine_kv_cache_bytes() == [0]  # released once the engine was built
    first = tiny_actor.generate(prompts, seed=3)
    capacity = engine.cache.tensor.numel() * engine.cache.tensor.element_size()
    assert held_during and all(held == capacity > 0 for held in held_during)
    assert tiny_actor.engine_kv_cache_bytes() == [0]  # freed after generate, so before train
    batch = experience_tensors(first.rollouts, tiny_actor.pad_token_id())
    advantages = torch.ones(batch["action_mask"].shape) * batch["action_mask"]
    tiny_actor.train(batch, advantages=advantages, old_logprobs=tiny_actor.logprobs(batch), ref_logprobs=None, kl_coef=0.0, step=0)
    assert tiny_actor.engine_kv_cache_bytes() == [0]
    again = experience_tensors(tiny_actor.generate(prompts, seed=3).rollouts, tiny_actor.pad_token_id())
    gap = (again["engine_logprobs"] - tiny_actor.logprobs(again))[again["action_mask"]].abs().max()  # a re-held cache works
    assert float(gap) < 1e-4
    print(f"KV cache: {capacity} bytes while generating, 0 after; engine vs trainer log-prob gap {float(gap):.1e}")


@two_ranks
def test_two_rollout_workers_split_the_prompts_and_take_every_bucket_in_place(ray_session, tmp_path):
    """The rollout role with 2 workers: prompts split by rows sample what one worker samples
    (rollout.max_batch 1); a refit from a changed policy, sent bucket by bucket through the object
    store, leaves both workers' engines equal to an engine built from that policy, in the same
    buffers."""
    from stema.distributed import World
    from stema.models.loading import load_policy
    from stema.roles.rollout import RolloutWorker, engine_receivers, remote_refitter, start_rollout_role
    from stema.rollout import GenerationEngine

    config = load_config(PPOConfig, None, [f"trainer.output_dir={tmp_path}", *PPO, *DISAGGREGATED, "roles.rollout_workers=2"])
    one_worker = RolloutWorker(**ppo_trainer.rollout_arguments(config), cache_dir=str(tmp_path))
    rollout = start_rollout_role(workers=config.roles.rollout_workers, timeout_s=60, cache_dir=str(tmp_path),
                                 **ppo_trainer.rollout_arguments(config))
    try:
        prompts = [[1, 5, 6, 7], [1, 8, 9], [1, 10], [1, 11, 12, 13, 14], [1, 7, 7]]
        split = rollout.submit(RolloutWorker.generate, prompts, seed=3).result()
        whole = one_worker.generate(prompts, seed=3)
        assert split.worker_prompts == [3, 2] and whole.worker_prompts == [5]
        assert [r.token_ids for r in split.rollouts] == [r.token_ids for r in whole.rollouts]

        policy, _ = load_policy(config.model, cache_dir=str(tmp_path))
        with torch.no_grad():
            for parameter in policy.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.1)
        def on_each_worker(method):
            return [ray.get(member.call.remote(method, (), {})) for member in rollout.members]

        before = on_each_worker(RolloutWorker.engine_buffer_addresses)
        refitter = remote_refitter(policy, engine_receivers(rollout, timeout_s=60), bucket_bytes=4096,
                                   world=World(role="actor"))
        refitter.refit()
        assert refitter.sent_buckets == len(refitter.weights.buckets) > 1
        expected = GenerationEngine.from_hf(policy, max_batch=1, max_total_len=8).weights.buffers()
        for engines in on_each_worker(RolloutWorker.engine_weights):  # each worker's, not only rank 0's
            assert all(torch.equal(engines[0][name], expected[name]) for name in expected)
        assert on_each_worker(RolloutWorker.engine_buffer_addresses) == before
        print(f"rollout refit: {refitter.sent_buckets} buckets of <= 4096 bytes to 2 workers")
    finally:
        rollout.close()


KILLING_REWARD = '''
import os
import signal
import time
from pathlib import Path

CALLS = [0]


def score(prompt, completion):
    """0.5 per response; while `armed` exists beside this file, the worker running it is killed
    (SIGKILL, as by the OOM killer) at its fifth call: in the second step, mid-scoring. The time
    of the kill goes to `killed_at`."""
    CALLS[0] += 1
    folder = Path(__file__).parent
    if CALLS[0] == 5 and (folder / "armed").exists():
        (folder / "killed_at").write_text(repr(time.time()))
        os.kill(os.getpid(), signal.SIGKILL)
    return 0.5
'''


def test_a_killed_ray_role_worker_stops_the_run_naming_role_and_rank_and_the_run_resumes(ray_session, tmp_path, monkeypatch):
    """The reward role's Ray actor is killed in step 2 (its reward function, a module in the
    current folder, kills its own process): the controller stops with a RoleError naming the role
    and rank within roles.call_timeout_s of the kill, the step-1 checkpoint is intact, and a resume
    trains step 2."""
    from stema.training import checkpoint

    (tmp_path / "stema_test_killing_rewards.py").write_text(KILLING_REWARD)
    (tmp_path / "armed").touch()
    monkeypatch.chdir(tmp_path)  # the reward module is found in the current folder, also by the Ray worker
    out = tmp_path / "run"
    argv = ["ppo", f"trainer.output_dir={out}", "data.train=builtin", "data.builtin_size=8", "data.max_length=32",
            "rollout.max_new_tokens=4", "trainer.global_batch_size=4", "trainer.micro_batch_size=4", "ppo.advantage=reinforce",
            "reward.function=stema_test_killing_rewards:score", "trainer.max_steps=2", "trainer.save_every=1",
            "trainer.progress_bar=false", "trainer.tensorboard=false", "trainer.export_hf=false",
            "roles.backend=ray", "roles.call_timeout_s=300"]
    with pytest.raises(RoleError, match=r"^role reward rank 0: score failed: \w+: .*") as caught:
        main(argv)
    stopped_after_s = time.time() - float((tmp_path / "killed_at").read_text())
    print(f"the controller stopped {stopped_after_s:.1f} s after the reward worker was killed: {caught.value}")
    assert stopped_after_s < 300  # roles.call_timeout_s: the death is reported, not waited out
    step, state = checkpoint.load_latest_checkpoint(out / "checkpoints")
    assert step == 1 and state["actor"]["updater"]["model"]
    assert [record["step"] for record in read_metrics(out, "train")] == [1]

    (tmp_path / "armed").unlink()
    assert main([*argv, "trainer.resume=true"]) == 0
    assert [record["step"] for record in read_metrics(out, "train")] == [1, 2]
    assert checkpoint.load_latest_checkpoint(out / "checkpoints")[0] == 2
