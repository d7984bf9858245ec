"""End to end through the CLI: `stema dpo` (DPO, cDPO, IPO, RPO, SimPO; full and LoRA; live and
precomputed reference) and `stema kto` on the built-in tiny model and on tiny models of the real
architecture families; exports that transformers loads; a killed run resumed onto the same curve."""

import json
import math

import pytest
from transformers import AutoModelForCausalLM

from stema.cli import main
from stema.data import builtin
from stema.models.families import save_family_model
from stema.training.logging import read_metrics

from run_folders import died_after

SMALL = [
    "data.builtin_size=32", "data.max_length=48",
    "trainer.global_batch_size=8", "trainer.micro_batch_size=4",
    "trainer.progress_bar=false", "trainer.tensorboard=false",
]
LOG_2 = math.log(2.0)


def cli(command, out, *overrides, train="builtin"):
    assert main([command, f"trainer.output_dir={out}", f"data.train={train}", *SMALL, *overrides]) == 0
    return out


def losses(out):
    return [record["loss"] for record in read_metrics(out, "train")]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def unpaired_data(tmp_path_factory):
    """KTO data from the built-in pairs: the right answer is desirable, the mistake undesirable."""
    rows = []
    for pair in builtin.preference_records(16, seed=1):
        rows.append({"prompt": pair["prompt"], "completion": pair["chosen"], "label": True})
        rows.append({"prompt": pair["prompt"], "completion": pair["rejected"], "label": False})
    return write_jsonl(tmp_path_factory.mktemp("kto") / "unpaired.jsonl", rows)


@pytest.fixture(scope="module")
def family_paths(tmp_path_factory):
    folder = tmp_path_factory.mktemp("families")
    return {family: save_family_model(folder / family, family) for family in ("llama", "qwen2", "mistral", "gpt2", "gemma", "phi3")}


