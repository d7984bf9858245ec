"""`stema demo` end to end at shortened settings: results.json keyed by stage, the table, the PNG
curves, and thresholds that a stage which does not learn fails.

The shortened demo (the full SFT stage, 1000 steps on the 300 demonstrations, which takes the tiny
model off its loss plateau; then pairs sampled for 1024 training and 64 held-out prompts, 40
reward-model and DPO steps, 3 PPO steps) is too short to reach the full demo's held-out targets for
the later stages, so its thresholds check that each stage learns what it is shown (the values
measured on seed 0 in brackets; the test takes about 95 s of CPU time):
- SFT: held-out exact match above 50% and held-out loss per answer token below 0.6 (67.2%, 0.48;
  the model on its plateau is at 0% and about 1.2);
- sampled pairs: more than 10 training and 2 held-out pairs (166, 15), every chosen answer right and
  every rejected one wrong by the verifier;
- reward model: mean training loss of its last 10 steps below 0.67 (ln 2 = 0.69 is no preference)
  and mean margin above 0.1 (0.56, 0.62; 0.66 and 0.09 over its first 10 steps);
- DPO: over its last 10 steps the chosen answer's implicit reward beats the rejected one's on more
  than 75% of the training pairs, mean margin above 1 (0.94, 5.1; 0.65 over its first 10 steps);
- PPO: KL to the reference above 0.005 after 3 steps (0.10; 0 when the policy does not move).
"""

import json
import math

import pytest

from stema.cli import main
from stema.data import builtin
from stema.demo import resolve_stages
from stema.training.logging import read_metrics


def last_mean(folder, key: str, steps: int = 10) -> float:
    """The mean of training metric `key` over the stage's last `steps` steps."""
    values = [record[key] for record in read_metrics(folder, "train")][-steps:]
    return sum(values) / len(values)


def test_demo_writes_results_table_and_curves(tmp_path, capsys):
    argv = ["demo", "--out", str(tmp_path), "--stages", "sft,rm,dpo,ppo", "rm_steps=40", "dpo_steps=40", "ppo_steps=3",
            "num_train=1024", "num_heldout=64", "progress_bar=false"]
    assert main(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results) == ["base", "sft", "rm", "dpo", "ppo"]
    for stage in ("base", "sft", "dpo", "ppo"):
        assert 0.0 <= results[stage]["accuracy"] <= 1.0
        assert 0.0 <= results[stage]["preference_accuracy"] <= 1.0
    assert 0.0 <= results["rm"]["pairwise_accuracy"] <= 1.0
    assert 0.0 <= results["dpo"]["reward_accuracy"] <= 1.0
    for stage in ("sft", "rm", "dpo"):
        png = tmp_path / f"{stage}_loss.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (tmp_path / stage / "hf" / "config.json").is_file()
    for curve in ("reward", "kl", "accuracy"):
        assert (tmp_path / f"ppo_{curve}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert results["ppo"]["start"] == str(tmp_path / "sft" / "hf")
    assert results["sft"]["accuracy"] > 0.5 and results["sft"]["eval_loss"] < 0.6
    for split, least in (("train", 10), ("eval", 2)):
        pairs = [json.loads(line) for line in (tmp_path / "pairs" / f"{split}.jsonl").read_text().splitlines()]
        assert len(pairs) > least
        for pair in pairs:  # the verifier's labels: the chosen sample right, the rejected one wrong
            assert builtin.reward(pair["prompt"], pair["chosen"][0]["content"]) == 1.0
            assert builtin.reward(pair["prompt"], pair["rejected"][0]["content"]) == 0.0
    assert last_mean(tmp_path / "rm", "accuracy") > 0.75 and last_mean(tmp_path / "rm", "margin") > 1.0
    assert last_mean(tmp_path / "dpo", "rewards/accuracy") > 0.75 and last_mean(tmp_path / "dpo", "rewards/margin") > 1.0
    assert 0.005 < results["ppo"]["kl"] and math.isfinite(results["ppo"]["train_reward"])
    table = capsys.readouterr().out
    assert "preference accuracy" in table and "| dpo |" in table
    assert "| sft |" in table and "| rm |" in table and "| ppo |" in table and (tmp_path / "results.md").read_text().strip() == table.strip()


def test_stage_names_resolve_in_pipeline_order():
    assert resolve_stages("default") == ["sft", "rm", "dpo", "ppo"]
    assert resolve_stages("rm,sft") == ["sft", "rm"]
    assert resolve_stages("all")[:2] == ["sft", "rm"]
    with pytest.raises(ValueError, match=r"unknown demo stage\(s\) \['ppo2'\]"):
        resolve_stages("sft,ppo2")
