"""FSDP2 data parallel for the commands that sample from their policy: `torchrun --nproc_per_node 2`
(gloo, CPU) runs of `stema rs` and `stema spin` equal the 1-process runs.

Each rank samples its blocks of prompts with its own engine (a block seeded by its first index,
so the samples do not depend on the world size), the ranks gather the results, and the training
runs on the shared data-parallel loop. So the samples, rewards and winners must be identical, and
each step's loss and gradient norm equal within 1e-5 (distributed_launch.assert_same_curve)."""

import json

import pytest
from distributed_launch import argv, assert_same_curve, curve, gloo_available, torchrun_cli

from stema.cli import main
from stema.distributed import World
from stema.distributed.blocks import spread_blocks

pytestmark = pytest.mark.skipif(not gloo_available, reason="torch.distributed with gloo is not available")

# 32 training prompts (builtin_size in argv) and 8 held-out ones, generated in blocks of 8.
SAMPLING = ("data.eval=builtin", "data.builtin_eval_size=8", "sampling.batch_size=8")


@pytest.fixture(scope="module")
def reward_model(llama_path, tmp_path_factory):
    """A one-output reward model (`stema rm`, 2 steps): rewards that differ between samples."""
    out = tmp_path_factory.mktemp("rm")
    assert main(argv("rm", out, llama_path, "trainer.max_steps=2")) == 0
    return out / "hf"


def test_distributed_blocks_in_one_process_run_every_block_with_its_first_index_in_order():
    calls = []

    def work(first, block):
        calls.append((first, list(block)))
        return [f"{first}:{item}" for item in block]

    assert spread_blocks(World(role="test"), list("abcdefg"), block_size=3, work=work) == [
        "0:a", "0:b", "0:c", "3:d", "3:e", "3:f", "6:g"]
    assert calls == [(0, ["a", "b", "c"]), (3, ["d", "e", "f"]), (6, ["g"])]
    with pytest.raises(ValueError, match="2 results for a block of 3"):
        spread_blocks(World(role="test"), list("abc"), block_size=3, work=lambda first, block: block[:2])


def test_fsdp_rejection_sampling_two_processes_equal_one(llama_path, reward_model, tmp_path):
    extra = (*SAMPLING, "rs.num_samples=4", "sampling.max_new_tokens=12", f"reward.model={reward_model}",
             "trainer.export_hf=false")
    assert main(argv("rs", tmp_path / "one", llama_path, *extra)) == 0
    torchrun_cli(2, argv("rs", tmp_path / "two", llama_path, *extra))

    samples = {run: [json.loads(line) for line in (tmp_path / run / "rs_samples.jsonl").read_text().splitlines()]
               for run in ("one", "two")}
    assert len(samples["one"]) == 32 * 4
    assert len({row["reward"] for row in samples["one"]}) > 32  # the reward model tells the samples apart
    # The same responses and winners; rewards to rounding (torchrun's processes run 1 thread, the
    # test process may run more, and the reward model's sums then round differently).
    rewards = {run: [row.pop("reward") for row in samples[run]] for run in ("one", "two")}
    assert samples["two"] == samples["one"]
    assert rewards["two"] == pytest.approx(rewards["one"], rel=1e-5, abs=1e-6)
    summary = {run: json.loads((tmp_path / run / "rs_summary.json").read_text()) for run in ("one", "two")}
    after = {run: summary[run].pop("greedy_reward_after") for run in ("one", "two")}
    assert summary["two"] == pytest.approx(summary["one"], rel=1e-5, abs=1e-6) and summary["one"]["winners"] >= 8
    assert after["two"] == pytest.approx(after["one"], abs=1e-5)  # greedy answers of the trained (gathered) weights
    assert_same_curve(curve(tmp_path / "two"), curve(tmp_path / "one"))


def test_fsdp_spin_two_processes_equal_one(llama_path, tmp_path):
    from safetensors.torch import load_file

    extra = (*SAMPLING, "spin.iterations=2", "sampling.max_new_tokens=8", "preference.beta=0.5")
    assert main(argv("spin", tmp_path / "one", llama_path, *extra)) == 0
    torchrun_cli(2, argv("spin", tmp_path / "two", llama_path, *extra))

    history = {run: json.loads((tmp_path / run / "spin_summary.json").read_text())["iterations"] for run in ("one", "two")}
    assert [entry["iteration"] for entry in history["two"]] == [0, 1, 2]
    for one, two in zip(history["one"], history["two"]):
        assert two.get("pairs") == one.get("pairs") and two["exact_match"] == one["exact_match"]
        assert two["gt_logprob"] == pytest.approx(one["gt_logprob"], abs=1e-4)
    for iteration in (1, 2):  # iteration 2 samples from the trained weights gathered out of the shards
        assert_same_curve(curve(tmp_path / "two" / f"iteration_{iteration}"), curve(tmp_path / "one" / f"iteration_{iteration}"))
    single, gathered = (load_file(tmp_path / run / "hf" / "model.safetensors") for run in ("one", "two"))
    assert gathered.keys() == single.keys()
    # 10 AdamW steps at lr 3e-3 from gradients equal to rounding: measured 5e-6.
    assert max((gathered[name] - single[name]).abs().max().item() for name in single) < 5e-5
