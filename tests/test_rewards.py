"""Reward sources: `module:function` reward functions and the reward-model scorer; a reward
function that fails stops a run with one line, the last checkpoint intact."""

import re
import sys

import numpy as np
import pytest
import torch

from stema.cli import main
from stema.config import ConfigError, ModelConfig
from stema.data import builtin
from stema.models import families, loading
from stema.rewards import RewardFunctionError, RewardModelScorer, load_reward_function, score_with_function
from stema.training import checkpoint
from stema.training.logging import read_metrics


def length_reward(prompt, completion):
    return float(len(completion))


def test_builtin_name_and_module_function_spec_load_the_named_functions():
    assert load_reward_function("builtin") is builtin.reward
    assert load_reward_function("stema.data.builtin:reward") is builtin.reward
    assert load_reward_function(f"{__name__}:length_reward") is length_reward


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("no_colon", "expected 'module:function'"),
        ("stema_no_such_module:f", "cannot import module 'stema_no_such_module'"),
        ("stema.data.builtin:no_such_function", "has no attribute 'no_such_function'"),
        ("stema.data.builtin:MAX_OPERAND", "is not callable"),
    ],
)
def test_bad_specs_are_config_errors_naming_the_field(spec, match):
    with pytest.raises(ConfigError, match=rf"reward\.function: .*{match}"):
        load_reward_function(spec)


def test_score_with_function_scores_each_pair_and_rejects_non_numbers():
    prompts = [[{"role": "user", "content": "20+30"}]] * 3  # 2+3, written least-significant digit first
    rewards = score_with_function(builtin.reward, prompts, ["500", " 500 ", "600"])
    assert rewards.dtype == torch.float32
    assert rewards.tolist() == [1.0, 1.0, 0.0]
    with pytest.raises(RewardFunctionError, match="prompt 1, .*expected a finite number"):
        score_with_function(lambda p, c: float("nan") if c == "x" else 0.0, ["a", "b"], ["y", "x"])
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        score_with_function(length_reward, ["a", "b"], ["y"])


def test_reward_model_scorer_equals_the_classifier_on_each_sequence_alone(tmp_path):
    path = families.save_family_model(tmp_path / "llama", "llama")
    model, tokenizer = loading.load_reward_model(ModelConfig(path=str(path)), num_labels=1, cache_dir=tmp_path)
    prompts = [tokenizer("12+30=").input_ids, tokenizer("7*6=").input_ids, tokenizer("1").input_ids]
    responses = [tokenizer("42").input_ids, [], tokenizer("+2=3 and more").input_ids]
    scores = RewardModelScorer(model, micro_batch_size=2).score(prompts, responses)
    assert scores.shape == (3,)
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([p + r])).logits[0, 0] for p, r in zip(prompts, responses)]
    torch.testing.assert_close(scores, torch.stack(alone), rtol=0, atol=1e-5)


def test_a_causal_lm_given_as_reward_model_is_refused_before_it_scores_noise(tmp_path):
    from stema.config import RewardSourceConfig
    from stema.rewards import Reward

    path = loading.resolve_model_path(ModelConfig(path="tiny"), cache_dir=tmp_path)  # the built-in causal LM
    with pytest.raises(ConfigError, match=r"reward.model: .* LlamaForCausalLM with no trained reward head"):
        Reward.from_config(RewardSourceConfig(model=str(path)), dtype="float32", device=torch.device("cpu"), cache_dir=tmp_path)


def test_reward_model_scorer_refuses_a_multi_output_model(tmp_path):
    path = families.save_family_model(tmp_path / "llama", "llama")
    model, _ = loading.load_reward_model(ModelConfig(path=str(path)), num_labels=3, cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="reward.model: a reward model needs exactly one output; this one has 3"):
        RewardModelScorer(model)


def raises_on_b(prompt, completion):
    if completion == "b":
        raise ZeroDivisionError("division by zero\nsecond line")
    return 0.0


@pytest.mark.parametrize(("value", "shown"), [
    (float("nan"), "nan (float)"), (float("inf"), "inf (float)"), ("1.0", "'1.0' (str)"), (None, "None (NoneType)"),
    (True, "True (bool)"), (torch.tensor([1.0]), "tensor([1.]) (Tensor)"),
])
def test_a_bad_reward_value_is_one_line_naming_function_prompt_and_value(value, shown):
    def bad_on_b(prompt, completion):
        return value if completion == "b" else 0.0

    with pytest.raises(RewardFunctionError) as caught:
        score_with_function(bad_on_b, ["p0", "p1"], ["a", "b"], name="mod:bad_on_b", locations=["d.jsonl:1", "d.jsonl:2"])
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"reward function mod:bad_on_b returned {shown} for prompt 1 (d.jsonl:2)"), message


