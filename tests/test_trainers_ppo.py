"""End to end: `stema ppo` and `stema grpo` on the built-in tiny model and task through the CLI:
every advantage estimator, each reference mode, rewards from a function or a reward model,
exports that transformers loads, in-place refit, exact resume, and learning on a simple reward."""


import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from stema.cli import main
from stema.config import OptimConfig, PPOConfig, load_config
from stema.models.families import build_family_model
from stema.models.tiny import build_tokenizer
from stema.roles.actor import ActorWorker
from stema.trainers.ppo import actor_arguments
from stema.training.logging import read_metrics
from stema.training.optim import lr_multiplier

from run_folders import died_after
from tiny_models import spread

SMALL = [
    "data.train=builtin", "data.builtin_size=64", "data.max_length=32", "rollout.max_new_tokens=6",
    "trainer.global_batch_size=8", "trainer.micro_batch_size=4", "reward.function=builtin",
    "trainer.progress_bar=false", "trainer.tensorboard=false",
]


def starts_with_digit(prompt, completion):
    """A reward a tiny random policy can learn in a few steps: about 1 in 10 of its completions
    earn it at first (each step's samples are fresh draws, so a sparser reward may give no signal
    for 15 steps)."""
    return 1.0 if completion[:1].isdigit() else 0.0


def first_character_below_m(prompt, completion):
    """About half of a random policy's completions earn it: a reward with signal from step 1."""
    return 1.0 if completion[:1] < "M" else 0.0


def cli(command, out, *overrides):
    assert main([command, f"trainer.output_dir={out}", *SMALL, *overrides]) == 0
    return out


def test_ppo_with_gae_logs_every_part_and_exports_actor_and_critic(tmp_path):
    out = cli("ppo", tmp_path, "trainer.max_steps=3", "data.eval=builtin", "data.builtin_eval_size=8", "trainer.eval_every=2")
    records = read_metrics(out, "train")
    assert [r["step"] for r in records] == [1, 2, 3]
    for key in ("reward", "kl", "kl_coef", "pg_loss", "critic/vf_loss", "entropy", "generation_s", "inference_s",
                "training_s", "refit_s", "prompts_per_s", "generated_tokens_per_s", "engine_logprob_mismatch_max"):
        assert key in records[-1], key
    # The engine is refitted in place after every update: its log-probs stay the trainer's.
    assert max(r["engine_logprob_mismatch_max"] for r in records) < 1e-4
    assert [r["step"] for r in read_metrics(out, "eval")] == [0, 2, 3]
    assert AutoModelForCausalLM.from_pretrained(out / "hf").config.model_type == "llama"
    assert AutoModelForSequenceClassification.from_pretrained(out / "critic_hf").config.num_labels == 1


@pytest.mark.parametrize("estimator", ["reinforce", "rloo", "grpo"])
def test_critic_free_estimators_run_without_a_critic(tmp_path, estimator):
    out = cli("ppo", tmp_path, "trainer.max_steps=2", f"ppo.advantage={estimator}", "rollout.samples_per_prompt=2",
              "trainer.global_batch_size=4")
    records = read_metrics(out, "train")
    assert len(records) == 2 and "critic/vf_loss" not in records[-1]
    assert not (out / "critic_hf").exists()


def test_grpo_command_defaults_to_groups_and_kl_in_the_loss(tmp_path):
    out = cli("grpo", tmp_path, "trainer.max_steps=2", "trainer.global_batch_size=4")
    saved = load_config(PPOConfig, out / "config.yaml")
    assert saved.ppo.advantage == "grpo" and saved.ppo.kl_in == "loss" and saved.rollout.samples_per_prompt == 4
    records = read_metrics(out, "train")
    assert "kl_loss" in records[-1] or records[-1]["kl"] == 0.0


def test_grpo_raises_a_reward_the_tiny_policy_can_learn(tmp_path):
    out = cli("grpo", tmp_path, "trainer.max_steps=15", "optim.lr=3e-3", "optim.schedule=constant",
              f"reward.function={__name__}:starts_with_digit", "trainer.export_hf=false")
    rewards = [r["reward"] for r in read_metrics(out, "train")]
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.2, rewards


