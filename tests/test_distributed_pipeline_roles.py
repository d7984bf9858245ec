"""Pipeline stages inside PPO's Ray role groups (`distributed.pp_size=2`, gloo, CPU): GRPO with the
actor as 2 pipeline stages (also as 2 stages x 2 data-parallel replicas, and interleaved with
tensor parallel 2 inside each stage), and PPO with GAE whose actor and critic are each 2 stages,
equal the
same runs with one local process per role, step by step (rewards, losses, grad norms, the critic's
value loss) and in the exported actor and critic; step 2 samples from engines refitted from the
stages (each weight gathered on its stage, broadcast over the pipeline group); a checkpoint taken
by the stages resumes in local roles, and one taken by local roles resumes on the stages.

The reward is a Python function of the response (distinct characters and digits), so GRPO's
group advantages are not all 0 and the policy really moves.

Tolerances, from the arithmetic (as in `test_distributed_pipeline`): the stages compute what the
whole model computes, but on rows right-padded to the fixed length `data.max_length +
rollout.max_new_tokens` (other matmul shapes: fp32 rounding of ~1e-7 relative per value), and the
schedule sums the micro-batches' gradients in its own order. A loss or a value loss summed over ~20
response tokens then moves by ~1e-6 relative, and the metrics are logged to 7 significant digits,
hence `rel=1e-5, abs=1e-6` per metric (the bound of the FSDP2 role groups). The engines sample with
weights refitted from the stages: their log-probs match the trainer's to 1e-4 (the engine's own
bound), and since the rewards of step 2 are equal the same responses were drawn. Exports are held
to 1% of the largest change training made (see `test_distributed_ray_roles.EXPORT_GAP_OF_UPDATE`:
AdamW turns a gradient summed in another order near 0 into an update off by up to ~1e-2 of lr).
"""

from pathlib import Path

import pytest
import torch
from test_distributed_pipeline import save_untied

from stema.cli import main
from stema.config import PPOConfig
from stema.training.logging import read_metrics

from run_folders import died_after

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 5,
                                reason="a 4-rank actor group and the single roles need 5 GPUs (NCCL: one GPU per rank)")

REWARD = '''
def score(prompt, completion):
    """Distinct characters of the response, and a bonus per digit: differs between samples."""
    return len(set(completion)) / 4 + sum(character.isdigit() for character in completion)
'''

RUN = ["data.train=builtin", "data.builtin_size=32", "data.max_length=32", "rollout.max_new_tokens=6", "rollout.max_batch=2",
       "trainer.global_batch_size=2", "trainer.micro_batch_size=1", "ppo.ppo_epochs=2", "trainer.max_steps=2",
       "trainer.progress_bar=false", "trainer.tensorboard=false", "trainer.export_hf=true", "optim.lr=1e-3",
       "critic_optim.lr=1e-3", "trainer.save_every=1", "reward.function=stema_test_pp_rewards:score"]
STAGES = ["roles.backend=ray", "roles.actor_workers=2", "roles.critic_workers=2", "distributed.pp_size=2",
          "distributed.timeout_s=60", "roles.call_timeout_s=300", "roles.refit_bucket_mb=0.01"]
