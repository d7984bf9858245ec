"""Rejection sampling: best-of-n selection, and `stema rs` end to end through the CLI with a reward
function and with a reward model, on a very small tiny model."""

import json
import math

import pytest
import torch

from stema.cli import main
from stema.models.tiny import TinyModelSpec, save_tiny_model
from stema.trainers.rejection import best_of_n
from stema.training.logging import read_metrics

SMALL = [
    "data.train=builtin", "data.builtin_size=16", "data.eval=builtin", "data.builtin_eval_size=4", "data.max_length=48",
    "trainer.global_batch_size=4", "trainer.micro_batch_size=2", "trainer.max_steps=2",
    "trainer.progress_bar=false", "trainer.tensorboard=false", "sampling.max_new_tokens=24",
]


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    spec = TinyModelSpec(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny", spec)


def test_best_of_n_takes_the_first_best_finished_sample_above_the_threshold():
    rewards = torch.tensor([[0.1, 0.9, 0.9], [0.5, 2.0, 0.3], [0.2, 0.1, 0.0], [1.0, 1.0, 1.0]])
    finished = torch.tensor([[True, True, True], [True, False, True], [True, True, True], [False, False, False]])
    assert best_of_n(rewards, finished, min_reward=None) == [1, 0, 0, None]
    assert best_of_n(rewards, finished, min_reward=0.4) == [1, 0, None, None]


def reward_short(prompt, completion):
    """A test reward: shorter completions are better."""
    return -float(len(completion))


def test_rs_with_a_reward_function_trains_on_the_winners(tmp_path, small_model):
    out = tmp_path / "rs"
    assert main(["rs", f"model.path={small_model}", f"trainer.output_dir={out}", *SMALL, "rs.num_samples=8",
                 f"reward.function={__name__}:reward_short"]) == 0
    summary = json.loads((out / "rs_summary.json").read_text())
    assert summary["prompts"] == 16 and summary["samples_per_prompt"] == 8 and summary["steps"] == 2
    assert 4 <= summary["winners"] <= 16
    assert summary["mean_winner_reward"] >= summary["mean_sample_reward"]
    assert math.isfinite(summary["greedy_reward_before"]) and math.isfinite(summary["greedy_reward_after"])
    assert len(read_metrics(out, "train")) == 2 and (out / "hf" / "config.json").is_file()


def test_rs_with_a_reward_model_and_too_few_winners(tmp_path, small_model, capsys):
    rm = tmp_path / "rm"
    assert main(["rm", f"model.path={small_model}", f"trainer.output_dir={rm}", *SMALL[:5], *SMALL[5:10]]) == 0
    out = tmp_path / "rs"
    assert main(["rs", f"model.path={small_model}", f"trainer.output_dir={out}", *SMALL, f"reward.model={rm / 'hf'}",
                 "rs.num_samples=8"]) == 0
    assert json.loads((out / "rs_summary.json").read_text())["winners"] >= 4
    # The built-in exact-match reward with min_reward 1: an untrained model answers nothing right.
    with pytest.raises(ValueError, match="fewer than one global batch"):
        main(["rs", f"model.path={small_model}", f"trainer.output_dir={tmp_path / 'none'}", *SMALL, "rs.min_reward=1.0",
              "reward.function=builtin"])