def test_grpo_skipping_uniform_groups_trains_on_the_groups_with_signal(tmp_path):
    common = ("trainer.max_steps=4", "optim.lr=3e-3", "optim.schedule=constant", f"reward.function={__name__}:starts_with_digit",
              "trainer.export_hf=false")
    skipping = read_metrics(cli("grpo", tmp_path / "skip", *common, "ppo.skip_uniform_groups=true"), "train")
    every = read_metrics(cli("grpo", tmp_path / "every", *common), "train")
    assert [r["actor_rows"] for r in every] == [1.0] * 4
    # Step 1 samples the same responses in both runs (same seed, same weights): the same rewards,
    # and the skipping run trains on the rows of the groups whose rewards differ, not all of them.
    assert skipping[0]["reward"] == every[0]["reward"]
    assert all(0.0 < r["actor_rows"] <= 1.0 for r in skipping) and min(r["actor_rows"] for r in skipping) < 1.0
    # At step 1 the policy is the reference (no KL gradient) and uniform groups have zero advantage:
    # the same gradient sum, divided by the kept rows' tokens instead of all tokens, so larger.
    assert skipping[0]["grad_norm"] > every[0]["grad_norm"] * 1.01


@pytest.mark.parametrize("skip", [False, True])
def test_grpo_takes_the_old_logprobs_from_the_update_when_asked(tmp_path, skip):
    """With uniform groups skipped the reference also scores only the trained rows (the loss needs
    no more), so the KL metric is theirs."""
    common = ("trainer.max_steps=3", "optim.lr=3e-3", "optim.schedule=constant", f"reward.function={__name__}:first_character_below_m",
              "trainer.export_hf=false", f"ppo.skip_uniform_groups={str(skip).lower()}")
    recomputed = read_metrics(cli("grpo", tmp_path / "recompute", *common), "train")
    reused = read_metrics(cli("grpo", tmp_path / "reuse", *common, "ppo.recompute_old_logprobs=false"), "train")
    # The same responses from the same weights at every step: the recomputed old log-probs equal the
    # update's own to the forward's rounding (ratio 1 within ~1e-6 in fp32), and the reference's
    # log-probs of a row do not depend on the other rows scored with it, so each step's loss and
    # gradient agree far inside 1e-4; the clipped fraction is 0 in both.
    assert [r["reward"] for r in reused] == [r["reward"] for r in recomputed]
    for before, after in zip(recomputed, reused):
        for key in ("pg_loss", "grad_norm", "loss", "kl_loss"):
            assert after[key] == pytest.approx(before[key], rel=1e-4, abs=1e-6), key
    rows = [r["actor_rows"] for r in reused]
    assert min(rows) < 1.0 if skip else rows == [1.0] * 3  # with skip, a step whose reference scored a subset
    assert reused[0]["clipfrac"] == 0.0 and reused[0]["approx_kl"] == 0.0
    # The KL metric uses the engine's sampling log-probs: at step 1 the policy is the reference.
    assert abs(reused[0]["kl"]) < 1e-3
    # The engine is refitted after every update: its log-probs match the update's forward.
    assert all(r["engine_logprob_mismatch_mean"] < 1e-4 for r in reused)
    assert "engine_logprob_mismatch_max" not in reused[-1] and "engine_logprob_mismatch_max" in recomputed[-1]


