"""`stema demo` end to end at shortened settings: results.json keyed by stage, the table, the PNG
curves, and thresholds that a stage which does not learn fails.

The shortened demo (40 steps a stage on 64 training questions, about 25 s of CPU time) is far too
short to reach the full demo's held-out targets, so its thresholds check that each stage learns
what it is shown, with the numbers measured on seeds 0 and 1 (the margin to each bound in brackets):
- SFT: held-out loss per answer token below 2.5 (1.76, 1.79; the untrained model's is about
  ln(vocabulary) = 4.6);
- reward model: mean training loss of its last 10 steps below 0.62 (0.50, 0.24; ln 2 = 0.69 is
  no preference) and mean margin above 0.5 (1.03, 3.87; 0.06-0.08 over its first 10 steps);
- DPO: over its last 10 steps the chosen answer's implicit reward beats the rejected one's on more
  than 80% of the training pairs (0.96, 0.93; 0.60-0.65 over its first 10 steps), mean margin above 1
  (2.19, 2.61);
- PPO: KL to the reference above 0.005 after 3 steps (0.035, 0.071; 0 when the policy does not move).
"""

import json
import math

import pytest

from stema.cli import main
from stema.demo import resolve_stages
from stema.training.logging import read_metrics


def last_mean(folder, key: str, steps: int = 10) -> float:
    """The mean of training metric `key` over the stage's last `steps` steps."""
    values = [record[key] for record in read_metrics(folder, "train")][-steps:]
    return sum(values) / len(values)


def test_demo_writes_results_table_and_curves(tmp_path, capsys):
    argv = ["demo", "--out", str(tmp_path), "--stages", "sft,rm,dpo,ppo", "sft_steps=40", "rm_steps=40", "dpo_steps=40", "ppo_steps=3",
            "num_train=64", "num_heldout=32", "batch_size=16", "progress_bar=false"]
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
    assert results["sft"]["eval_loss"] < 2.5
    assert last_mean(tmp_path / "rm", "loss") < 0.62 and last_mean(tmp_path / "rm", "margin") > 0.5
    assert last_mean(tmp_path / "dpo", "rewards/accuracy") > 0.8 and last_mean(tmp_path / "dpo", "rewards/margin") > 1.0
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
