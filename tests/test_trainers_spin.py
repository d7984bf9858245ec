"""SPIN: pairs from ground truth and generations, and `stema spin` end to end through the CLI on
a very small tiny model (iterations, per-iteration folders, the summary, the export)."""

import json
import math

import pytest

from stema.cli import main
from stema.data import TokenizedSFT
from stema.models.tiny import TinyModelSpec, save_tiny_model
from stema.trainers.spin import spin_pairs
from stema.training.logging import read_metrics

SMALL = [
    "data.train=builtin", "data.builtin_size=16", "data.eval=builtin", "data.builtin_eval_size=8", "data.max_length=48",
    "trainer.global_batch_size=4", "trainer.micro_batch_size=2", "trainer.max_steps=2",
    "trainer.progress_bar=false", "trainer.tensorboard=false", "sampling.max_new_tokens=6", "optim.lr=1e-3",
]


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    spec = TinyModelSpec(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny", spec)


def test_pairs_take_the_ground_truth_as_chosen_and_skip_identical_generations():
    examples = [
        TokenizedSFT([1, 5, 6, 7, 2], [-100, -100, 6, 7, 2]),
        TokenizedSFT([1, 5, 8, 2], [-100, -100, 8, 2]),
    ]
    pairs = spin_pairs(examples, [[9, 2], [8, 2]])
    assert len(pairs) == 1
    pair = pairs[0]
    assert pair.prompt_ids == [1, 5]
    assert pair.chosen_ids == [1, 5, 6, 7, 2] and pair.chosen_labels == [-100, -100, 6, 7, 2]
    assert pair.rejected_ids == [1, 5, 9, 2] and pair.rejected_labels == [-100, -100, 9, 2]


def test_spin_iterates_with_the_previous_iteration_as_reference(tmp_path, small_model):
    out = tmp_path / "spin"
    assert main(["spin", f"model.path={small_model}", f"trainer.output_dir={out}", *SMALL, "spin.iterations=2"]) == 0
    history = json.loads((out / "spin_summary.json").read_text())["iterations"]
    assert [entry["iteration"] for entry in history] == [0, 1, 2]
    for entry in history:
        assert math.isfinite(entry["gt_logprob"]) and entry["gt_logprob"] < 0 and 0.0 <= entry["exact_match"] <= 1.0
    assert history[2]["gt_logprob"] != history[1]["gt_logprob"] != history[0]["gt_logprob"]
    for iteration in (1, 2):
        records = read_metrics(out / f"iteration_{iteration}", "train")
        assert len(records) == 2
        # Each iteration starts with the policy equal to its reference: the DPO loss is log 2 and the
        # margin 0 (plus the NLL term, which is 0 by default).
        assert records[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-5)
    combined = read_metrics(out, "train")
    assert [(r["iteration"], r["step"]) for r in combined] == [(1, 1), (1, 2), (2, 3), (2, 4)]
    assert (out / "hf" / "config.json").is_file() and not (out / "iteration_1" / "hf").exists()


def test_spin_resumed_after_an_iteration_ends_where_an_uninterrupted_run_ends(tmp_path, small_model, capsys):
    """A run stopped after iteration 1 (here: a run of 1 iteration) and started again with
    trainer.resume continues from iteration 1's last checkpoint: the same held-out numbers, the
    same metrics and the same final weights as a run that never stopped."""
    from safetensors.torch import load_file

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert main(["spin", f"model.path={small_model}", f"trainer.output_dir={whole}", *SMALL, "spin.iterations=2"]) == 0
    assert main(["spin", f"model.path={small_model}", f"trainer.output_dir={resumed}", *SMALL, "spin.iterations=1"]) == 0
    capsys.readouterr()
    assert main(["spin", f"model.path={small_model}", f"trainer.output_dir={resumed}", *SMALL, "spin.iterations=2",
                 "trainer.resume=true"]) == 0
    assert "iteration 1: resumed from its checkpoint at step 2" in capsys.readouterr().err  # not trained again
    summary = lambda out: json.loads((out / "spin_summary.json").read_text())["iterations"]
    assert summary(resumed) == summary(whole)
    strip = lambda records: [{k: v for k, v in r.items() if k not in ("time", "tokens_per_s", "step_s")} for r in records]
    assert strip(read_metrics(resumed, "train")) == strip(read_metrics(whole, "train"))
    final_whole, final_resumed = load_file(whole / "hf" / "model.safetensors"), load_file(resumed / "hf" / "model.safetensors")
    assert all(final_whole[name].equal(final_resumed[name]) for name in final_whole)
