"""Typed configs: YAML values over dataclass defaults, dotted overrides, errors naming file/line/field."""

import pytest

from stema.config import ConfigError, RMConfig, SFTConfig, describe, load_config, to_yaml


def write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_yaml_and_overrides_layer_in_order(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 1.0e-4\n  betas: [0.8, 0.9]\ntrainer:\n  max_steps: 5\n")
    config = load_config(SFTConfig, path, ["optim.lr=3e-4", "model.lora.enabled=true", "data.eval=null"])
    assert config.optim.lr == pytest.approx(3e-4)
    assert config.optim.betas == [0.8, 0.9]
    assert config.trainer.max_steps == 5
    assert config.model.lora.enabled is True
    assert config.data.eval is None
    assert config.trainer.micro_batch_size == 8  # untouched default
    assert SFTConfig().model.lora.target_modules is not SFTConfig().model.lora.target_modules


def test_ints_are_accepted_for_floats_but_not_the_reverse(tmp_path):
    config = load_config(SFTConfig, None, ["optim.lr=1"])
    assert isinstance(config.optim.lr, float)
    with pytest.raises(ConfigError, match=r"trainer.max_steps: expected an int, got 2.5"):
        load_config(SFTConfig, None, ["trainer.max_steps=2.5"])


def test_unknown_key_names_file_line_and_key(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 1.0e-4\n  lr_warmup: 3\n")
    with pytest.raises(ConfigError, match=r"cfg.yaml:3: unknown key 'optim.lr_warmup'"):
        load_config(SFTConfig, path)


def test_wrong_type_names_file_line_and_field(tmp_path):
    path = write(tmp_path, "trainer:\n  seed: 1\n  resume: maybe\n")
    with pytest.raises(ConfigError, match=r"cfg.yaml:3: trainer.resume: expected a bool, got 'maybe'"):
        load_config(SFTConfig, path)


def test_literal_choices_and_nested_mapping_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"optim.schedule: expected one of 'cosine', 'linear', 'constant'"):
        load_config(SFTConfig, None, ["optim.schedule=step"])
    path = write(tmp_path, "model: tiny\n")
    with pytest.raises(ConfigError, match=r"cfg.yaml:1: model: expected a mapping"):
        load_config(SFTConfig, path)


def test_bad_yaml_missing_file_and_bad_override():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(SFTConfig, "/nonexistent/cfg.yaml")
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(SFTConfig, None, ["optim.lr"])


def test_invalid_yaml_names_line(tmp_path):
    path = write(tmp_path, "optim:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match=r"cfg.yaml:\d+: invalid YAML"):
        load_config(SFTConfig, path)


def test_cross_field_validation():
    with pytest.raises(ConfigError, match="must be a multiple of micro_batch_size"):
        load_config(SFTConfig, None, ["trainer.global_batch_size=6", "trainer.micro_batch_size=4"])


def test_round_trip_through_yaml(tmp_path):
    config = load_config(RMConfig, None, ["reward.num_attributes=3", "reward.loss=regression"])
    again = load_config(RMConfig, write(tmp_path, to_yaml(config)))
    assert again == config


def test_every_field_is_documented():
    for cls in (SFTConfig, RMConfig):
        for key, _type, _default, doc in describe(cls):
            assert doc, f"{cls.__name__}.{key} has no doc"


def test_scientific_notation_without_a_dot_is_a_float(tmp_path):
    # YAML 1.1 reads 3e-4 as a string; configs write learning rates that way all the time.
    config = load_config(SFTConfig, write(tmp_path, "optim:\n  lr: 3e-4\n"), ["optim.eps=1E-6"])
    assert config.optim.lr == pytest.approx(3e-4) and config.optim.eps == pytest.approx(1e-6)
    with pytest.raises(ConfigError, match="optim.lr: expected a float, got 'e-4'"):
        load_config(SFTConfig, None, ["optim.lr=e-4"])


# ---------------------------------------------------------------------------------------------
# Fields naming registered things, and `--help` defaults
# ---------------------------------------------------------------------------------------------

ESTIMATOR_MODULE = '''
from stema.losses.advantages import ADVANTAGES, AdvantageInputs, register_advantage

CALLS = []


@register_advantage("stema_test_mine", needs_critic=False)
def mine(inputs: AdvantageInputs):
    """REINFORCE with every advantage doubled: a registered estimator outside STEMA."""
    CALLS.append(inputs.mask.shape)
    advantages, returns = ADVANTAGES.get("reinforce")(inputs)
    return 2 * advantages, returns
'''


def test_unknown_registered_names_are_config_errors_listing_the_registered_ones(tmp_path):
    from stema.config import DPOConfig, PPOConfig

    with pytest.raises(ConfigError, match=r"^command line \(ppo.advantage=nope\): ppo.advantage: unknown advantage estimator "
                                          r"'nope' \(registered: gae, grpo, reinforce, rloo"):
        load_config(PPOConfig, None, ["ppo.advantage=nope", "reward.function=builtin"])
    with pytest.raises(ConfigError, match=r"cfg.yaml:4: preference.loss: unknown preference loss 'dpo2' \(registered: dpo, ipo, "
                                          r"rpo_bwd_kl, rpo_fwd_kl, rpo_sq, simpo"):
        load_config(DPOConfig, write(tmp_path, "model:\n  path: tiny\npreference:\n  loss: dpo2\n"))
    assert load_config(DPOConfig, None, ["preference.loss=simpo"]).preference.loss == "simpo"


def test_an_estimator_registered_in_a_users_module_is_chosen_from_the_command_line(tmp_path, monkeypatch):
    import sys

    from stema.cli import main
    from stema.training.logging import read_metrics

    (tmp_path / "stema_test_estimators.py").write_text(ESTIMATOR_MODULE)
    monkeypatch.chdir(tmp_path)  # imported from the current folder, as `python -m` would
    out = tmp_path / "run"
    assert main(["grpo", "--import", "stema_test_estimators", f"trainer.output_dir={out}", "ppo.advantage=stema_test_mine",
                 "reward.function=builtin", "data.train=builtin", "data.builtin_size=8", "data.max_length=32",
                 "rollout.max_new_tokens=4", "trainer.global_batch_size=2", "trainer.micro_batch_size=8", "trainer.max_steps=2",
                 "trainer.progress_bar=false", "trainer.tensorboard=false", "trainer.export_hf=false"]) == 0
    assert len(sys.modules["stema_test_estimators"].CALLS) == 2  # one advantage estimate per step
    assert [record["step"] for record in read_metrics(out, "train")] == [1, 2]


def test_a_missing_import_module_is_a_config_error(capsys):
    from stema.cli import main

    assert main(["ppo", "--import", "stema_no_such_plugin", "reward.function=builtin"]) == 2
    assert capsys.readouterr().err.startswith("stema ppo: config error: --import stema_no_such_plugin: ModuleNotFoundError")


def test_grpo_help_prints_grpos_defaults(capsys):
    from stema.cli import main

    with pytest.raises(SystemExit):
        main(["grpo", "--help"])
    text = capsys.readouterr().out
    for line in ("rollout.samples_per_prompt (an int, default 4)", "ppo.kl_in (one of 'reward', 'loss', default 'loss')",
                 "ppo.kl_estimator (one of 'k1', 'k2', 'k3', default 'k3')", "ppo.whiten_advantages (a bool, default False)"):
        assert line in text, line
    assert "ppo.advantage (a registered advantage estimator: gae, grpo, reinforce, rloo" in text and "default 'grpo')" in text
    with pytest.raises(SystemExit):
        main(["ppo", "--help"])
    text = capsys.readouterr().out
    assert "rollout.samples_per_prompt (an int, default 1)" in text and "ppo.kl_estimator (one of 'k1', 'k2', 'k3', default 'k1')" in text


def test_the_readmes_example_estimator_centres_each_group_without_scaling():
    """examples/plugins/dr_grpo.py (the README's `--import` example), in a process of its own (it
    registers a name): its advantages are GRPO's times each group's standard deviation (+ eps)."""
    import subprocess
    import sys
    from pathlib import Path

    script = """
import torch
from stema.losses.advantages import AdvantageInputs, estimate_advantages
import examples.plugins.dr_grpo

scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.5, 0.0])
groups = torch.tensor([7, 7, 7, 3, 3, 3, 9, 9])
mask = torch.ones(8, 3, dtype=torch.bool)
rewards = torch.zeros(8, 3)
rewards[:, -1] = scores
inputs = AdvantageInputs(token_rewards=rewards, mask=mask, values=None, group_ids=groups)
dr, _ = estimate_advantages("dr_grpo", inputs)
grpo, _ = estimate_advantages("grpo", inputs)
std = torch.stack([scores[groups == g].std() for g in groups.tolist()])
assert torch.allclose(dr, grpo * (std + inputs.eps)[:, None], atol=1e-6), (dr, grpo)
assert torch.allclose(dr[:3, 0], torch.tensor([2 / 3, -1 / 3, -1 / 3]))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