def test_a_raising_reward_function_is_one_line_naming_the_error():
    with pytest.raises(RewardFunctionError, match=r"^reward function raises_on_b raised ZeroDivisionError: division by zero "
                                                  r"second line on prompt 1, completion 'b'$"):
        score_with_function(raises_on_b, ["p0", "p1"], ["a", "b"])


def test_numpy_scalars_and_zero_dim_tensors_are_numbers():
    values = iter([np.float32(0.5), np.int64(2), torch.tensor(1.5), np.array(3.0), 4])
    rewards = score_with_function(lambda p, c: next(values), ["p"] * 5, ["c"] * 5)
    assert rewards.tolist() == [0.5, 2.0, 1.5, 3.0, 4.0]


def takes_one(completion):
    return 0.0


def takes_three(prompt, completion, extra):
    return 0.0


def takes_defaults(prompt, completion, scale=1.0, **options):
    return scale


def test_reward_functions_of_the_wrong_arity_are_refused_when_loaded():
    with pytest.raises(ConfigError, match=r"reward\.function: .*takes_one\(completion\) cannot be called as f\(prompt, completion\)"):
        load_reward_function(f"{__name__}:takes_one")
    with pytest.raises(ConfigError, match="takes_three"):
        load_reward_function(f"{__name__}:takes_three")
    assert load_reward_function(f"{__name__}:takes_defaults") is takes_defaults


def test_a_rewards_module_in_the_current_folder_is_found_without_pythonpath(tmp_path, monkeypatch):
    (tmp_path / "stema_test_cwd_rewards.py").write_text("def score(prompt, completion):\n    return len(completion)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [entry for entry in sys.path if entry not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "stema_test_cwd_rewards", raising=False)
    function = load_reward_function("stema_test_cwd_rewards:score")
    assert function("p", "abc") == 3 and str(tmp_path) in sys.path


PPO = ["data.train=builtin", "data.builtin_size=16", "data.max_length=32", "rollout.max_new_tokens=4", "trainer.global_batch_size=4",
       "trainer.micro_batch_size=4", "ppo.advantage=reinforce", "trainer.progress_bar=false", "trainer.tensorboard=false",
       "trainer.export_hf=false", "trainer.save_every=1", "trainer.max_steps=3"]
CALLS = {"count": 0, "fail_after": None}


def nan_after_some_calls(prompt, completion):
    """0.5, until `CALLS["fail_after"]` calls have been made; then NaN."""
    CALLS["count"] += 1
    limit = CALLS["fail_after"]
    return float("nan") if limit is not None and CALLS["count"] > limit else 0.5


def test_a_reward_function_failing_mid_run_stops_with_one_line_and_the_checkpoint_resumes(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setitem(CALLS, "fail_after", 4 + 2)  # step 1 scores 4 responses; step 2 fails at its third
    argv = ["ppo", f"trainer.output_dir={out}", *PPO, f"reward.function={__name__}:nan_after_some_calls"]
    assert main(argv) == 2
    error = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[stema ppo]")]  # the run's log lines
    assert error[-1].startswith("stema ppo: ") and not any("Traceback" in line for line in error), error
    error = error[-1:]
    assert re.fullmatch(rf"stema ppo: reward function {__name__}:nan_after_some_calls returned nan \(float\) for prompt 2 "
                        r"\(.+?\), completion .*; expected a finite number", error[0]), error[0]
    step, state = checkpoint.load_latest_checkpoint(out / "checkpoints")
    assert step == 1 and state["sampler"] is not None
    monkeypatch.setitem(CALLS, "fail_after", None)
    assert main([*argv, "trainer.resume=true"]) == 0
    assert [record["step"] for record in read_metrics(out, "train")][-2:] == [2, 3]


def test_a_bad_reward_function_is_found_before_anything_loads(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["ppo", f"trainer.output_dir={out}", *PPO, "reward.function=stema_no_such_module:f"]) == 2
    assert capsys.readouterr().err.startswith("stema ppo: reward.function: cannot import module 'stema_no_such_module'")
    assert main(["rs", f"trainer.output_dir={out}", "data.train=builtin", f"reward.function={__name__}:takes_one"]) == 2
    assert "reward.function: " in capsys.readouterr().err
    assert not out.exists()
