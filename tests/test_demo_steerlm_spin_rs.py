"""`stema demo` stages steerlm and spin at tiny settings: their numbers in results.json and their
loss curves (the rs stage needs an SFT model that answers some questions right; its trainer is
tested in test_trainers_rejection.py)."""

import json

from stema.cli import main
from stema.demo import resolve_stages


def test_steerlm_and_spin_stages_record_their_numbers(tmp_path):
    argv = ["demo", "--out", str(tmp_path), "--stages", "spin,steerlm", "num_train=64", "num_heldout=8", "batch_size=8",
            "steerlm_attribute_steps=2", "steerlm_steps=2", "spin_iterations=2", "spin_steps=2", "progress_bar=false"]
    assert main(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results) == ["base", "steerlm", "spin"]
    steer = results["steerlm"]
    assert -1.0 <= steer["spearman"] <= 1.0 and len(steer["words_by_requested_verbosity"]) == 5
    assert 0.0 <= steer["steered_accuracy"] <= 1.0
    spin = results["spin"]
    assert len(spin["exact_match_by_iteration"]) == 3 and len(spin["gt_logprob_by_iteration"]) == 3
    assert spin["accuracy"] == spin["exact_match_by_iteration"][-1]
    for stage in ("steerlm", "spin"):
        assert (tmp_path / f"{stage}_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_all_includes_the_new_stages_in_order():
    stages = resolve_stages("all")
    assert [name for name in stages if name in ("steerlm", "spin", "rs")] == ["steerlm", "spin", "rs"]
    assert "steerlm" not in resolve_stages("default")