@pytest.fixture(scope="module")
def gpt2_path(tmp_path_factory):
    """A tiny GPT-2 (a family the rollout engine does not serve) with its matrices drawn from
    N(0, 0.3^2): its 0.02 initialization gives near-uniform logits, too flat to learn from in a
    few steps."""
    path = tmp_path_factory.mktemp("gpt2") / "gpt2"
    tokenizer = build_tokenizer()
    spread(build_family_model("gpt2", tokenizer=tokenizer), seed=3).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_ppo_on_a_family_the_engine_does_not_serve_generates_with_transformers(tmp_path, gpt2_path):
    """The actor falls back to transformers' generate on the policy itself (`HFGenerator`): the
    sampled tokens' log-probs are the trainer's after every update (nothing to refit), a critic
    learns beside it, and the exports are GPT-2 models."""
    out = cli("ppo", tmp_path, f"model.path={gpt2_path}", "trainer.max_steps=3", "optim.lr=1e-3", "data.eval=builtin",
              "data.builtin_eval_size=8", "trainer.eval_every=2", f"reward.function={__name__}:first_character_below_m")
    records = read_metrics(out, "train")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert max(r["engine_logprob_mismatch_max"] for r in records) < 1e-4
    assert all(r["generated_tokens"] > 0 for r in records)
    actor = AutoModelForCausalLM.from_pretrained(out / "hf")
    start = AutoModelForCausalLM.from_pretrained(gpt2_path)
    assert actor.config.model_type == "gpt2"
    assert not torch.equal(actor.transformer.h[0].mlp.c_fc.weight, start.transformer.h[0].mlp.c_fc.weight)  # trained
    assert AutoModelForSequenceClassification.from_pretrained(out / "critic_hf").config.model_type == "gpt2"


def test_grpo_learns_through_the_transformers_fallback(tmp_path, gpt2_path):
    out = cli("grpo", tmp_path, f"model.path={gpt2_path}", "trainer.max_steps=15", "optim.lr=1e-2",
              "optim.schedule=constant", f"reward.function={__name__}:first_character_below_m", "trainer.export_hf=false")
    rewards = [r["reward"] for r in read_metrics(out, "train")]
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.2, rewards


@pytest.mark.parametrize(("overrides", "field"), [(["rollout.num_engines=2"], "rollout.num_engines"),
                                                    (["rollout.engine_dtype=bfloat16"], "rollout.engine_dtype"),
                                                    (["roles.backend=ray", "roles.placement=disaggregated"], "roles.placement")])
def test_the_transformers_fallback_refuses_engine_settings(tmp_path, gpt2_path, overrides, field, capsys):
    """Refused before any role starts, the message naming the setting."""
    assert main(["ppo", f"trainer.output_dir={tmp_path}", *SMALL, f"model.path={gpt2_path}", *overrides]) == 2
    err = capsys.readouterr().err
    assert f"{field}: the rollout engine does not serve 'gpt2' models" in err and "transformers' generate()" in err
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("mode", ["lora", "cpu_offload"])
def test_reference_modes(tmp_path, mode):
    lora = ["model.lora.enabled=true"] if mode == "lora" else []
    out = cli("ppo", tmp_path, "trainer.max_steps=2", f"roles.reference={mode}", "ppo.advantage=reinforce",
              "optim.lr=1e-2", f"reward.function={__name__}:first_character_below_m", *lora)
    records = read_metrics(out, "train")
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # step 1: the policy is the reference
    assert records[1]["kl"] != 0.0


def test_reward_model_scores_and_the_critic_starts_from_it(tmp_path):
    rm = tmp_path / "rm"
    assert main(["rm", f"trainer.output_dir={rm}", "data.train=builtin", "data.builtin_size=16", "trainer.max_steps=2",
                 "trainer.global_batch_size=8", "trainer.micro_batch_size=8", "trainer.progress_bar=false",
                 "trainer.tensorboard=false"]) == 0
    overrides = [o for o in SMALL if not o.startswith("reward.function")]
    assert main(["ppo", f"trainer.output_dir={tmp_path / 'ppo'}", *overrides, f"reward.model={rm / 'hf'}", "trainer.max_steps=1",
                 "trainer.export_hf=false"]) == 0
    record = read_metrics(tmp_path / "ppo", "train")[0]
    assert record["reward"] != 0.0 and "critic/vf_loss" in record


def test_bad_ppo_configs_stop_before_anything_runs(tmp_path, capsys):
    assert main(["ppo", f"trainer.output_dir={tmp_path}", "data.train=builtin"]) == 2
    assert "set exactly one of reward.function and reward.model" in capsys.readouterr().err
    assert main(["ppo", f"trainer.output_dir={tmp_path}", *SMALL, "ppo.advantage=grpo"]) == 2
    assert "rollout.samples_per_prompt: the grpo estimator needs at least 2" in capsys.readouterr().err
    assert main(["ppo", f"trainer.output_dir={tmp_path}", *SMALL, "roles.reference=lora"]) == 2
    assert "needs model.lora.enabled" in capsys.readouterr().err
    assert main(["grpo", f"trainer.output_dir={tmp_path}", *SMALL, "ppo.recompute_old_logprobs=false", "ppo.ppo_epochs=2"]) == 2
    assert "ppo.recompute_old_logprobs: false needs ppo.ppo_epochs 1" in capsys.readouterr().err