COMMANDS = {
    # GRPO: 4 samples per prompt, minibatches of 4 rows (4 pipeline micro-batches of 1 row), KL in the loss
    "grpo": ["rollout.samples_per_prompt=4", "ppo.minibatch_size=4"],
    # PPO with GAE: the critic's values and value loss through its own 2 stages
    "ppo": ["rollout.samples_per_prompt=2", "ppo.minibatch_size=2"],
}
KEYS = {
    "grpo": ("loss", "pg_loss", "kl_loss", "grad_norm", "reward", "kl", "advantage_std", "response_length"),
    "ppo": ("loss", "pg_loss", "grad_norm", "reward", "kl", "critic/vf_loss", "critic/grad_norm", "response_length"),
}
# staged run -> (command, extra settings). GRPO also with 2 stages x 2 data-parallel replicas (4 actor
# ranks), where the random minibatches split unevenly between the replicas, so a replica fills its
# 4 micro-batches of 1 row with loss-masked copies of its first row; and with the interleaved
# schedule (4 one-layer stages on 2 pipeline ranks), each stage tensor parallel over 2 ranks
STAGED = {
    "grpo": ("grpo", ()),
    "ppo": ("ppo", ()),
    "grpo_2x2": ("grpo", ("roles.actor_workers=4",)),
    "grpo_interleaved_tp2": ("grpo", ("roles.actor_workers=4", "distributed.tp_size=2", "distributed.pp_schedule=interleaved_1f1b")),
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The untied tiny Llama (stages need untied embeddings) and the reward module, in a folder
    that is the current one while the runs start (the Ray workers import the reward from it)."""
    root = tmp_path_factory.mktemp("pipeline_roles")
    save_untied(root / "llama", "llama")
    (root / "stema_test_pp_rewards.py").write_text(REWARD)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
        try:
            yield root
        finally:
            ray.shutdown()


def argv(command, out, folder, *extra):
    return [command, f"trainer.output_dir={out}", f"model.path={folder / 'llama'}", *RUN, *COMMANDS[command], *extra]


@pytest.fixture(scope="module")
def runs(folder):
    """{staged run: (local run, staged run)}, each 2 steps with a checkpoint after each."""
    for command in COMMANDS:
        assert main(argv(command, folder / f"{command}_local", folder)) == 0
    done = {}
    for name, (command, extra) in STAGED.items():
        assert main(argv(command, folder / f"{name}_stages", folder, *STAGES, *extra)) == 0
        done[name] = (folder / f"{command}_local", folder / f"{name}_stages")
    return done


def records(out, keys):
    return [{key: record[key] for key in (*keys, "engine_logprob_mismatch_max")} for record in read_metrics(out, "train")]


def assert_same_steps(staged, local, keys):
    assert len(staged) == len(local) == 2
    gaps = {key: max(abs(s[key] - l[key]) / max(1.0, abs(l[key])) for s, l in zip(staged, local)) for key in keys}
    print("largest relative difference over 2 steps: " + ", ".join(f"{key} {gap:.1e}" for key, gap in gaps.items()))
    for staged_step, local_step in zip(staged, local):
        assert {key: staged_step[key] for key in keys} == pytest.approx({key: local_step[key] for key in keys}, rel=1e-5, abs=1e-6)


def export_gap(exported: Path, reference: Path, start: Path, *, loader) -> tuple[float, float]:
    """(largest difference of `exported` to `reference`, largest change of `reference` from the
    causal LM `start` it began as: over the weights they share, so a critic's new value head,
    drawn at random when loaded, does not count)."""
    from transformers import AutoModelForCausalLM

    exported_state, reference_state = (loader(path).state_dict() for path in (exported, reference))
    start_state = AutoModelForCausalLM.from_pretrained(start).state_dict()
    assert set(exported_state) == set(reference_state)
    gap = max(float((exported_state[name] - reference_state[name]).abs().max()) for name in reference_state)
    moved = max(float((reference_state[name] - start_state[name]).abs().max()) for name in reference_state if name in start_state)
    return gap, moved


def assert_export_matches(exported: Path, reference: Path, start: Path, *, loader) -> None:
    gap, moved = export_gap(exported, reference, start, loader=loader)
    print(f"{exported.name}: largest weight difference {gap:.1e}; largest training update {moved:.1e}")
    assert moved > 1e-4  # training moved the weights, so the bound is not vacuous
    assert gap <= 1e-2 * moved


@pytest.mark.parametrize("name", list(STAGED))
def test_role_groups_on_two_pipeline_stages_equal_local_roles(runs, folder, name):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    command = STAGED[name][0]
    local, staged = runs[name]
    keys = KEYS[command]
    staged_records, local_records = records(staged, keys), records(local, keys)
    assert_same_steps(staged_records, local_records, keys)
    assert local_records[0]["grad_norm"] > 0.1  # the advantages are not all 0: the policy trains
    if name == "grpo_2x2":  # some minibatch of 4 rows is split unevenly between the replicas' blocks of 4
        seed = PPOConfig().trainer.seed
        orders = [torch.randperm(8, generator=generator) for step in range(2)
                  for generator in [torch.Generator().manual_seed(seed * 1_000_003 + step)] for _ in range(2)]
        assert any(int((order[start : start + 4] < 4).sum()) != 2 for order in orders for start in (0, 4))
    assert staged_records[1]["engine_logprob_mismatch_max"] < 1e-4  # step 2 sampled from engines refitted from the stages
    assert_export_matches(staged / "hf", local / "hf", folder / "llama", loader=AutoModelForCausalLM.from_pretrained)
    if command == "ppo":  # the critic starts from the policy's backbone with a new value head
        load = lambda path: AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)  # noqa: E731
        assert_export_matches(staged / "critic_hf", local / "critic_hf", folder / "llama", loader=load)


@pytest.mark.parametrize(("taken_by", "resumed_by"), [("stages", "local"), ("local", "stages")])
def test_a_checkpoint_moves_between_pipeline_stages_and_local_roles(runs, folder, tmp_path, taken_by, resumed_by):
    """PPO's step-1 checkpoint (actor and critic state whole, keyed by parameter name) resumed by
    the other layout: step 2 as in the straight run, within the tolerance above."""
    local, staged = runs["ppo"]
    source = staged if taken_by == "stages" else local
    died_after(tmp_path, 1, source=source)
    assert main(argv("ppo", tmp_path, folder, "trainer.resume=true", *(STAGES if resumed_by == "stages" else []))) == 0
    resumed, straight = records(tmp_path, KEYS["ppo"]), records(source, KEYS["ppo"])
    assert_same_steps(resumed, straight, KEYS["ppo"])


def test_replicas_and_pipeline_micro_batches_of_a_role_group():
    """Ranks of one data-parallel replica (its stages and tensor-parallel shards, laid out as
    `init_world`'s ("pp", "dp", "tp") mesh) share a row block; a minibatch's rows on stages go in
    a fixed number of micro-batches, the missing rows copies of row 0 with a loss mask of 0."""
    from stema.roles.groups import replica_of_ranks
    from stema.training.ppo_update import ppo_pipeline_microbatches, stage_micro_batch

    assert replica_of_ranks(4, pp_size=2) == [0, 1, 0, 1]
    assert replica_of_ranks(4, tp_size=2) == [0, 0, 1, 1]
    assert replica_of_ranks(8, tp_size=2, pp_size=2) == [0, 0, 1, 1, 0, 0, 1, 1]
    options = dict(micro_batch_size=2, pp_size=2, interleaved=False)
    assert ppo_pipeline_microbatches(sequences=16, minibatch_size=4, dp_size=2, **options) == 2  # a replica may hold all 4
    assert ppo_pipeline_microbatches(sequences=16, minibatch_size=0, dp_size=2, **options) == 4  # its block of 8
    assert ppo_pipeline_microbatches(sequences=6, minibatch_size=0, dp_size=1, **{**options, "interleaved": True}) == 4
    tensors = {"input_ids": torch.arange(12).reshape(4, 3), "action_mask": torch.tensor([[0, 1, 1]] * 4, dtype=torch.bool)}
    batch = stage_micro_batch(tensors, torch.tensor([2]), rows=3, device=torch.device("cpu"))
    assert batch["input_ids"].tolist() == [[6, 7, 8], [0, 1, 2], [0, 1, 2]]
    assert batch["loss_mask"].tolist() == [[0.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    assert "action_mask" not in batch
