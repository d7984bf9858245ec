"""End to end: `stema sft` and `stema rm` on the built-in tiny model and task, and on tiny random
models of real architecture families, through the CLI; exports that transformers loads as they are;
a killed run resumed onto the same loss curve."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from stema.cli import main
from stema.config import SFTConfig, load_config
from stema.models.families import save_family_model
from stema.training.logging import read_metrics

from run_folders import died_after

SMALL = [
    "data.train=builtin", "data.builtin_size=64", "data.max_length=48",
    "trainer.global_batch_size=8", "trainer.micro_batch_size=4",
    "trainer.progress_bar=false", "trainer.tensorboard=false",
]


def cli(command, tmp_path, *overrides):
    argv = [command, f"trainer.output_dir={tmp_path}", *SMALL, *overrides]
    assert main(argv) == 0
    return tmp_path


def test_sft_on_the_builtin_task_learns_and_exports_an_hf_folder(tmp_path):
    out = cli("sft", tmp_path, "trainer.max_steps=12", "optim.lr=3e-3", "data.eval=builtin", "data.builtin_eval_size=16")
    losses = [record["loss"] for record in read_metrics(out, "train")]
    assert len(losses) == 12 and losses[-1] < losses[0] * 0.7
    evaluation = read_metrics(out, "eval")[-1]
    assert evaluation["perplexity"] > 1.0 and evaluation["tokens"] > 0
    model = AutoModelForCausalLM.from_pretrained(out / "hf")
    tokenizer = AutoTokenizer.from_pretrained(out / "hf")
    assert model.config.model_type == "llama" and tokenizer.eos_token == "<|end|>"
    saved = load_config(SFTConfig, out / "config.yaml")
    assert saved.trainer.max_steps == 12 and saved.data.train == "builtin"


def test_sft_micro_batching_equals_the_full_batch(tmp_path):
    cli("sft", tmp_path / "a", "trainer.max_steps=3", "trainer.micro_batch_size=8", "trainer.export_hf=false")
    cli("sft", tmp_path / "b", "trainer.max_steps=3", "trainer.micro_batch_size=2", "trainer.export_hf=false")
    a = [r["loss"] for r in read_metrics(tmp_path / "a", "train")]
    b = [r["loss"] for r in read_metrics(tmp_path / "b", "train")]
    assert b == pytest.approx(a, rel=1e-5)


def test_sft_killed_after_a_checkpoint_resumes_onto_the_same_curve(tmp_path):
    common = ("trainer.max_steps=6", "trainer.save_every=3", "trainer.export_hf=false")
    straight = cli("sft", tmp_path / "straight", *common)
    # A run that died after its step-3 checkpoint: the same run with what came later removed.
    died = died_after(cli("sft", tmp_path / "died", *common), 3)
    cli("sft", died, *common, "trainer.resume=true")
    assert [r["loss"] for r in read_metrics(died, "train")] == [r["loss"] for r in read_metrics(straight, "train")]


def test_sft_packing_runs_and_counts_every_example(tmp_path):
    out = cli("sft", tmp_path, "trainer.max_steps=2", "data.packing=true", "trainer.export_hf=false")
    assert len(read_metrics(out, "train")) == 2


def test_pairwise_reward_model_trains_and_exports_for_sequence_classification(tmp_path):
    out = cli("rm", tmp_path, "trainer.max_steps=8", "optim.lr=2e-3", "data.eval=builtin", "data.builtin_eval_size=16")
    evaluation = read_metrics(out, "eval")[-1]
    assert 0.0 <= evaluation["accuracy"] <= 1.0 and "margin" in evaluation
    model = AutoModelForSequenceClassification.from_pretrained(out / "hf")
    tokenizer = AutoTokenizer.from_pretrained(out / "hf")
    assert model.config.num_labels == 1
    batch = tokenizer(["<s><|user|>What is 1+1?<|end|><|assistant|>2<|end|>"], return_tensors="pt")
    assert torch.isfinite(model(**batch).logits).all()


def test_log_ratio_reward_model_exports_its_reference_and_scores_as_the_log_ratio(tmp_path):
    from stema.config import RewardSourceConfig
    from stema.rewards import Reward

    out = cli("rm", tmp_path / "rm", "trainer.max_steps=8", "optim.lr=2e-3", "data.eval=builtin", "data.builtin_eval_size=16",
              "reward.readout=log_ratio", "reward.beta=0.5", "reward.nll_weight=1.0")
    evaluation = read_metrics(out, "eval")[-1]
    assert 0.0 <= evaluation["accuracy"] <= 1.0 and "margin" in evaluation and "sft_nll" in evaluation
    assert json.loads((out / "hf" / "stema_reward.json").read_text()) == {"readout": "log_ratio", "beta": 0.5, "reference": "reference"}
    policy = AutoModelForCausalLM.from_pretrained(out / "hf")
    reference = AutoModelForCausalLM.from_pretrained(out / "hf" / "reference")
    tokenizer = AutoTokenizer.from_pretrained(out / "hf")
    prompts = [tokenizer("<s><|user|>73+84<|end|><|assistant|>")["input_ids"], tokenizer("<s><|user|>25+84<|end|><|assistant|>")["input_ids"]]
    responses = [tokenizer("580<|end|>")["input_ids"], tokenizer("01<|end|>")["input_ids"]]

    def by_hand(model, prompt, response):  # the response tokens' log-probs, summed, from transformers alone
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0, :-1].double(), -1).gather(-1, ids[0, 1:, None])[:, 0]
        return float(logprobs[len(prompt) - 1 :].sum())

    expected = [0.5 * (by_hand(policy, p, r) - by_hand(reference, p, r)) for p, r in zip(prompts, responses)]
    reward = Reward.from_config(RewardSourceConfig(model=str(out / "hf")), dtype="float32", device=torch.device("cpu"),
                                cache_dir=tmp_path / "cache")
    scores = reward.score([None, None], ["", ""], prompts, responses)
    # fp32 log-softmax sums over <= 6 tokens of a 2-layer model against fp64 by hand: ~1e-6 each.
    assert scores.tolist() == pytest.approx(expected, abs=1e-4)
    assert any(abs(value) > 1e-3 for value in expected)  # the trained model moved away from its reference
    # PPO reads it as its reward model.
    assert main(["grpo", f"trainer.output_dir={tmp_path / 'grpo'}", "data.train=builtin", "data.builtin_size=16", "data.max_length=32",
                 "rollout.max_new_tokens=4", "trainer.global_batch_size=2", "trainer.micro_batch_size=4", "trainer.max_steps=1",
                 "trainer.progress_bar=false", "trainer.tensorboard=false", "trainer.export_hf=false",
                 f"reward.model={out / 'hf'}"]) == 0
    assert read_metrics(tmp_path / "grpo", "train")[0]["reward"] != 0.0


def test_log_ratio_readout_refuses_the_head_only_settings(tmp_path, capsys):
    for setting, message in (("reward.margin=true", "reward.margin: reward.readout log_ratio is a pairwise Bradley-Terry"),
                             ("reward.beta=0", "reward.beta must be > 0"),
                             ("model.lora.enabled=true", "does not take model.lora.enabled")):
        assert main(["rm", f"trainer.output_dir={tmp_path}", *SMALL, "reward.readout=log_ratio", setting]) == 2
        assert message in capsys.readouterr().err


def test_regression_reward_model_on_attribute_data(tmp_path):
    data = tmp_path / "attributes.jsonl"
    rows = [{"text": "a" * (i % 7 + 1), "label": [float(i % 7), -100.0 if i % 3 else 1.0]} for i in range(16)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "run"
    argv = ["rm", f"trainer.output_dir={out}", f"data.train={data}", "reward.loss=regression", "reward.num_attributes=2",
            "trainer.max_steps=3", "trainer.global_batch_size=8", "trainer.micro_batch_size=8",
            "trainer.progress_bar=false", "trainer.tensorboard=false", "optim.lr=1e-3"]
    assert main(argv) == 0
    assert "mse" in read_metrics(out, "train")[-1]
    assert AutoModelForSequenceClassification.from_pretrained(out / "hf").config.num_labels == 2


def test_lora_sft_and_rm_export_merged_models(tmp_path):
    lora = ["model.lora.enabled=true", "model.lora.r=4", "trainer.max_steps=2"]
    sft = cli("sft", tmp_path / "sft", *lora)
    assert AutoModelForCausalLM.from_pretrained(sft / "hf").config.model_type == "llama"
    rm = cli("rm", tmp_path / "rm", *lora)
    assert AutoModelForSequenceClassification.from_pretrained(rm / "hf").config.num_labels == 1


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gpt2", "gemma"])
def test_sft_and_rm_on_real_architecture_families(tmp_path, family):
    path = save_family_model(tmp_path / family, family)
    for command in ("sft", "rm"):
        out = cli(command, tmp_path / command, f"model.path={path}", "trainer.max_steps=2", "trainer.export_hf=false")
        losses = [r["loss"] for r in read_metrics(out, "train")]
        assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_bad_data_stops_before_training_naming_file_line_and_field(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "1+1", "completion": "2"}\n{"prompt": "2+2"}\n')
    assert main(["sft", f"trainer.output_dir={tmp_path / 'run'}", f"data.train={data}", "trainer.progress_bar=false"]) == 2
    message = capsys.readouterr().err
    assert "bad.jsonl:2" in message and "completion" in message
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_every_shipped_config_loads_and_validates():
    examples = Path(__file__).resolve().parents[1] / "examples"
    from stema.cli import COMMANDS

    found = sorted(examples.rglob("*.yaml"))
    assert len(found) >= 4
    for path in found:
        command = path.relative_to(examples).parts[0]
        assert command in COMMANDS, f"{path}: put configs under examples/<command>/"
        load_config(COMMANDS[command].config_class(), path)


def test_bf16_autocast_path_trains(tmp_path):
    # 'auto' means bf16 autocast on GPU; 'bf16' forces the same path on the CPU so CI covers it.
    out = cli("sft", tmp_path, "trainer.max_steps=3", "trainer.precision=bf16", "trainer.export_hf=false", "optim.lr=3e-3")
    losses = [r["loss"] for r in read_metrics(out, "train")]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
