"""FSDP2 data parallel: `torchrun --nproc_per_node 2` (gloo, CPU) runs of `stema sft`, `stema rm`,
`stema dpo` and `stema kto` equal the 1-process run with the same global batch, step by step; a checkpoint
taken at 2 processes resumes at 1 onto the same curve; the Hugging Face export gathered from the
shards equals the 1-process export. The same holds for LoRA SFT (adapters only trained and
checkpointed; the export merged or the adapter folder).

The loss alone cannot tell summed from averaged gradients (AdamW is scale-invariant), so the
pre-clipping gradient norm is compared too."""

import json
import shutil

import pytest
import torch
from distributed_launch import argv, assert_same_curve, curve, gloo_available, torchrun_cli

from stema.cli import main
from stema.data import builtin
from stema.training.logging import read_metrics

from run_folders import died_after

pytestmark = pytest.mark.skipif(not gloo_available, reason="torch.distributed with gloo is not available")


@pytest.fixture(scope="module")
def sft_runs(llama_path, tmp_path_factory):
    """The same SFT run in 1 process and in 2 (checkpoint at step 3, HF export)."""
    root = tmp_path_factory.mktemp("sft")
    assert main(argv("sft", root / "one", llama_path, "trainer.save_every=3")) == 0
    torchrun_cli(2, argv("sft", root / "two", llama_path, "trainer.save_every=3"))
    return root / "one", root / "two"


def test_fsdp_sft_two_processes_equal_one(sft_runs):
    one, two = sft_runs
    assert_same_curve(curve(two), curve(one))


def test_fsdp_checkpoint_from_two_processes_resumes_in_one_onto_the_same_curve(sft_runs, llama_path, tmp_path):
    one, two = sft_runs
    resumed = died_after(tmp_path / "resumed", 3, source=two)
    state = torch.load(resumed / "checkpoints" / "step-00000003" / "trainer_state.pt", weights_only=True)
    assert state["world_size"] == 2
    assert main(argv("sft", resumed, llama_path, "trainer.save_every=3", "trainer.resume=true")) == 0
    assert_same_curve(curve(resumed), curve(one))


def test_fsdp_hf_export_gathered_from_shards_equals_the_one_process_export(sft_runs):
    from transformers import AutoModelForCausalLM

    one, two = sft_runs
    single = AutoModelForCausalLM.from_pretrained(one / "hf").state_dict()
    gathered_model = AutoModelForCausalLM.from_pretrained(two / "hf")
    assert gathered_model.config.architectures == ["LlamaForCausalLM"]
    gathered = gathered_model.state_dict()
    assert gathered.keys() == single.keys()
    worst = max((gathered[name] - single[name]).abs().max().item() for name in single)
    assert worst < 1e-5


@pytest.mark.parametrize("command, extra", [("rm", ()), ("dpo", ("preference.beta=0.5",))], ids=["rm", "dpo"])
def test_fsdp_reward_model_and_dpo_two_processes_equal_one(llama_path, tmp_path, command, extra):
    assert main(argv(command, tmp_path / "one", llama_path, "trainer.export_hf=false", *extra)) == 0
    torchrun_cli(2, argv(command, tmp_path / "two", llama_path, "trainer.export_hf=false", *extra))
    assert_same_curve(curve(tmp_path / "two"), curve(tmp_path / "one"))


def test_fsdp_kto_two_processes_equal_one(llama_path, tmp_path):
    """KTO (unpaired: the built-in right answers desirable, the mistakes undesirable; its reference
    and its KL baseline batch sharded like the policy) in 2 processes equals 1."""
    rows = [
        {"prompt": pair["prompt"], "completion": pair[side], "label": side == "chosen"}
        for pair in builtin.preference_records(16, seed=1) for side in ("chosen", "rejected")
    ]
    data = tmp_path / "unpaired.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    extra = ("trainer.export_hf=false", f"data.train={data}")
    assert main(argv("kto", tmp_path / "one", llama_path, *extra)) == 0
    torchrun_cli(2, argv("kto", tmp_path / "two", llama_path, *extra))
    assert_same_curve(curve(tmp_path / "two"), curve(tmp_path / "one"))


@pytest.fixture(scope="module")
def lora_sft_runs(llama_path, tmp_path_factory):
    """The same LoRA SFT run (adapters on q/k/v/o, merged on export) in 1 process and in 2
    (checkpoint at step 3)."""
    root = tmp_path_factory.mktemp("lora_sft")
    extra = ("model.lora.enabled=true", "trainer.save_every=3")
    assert main(argv("sft", root / "one", llama_path, *extra)) == 0
    torchrun_cli(2, argv("sft", root / "two", llama_path, *extra))
    return root / "one", root / "two"


def merged_weights(folder, base=None):
    """The state dict of an exported model: a merged folder, or `base` with the adapters of an
    adapter folder merged in."""
    from transformers import AutoModelForCausalLM

    if base is None:
        return AutoModelForCausalLM.from_pretrained(folder).state_dict()
    from peft import PeftModel

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder).merge_and_unload().state_dict()


def assert_same_weights(gathered, single):
    assert gathered.keys() == single.keys()
    worst = max((gathered[name] - single[name]).abs().max().item() for name in single)
    print(f"largest weight difference {worst:.2e}")
    assert worst < 1e-5


def test_fsdp_lora_sft_two_processes_equal_one_and_export_the_same_merged_model(lora_sft_runs, llama_path):
    """Only the adapters train (the base stays as loaded: the merged export differs from it)."""
    one, two = lora_sft_runs
    assert_same_curve(curve(two), curve(one))
    single = merged_weights(one / "hf")
    assert_same_weights(merged_weights(two / "hf"), single)
    base = merged_weights(llama_path)
    assert max((single[name] - base[name]).abs().max().item() for name in base) > 1e-3


def test_fsdp_lora_checkpoint_resumes_in_two_processes_and_exports_the_adapters(lora_sft_runs, llama_path, tmp_path):
    """The adapters' DCP checkpoint at step 3 resumes onto the same curve; with
    model.lora.merge_on_export=false the gathered export is the adapter folder, which merged into
    the base equals the 1-process merged export."""
    one, two = lora_sft_runs
    resumed = tmp_path / "resumed"
    shutil.copytree(two / "checkpoints" / "step-00000003", resumed / "checkpoints" / "step-00000003")
    records = [r for r in read_metrics(two) if r["step"] <= 3]
    (resumed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    torchrun_cli(2, argv("sft", resumed, llama_path, "model.lora.enabled=true", "model.lora.merge_on_export=false",
                         "trainer.save_every=3", "trainer.resume=true"))
    assert_same_curve(curve(resumed), curve(one))
    assert (resumed / "hf" / "adapter_config.json").exists() and not (resumed / "hf" / "config.json").exists()
    assert_same_weights(merged_weights(resumed / "hf", base=llama_path), merged_weights(one / "hf"))
