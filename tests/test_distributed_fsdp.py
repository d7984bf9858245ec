"""FSDP2 data parallel: `torchrun --nproc_per_node 2` (gloo, CPU) runs of `stema sft`, `stema rm`
and `stema dpo` equal the 1-process run with the same global batch, step by step; a checkpoint
taken at 2 processes resumes at 1 onto the same curve; the Hugging Face export gathered from the
shards equals the 1-process export.

The loss alone cannot tell summed from averaged gradients (AdamW is scale-invariant), so the
pre-clipping gradient norm is compared too."""

import json
import shutil

import pytest
import torch
from distributed_launch import gloo_available, torchrun_cli

from stema.cli import main
from stema.models.families import save_family_model
from stema.training.checkpoint import list_checkpoints
from stema.training.logging import read_metrics

pytestmark = pytest.mark.skipif(not gloo_available, reason="torch.distributed with gloo is not available")

STEPS = 5
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_family_model(tmp_path_factory.mktemp("model") / "llama", "llama")


def argv(command, out, model, *extra):
    return [
        command, f"trainer.output_dir={out}", f"model.path={model}", "data.train=builtin", "data.builtin_size=32",
        "data.max_length=48", "trainer.global_batch_size=8", "trainer.micro_batch_size=2", f"trainer.max_steps={STEPS}",
        "trainer.progress_bar=false", "trainer.tensorboard=false", "optim.lr=3e-3", "distributed.timeout_s=60", *extra,
    ]


def curve(out):
    """(loss, grad_norm) of each train step."""
    return [(record["loss"], record["grad_norm"]) for record in read_metrics(out, "train")]


def assert_same_curve(two, one):
    assert len(two) == len(one) == STEPS
    for step, ((loss_2, norm_2), (loss_1, norm_1)) in enumerate(zip(two, one), start=1):
        assert abs(loss_2 - loss_1) <= TOLERANCE, f"step {step}: loss {loss_2} (2 processes) vs {loss_1} (1 process)"
        assert abs(norm_2 - norm_1) <= TOLERANCE * max(1.0, norm_1), f"step {step}: grad_norm {norm_2} vs {norm_1}"


@pytest.fixture(scope="module")
def sft_runs(llama, tmp_path_factory):
    """The same SFT run in 1 process and in 2 (checkpoint at step 3, HF export)."""
    root = tmp_path_factory.mktemp("sft")
    assert main(argv("sft", root / "one", llama, "trainer.save_every=3")) == 0
    torchrun_cli(2, argv("sft", root / "two", llama, "trainer.save_every=3"))
    return root / "one", root / "two"


def test_fsdp_sft_two_processes_equal_one(sft_runs):
    one, two = sft_runs
    assert_same_curve(curve(two), curve(one))


def test_fsdp_checkpoint_from_two_processes_resumes_in_one_onto_the_same_curve(sft_runs, llama, tmp_path):
    one, two = sft_runs
    resumed = tmp_path / "resumed"
    shutil.copytree(two / "checkpoints", resumed / "checkpoints")
    for step, folder in list_checkpoints(resumed / "checkpoints"):
        if step > 3:
            shutil.rmtree(folder)
    state = torch.load(resumed / "checkpoints" / "step-00000003" / "trainer_state.pt", weights_only=False)
    assert state["world_size"] == 2
    records = [r for r in read_metrics(two) if r["step"] <= 3]
    (resumed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(argv("sft", resumed, llama, "trainer.save_every=3", "trainer.resume=true")) == 0
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
def test_fsdp_reward_model_and_dpo_two_processes_equal_one(llama, tmp_path, command, extra):
    assert main(argv(command, tmp_path / "one", llama, "trainer.export_hf=false", *extra)) == 0
    torchrun_cli(2, argv(command, tmp_path / "two", llama, "trainer.export_hf=false", *extra))
    assert_same_curve(curve(tmp_path / "two"), curve(tmp_path / "one"))
