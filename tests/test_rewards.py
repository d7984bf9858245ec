"""Reward sources: `module:function` reward functions and the reward-model scorer."""

import pytest
import torch

from stema.config import ConfigError, ModelConfig
from stema.data import builtin
from stema.models import families, loading
from stema.rewards import RewardModelScorer, load_reward_function, score_with_function


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
    with pytest.raises(ValueError, match="example 1 .*expected a finite number"):
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


def test_reward_model_scorer_refuses_a_multi_output_model(tmp_path):
    path = families.save_family_model(tmp_path / "llama", "llama")
    model, _ = loading.load_reward_model(ModelConfig(path=str(path)), num_labels=3, cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="exactly one output; this one has 3"):
        RewardModelScorer(model)