def test_dpo_learns_the_preferences_and_exports_an_hf_folder(tmp_path):
    out = cli("dpo", tmp_path, "trainer.max_steps=8", "optim.lr=1e-3", "data.eval=builtin", "data.builtin_eval_size=8")
    records = read_metrics(out, "train")
    assert records[0]["loss"] == pytest.approx(LOG_2, abs=1e-6)  # policy == reference at the start
    assert records[0]["rewards/margin"] == 0.0
    assert records[-1]["loss"] < LOG_2 and records[-1]["rewards/margin"] > 0
    evaluation = read_metrics(out, "eval")[-1]
    for key in ("loss", "rewards/accuracy", "rewards/margin", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert math.isfinite(evaluation[key]), key
    model = AutoModelForCausalLM.from_pretrained(out / "hf")
    assert model.config.model_type == "llama"


def test_dpo_micro_batching_equals_the_full_batch(tmp_path):
    common = ("trainer.max_steps=3", "optim.lr=1e-3", "trainer.export_hf=false")
    a = losses(cli("dpo", tmp_path / "a", *common, "trainer.micro_batch_size=8"))
    b = losses(cli("dpo", tmp_path / "b", *common, "trainer.micro_batch_size=2"))
    assert b == pytest.approx(a, rel=1e-5)


def test_precomputed_reference_logprobs_give_the_live_reference_losses(tmp_path, capsys):
    common = ("trainer.max_steps=3", "optim.lr=1e-3", "trainer.export_hf=false", "data.eval=builtin", "data.builtin_eval_size=8")
    live = cli("dpo", tmp_path / "live", *common)
    precomputed = cli("dpo", tmp_path / "pre", *common, "preference.precompute_ref_logprobs=true")
    assert "reference model is freed" in capsys.readouterr().err
    assert losses(precomputed) == pytest.approx(losses(live), abs=1e-5)
    live_eval, pre_eval = read_metrics(live, "eval")[-1], read_metrics(precomputed, "eval")[-1]
    assert pre_eval["loss"] == pytest.approx(live_eval["loss"], abs=1e-5)
    assert pre_eval["rewards/margin"] == pytest.approx(live_eval["rewards/margin"], abs=1e-5)


def test_dpo_killed_after_a_checkpoint_resumes_onto_the_same_curve(tmp_path):
    common = ("trainer.max_steps=4", "trainer.save_every=2", "trainer.export_hf=false", "optim.lr=1e-3")
    straight = cli("dpo", tmp_path / "straight", *common)
    died = died_after(cli("dpo", tmp_path / "died", *common), 2)
    cli("dpo", died, *common, "trainer.resume=true")
    assert losses(died) == losses(straight)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gpt2", "gemma", "phi3"])
def test_dpo_on_every_architecture_family(tmp_path, family_paths, family):
    out = cli("dpo", tmp_path, f"model.path={family_paths[family]}", "trainer.max_steps=2", "trainer.export_hf=false")
    first, second = losses(out)
    assert first == pytest.approx(LOG_2, abs=1e-6) and math.isfinite(second)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize(
    "variant",
    [
        ["preference.loss=ipo", "preference.average_logprobs=true"],
        ["preference.loss=simpo", "preference.average_logprobs=true", "preference.beta=2.0"],
        ["preference.loss=dpo", "preference.label_smoothing=0.1", "preference.sft_loss_weight=0.5"],
        ["preference.loss=rpo_bwd_kl"],
    ],
    ids=["ipo", "simpo", "cdpo+sft", "rpo_bwd_kl"],
)
def test_preference_variants_take_steps(tmp_path, family_paths, family, variant):
    out = cli("dpo", tmp_path, f"model.path={family_paths[family]}", "trainer.max_steps=2", "trainer.export_hf=false", *variant)
    records = read_metrics(out, "train")
    assert len(records) == 2 and all(math.isfinite(r["loss"]) for r in records)
    if "preference.loss=ipo" in variant:  # D = 0 at the start: (0 - 1 / (2 beta))^2
        assert records[0]["loss"] == pytest.approx((1 / (2 * 0.1)) ** 2, rel=1e-6)
    if "preference.sft_loss_weight=0.5" in variant:
        assert records[0]["sft_nll"] > 0


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lora_dpo_uses_the_adapter_free_model_as_reference_and_exports_merged(tmp_path, family_paths, family):
    targets = "[c_attn]" if family == "gpt2" else "[q_proj,v_proj]"
    out = cli(
        "dpo", tmp_path, f"model.path={family_paths[family]}", "model.lora.enabled=true", "model.lora.r=4",
        f"model.lora.target_modules={targets}", "trainer.max_steps=3", "optim.lr=5e-3",
    )
    records = read_metrics(out, "train")
    assert records[0]["loss"] == pytest.approx(LOG_2, abs=1e-6)  # new adapters: policy == base == reference
    assert records[-1]["loss"] != pytest.approx(LOG_2, abs=1e-4)
    assert not (out / "hf" / "adapter_config.json").exists()
    assert AutoModelForCausalLM.from_pretrained(out / "hf").config.model_type == family


def test_rpo_uses_the_data_rewards_or_the_configured_defaults(tmp_path):
    # The built-in pairs carry chosen_reward 1 and rejected_reward 0: G = eta at D = 0.
    out = cli("dpo", tmp_path / "builtin", "preference.loss=rpo_sq", "preference.gt_reward_scale=2.0", "trainer.max_steps=1",
              "trainer.export_hf=false")
    assert losses(out)[0] == pytest.approx(4.0, rel=1e-6)
    rows = [{"prompt": f"What is {i}+1?", "chosen_response": str(i + 1), "rejected_response": str(i + 2)} for i in range(8)]
    nemo = write_jsonl(tmp_path / "nemo.jsonl", rows)
    out = cli("dpo", tmp_path / "nemo", "preference.loss=rpo_sq", "preference.default_chosen_reward=0.5",
              "preference.default_rejected_reward=-1.0", "trainer.max_steps=1", "trainer.export_hf=false", train=nemo)
    assert losses(out)[0] == pytest.approx(1.5**2, rel=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_kto_on_unpaired_data(tmp_path, family_paths, unpaired_data, family):
    out = cli("kto", tmp_path, f"model.path={family_paths[family]}", "trainer.max_steps=3", "optim.lr=5e-3",
              "kto.undesirable_weight=1.5", train=unpaired_data)
    records = read_metrics(out, "train")
    # Policy == reference at the start: r = 0, z0 = 0, each loss is w * (1 - sigmoid(0)) = w / 2.
    labels = [json.loads(line)["label"] for line in unpaired_data.read_text().splitlines()]
    assert 0.5 <= records[0]["loss"] <= 0.75 and records[0]["kl"] == 0.0
    assert all(math.isfinite(r["loss"]) for r in records) and records[-1]["kl"] >= 0.0
    assert any(labels) and not all(labels)
    assert AutoModelForCausalLM.from_pretrained(out / "hf").config.model_type == family


def test_lora_kto_runs(tmp_path, family_paths, unpaired_data):
    out = cli("kto", tmp_path, f"model.path={family_paths['qwen2']}", "model.lora.enabled=true", "model.lora.r=4",
              "trainer.max_steps=2", "trainer.export_hf=false", train=unpaired_data)
    assert read_metrics(out, "train")[0]["loss"] == pytest.approx(0.5, abs=1e-6)


def test_preference_config_errors_stop_before_training(tmp_path, capsys):
    argv = ["dpo", f"trainer.output_dir={tmp_path}", "data.train=builtin", "preference.loss=ipo", "preference.label_smoothing=0.1"]
    assert main(argv) == 2
    assert "label_smoothing applies to loss 'dpo' only" in capsys.readouterr().err
    argv = ["dpo", f"trainer.output_dir={tmp_path}", "data.train=builtin", "preference.loss=simpo", "preference.precompute_ref_logprobs=true"]
    assert main(argv) == 2
    assert not (tmp_path / "checkpoints").exists()