def test_ppo_killed_after_a_checkpoint_resumes_onto_the_same_curve(tmp_path):
    common = ("trainer.max_steps=4", "trainer.save_every=2", "trainer.export_hf=false", "optim.lr=1e-3", "ppo.ppo_epochs=2",
              "ppo.minibatch_size=4", "ppo.normalize_rewards=true", "ppo.kl_target=1.0")
    straight = cli("ppo", tmp_path / "straight", *common)
    died = died_after(cli("ppo", tmp_path / "died", *common), 2)
    cli("ppo", died, *common, "trainer.resume=true")
    keys = ("loss", "reward", "kl", "kl_coef", "critic/vf_loss", "response_length")
    resumed = [{k: r[k] for k in keys} for r in read_metrics(died, "train")]
    expected = [{k: r[k] for k in keys} for r in read_metrics(straight, "train")]
    assert resumed == expected


def test_ppo_resumed_with_more_steps_continues_the_learning_rate(tmp_path):
    """A 4-step cosine run checkpointed at 2 and resumed with max_steps=6: the actor's and the
    critic's lr at step 3 are the 4-step run's (a fresh 6-step schedule would be higher there),
    then decay on."""
    common = ("trainer.save_every=2", "trainer.export_hf=false", "optim.lr=1e-3", "critic_optim.lr=2e-3")
    straight = cli("ppo", tmp_path / "straight", "trainer.max_steps=4", *common)
    died = died_after(tmp_path / "died", 2, source=straight)
    cli("ppo", died, "trainer.max_steps=6", *common, "trainer.resume=true")
    before, after = read_metrics(straight, "train"), read_metrics(died, "train")
    assert [r["step"] for r in after] == [1, 2, 3, 4, 5, 6]
    for key, peak in (("lr", 1e-3), ("critic/lr", 2e-3)):
        lrs = [r[key] for r in after]
        assert lrs[:3] == [r[key] for r in before[:3]]
        assert all(later < earlier for earlier, later in zip(lrs[2:], lrs[3:]))
        assert peak * lr_multiplier(2, total_steps=6, cfg=OptimConfig(lr=peak)) > lrs[2] * 1.1  # the jump it avoids


def test_actor_refits_its_engine_in_place(tmp_path):
    config = load_config(PPOConfig, None, [f"trainer.output_dir={tmp_path}", *SMALL, "optim.lr=1e-2"])
    actor = ActorWorker(**actor_arguments(config), cache_dir=str(tmp_path), total_steps=2)
    addresses = actor.engine_buffer_addresses()
    prompts = [[1, 5, 6, 7], [1, 8, 9]]
    generation = actor.generate(prompts, seed=0)
    from stema.roles.experience import experience_tensors

    batch = experience_tensors(generation.rollouts, actor.pad_token_id())
    before = actor.engines[0].weights.buffers()["embed"].clone()
    advantages = torch.ones(batch["action_mask"].shape) * batch["action_mask"]
    actor.train(batch, advantages=advantages, old_logprobs=actor.logprobs(batch), ref_logprobs=None, kl_coef=0.0, step=0)
    assert actor.engine_buffer_addresses() == addresses
    assert not torch.equal(before, actor.engines[0].weights.buffers()["embed"])  # new weights, same buffers
    after = actor.generate(prompts, seed=0)
    trainer_logprobs = actor.logprobs(experience_tensors(after.rollouts, actor.pad_token_id()))
    engine = experience_tensors(after.rollouts, actor.pad_token_id())
    gap = (engine["engine_logprobs"] - trainer_logprobs)[engine["action_mask"]].abs().max()
    assert float(gap) < 1e-4
