"""`stema demo` end to end at tiny settings: results.json keyed by stage, the table, loss PNGs."""

import json

import pytest

from stema.cli import main
from stema.demo import resolve_stages


def test_demo_writes_results_table_and_curves(tmp_path, capsys):
    argv = ["demo", "--out", str(tmp_path), "--stages", "sft,rm,dpo,ppo", "sft_steps=6", "rm_steps=4", "dpo_steps=3", "ppo_steps=2",
            "num_train=64", "num_heldout=16", "batch_size=8", "progress_bar=false"]
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
    assert results["ppo"]["kl"] >= 0.0 and results["ppo"]["start"] == str(tmp_path / "sft" / "hf")
    table = capsys.readouterr().out
    assert "preference accuracy" in table and "| dpo |" in table
    assert "| sft |" in table and "| rm |" in table and "| ppo |" in table and (tmp_path / "results.md").read_text().strip() == table.strip()


def test_stage_names_resolve_in_pipeline_order():
    assert resolve_stages("default") == ["sft", "rm", "dpo", "ppo"]
    assert resolve_stages("rm,sft") == ["sft", "rm"]
    assert resolve_stages("all")[:2] == ["sft", "rm"]
    with pytest.raises(ValueError, match=r"unknown demo stage\(s\) \['ppo2'\]"):
        resolve_stages("sft,ppo2")
