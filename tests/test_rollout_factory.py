"""`stema.rollout.build_generator`, the one place that picks a rollout backend: each registered
backend's generator, a lazily imported backend module registering itself on first use, clear
ConfigErrors for a backend that is not available, and PPO's checks for the `hf` backend made before
any role starts. Every generator and refitter satisfies the `Generator` / `Refitter` protocols."""

from __future__ import annotations

import sys

import pytest

from stema.cli import main
from stema.config import ConfigError, RolloutConfig, SamplingConfig
from stema.distributed import World
from stema.models.families import build_family_model
from stema.models.tiny import build_tokenizer
from stema.rollout import GenerationEngine, Generator, HFGenerator, Refitter, SamplingParams, build_generator
from stema.rollout import factory

from tiny_models import scramble

PROMPTS = [[5, 17, 30], [40, 41, 42, 43], [90]]


@pytest.fixture(scope="module")
def llama():
    return scramble(build_family_model("llama", tokenizer=build_tokenizer()), seed=3)


@pytest.mark.parametrize(("backend", "kind"), [("stema", GenerationEngine), ("hf", HFGenerator)])
def test_each_backend_builds_its_generator_and_they_agree_on_greedy_tokens(llama, backend, kind):
    generator = build_generator(llama, RolloutConfig(backend=backend), world=World(role="ppo"), max_batch=2, max_total_len=32)
    assert isinstance(generator, kind) and isinstance(generator, Generator)
    refitter = generator.refitter(llama, world=World(role="ppo"), bucket_bytes=1 << 20)
    assert isinstance(refitter, Refitter)
    refitter.refit()
    params = SamplingParams(temperature=0, max_new_tokens=6, eos_token_ids=())
    expected = GenerationEngine.from_hf(llama, max_batch=3, max_total_len=32).generate(PROMPTS, params).token_ids
    assert generator.generate(PROMPTS, params).token_ids == expected


def test_the_hf_backend_is_refused_over_several_processes(llama):
    with pytest.raises(ConfigError, match=r"rollout backend is hf.*sharded over 2 processes; run stema rs in one process"):
        build_generator(llama, SamplingConfig(backend="hf"), world=World(role="rs", world_size=2), max_batch=2,
                        max_total_len=32)


def test_a_lazy_backend_module_registers_itself_on_first_use(llama, monkeypatch, tmp_path):
    """The factory imports a lazy backend's module only when a run asks for it; the module
    registers its builder on import (as `stema.rollout.vllm` does)."""
    (tmp_path / "lazy_backend_example.py").write_text(
        "from stema.rollout import GenerationEngine, register_backend\n"
        "@register_backend('lazy-example')\n"
        "def build(model, rollout_config, *, world, max_batch, max_total_len, dtype, say):\n"
        "    return GenerationEngine.from_hf(model, max_batch=max_batch, max_total_len=max_total_len)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(factory.LAZY_BACKEND_MODULES, "lazy-example", "lazy_backend_example")
    assert "lazy_backend_example" not in sys.modules
    config = RolloutConfig()
    config.backend = "lazy-example"
    assert isinstance(build_generator(llama, config, max_batch=1, max_total_len=16), GenerationEngine)
    assert "lazy_backend_example" in sys.modules


def test_an_unavailable_backend_is_a_config_error_naming_the_field(llama, monkeypatch):
    monkeypatch.setitem(factory.LAZY_BACKEND_MODULES, "missing", "stema.rollout.no_such_backend")
    config = SamplingConfig()
    config.backend = "missing"
    with pytest.raises(ConfigError, match=r"^sampling\.backend: the 'missing' backend is not available here"):
        build_generator(llama, config, max_batch=1, max_total_len=16, field="sampling.backend")
    config.backend = "nonsense"
    with pytest.raises(ConfigError, match=r"^rollout\.backend: unknown rollout backend 'nonsense' \(known: .*hf.*stema"):
        build_generator(llama, config, max_batch=1, max_total_len=16)


def test_ppo_refuses_engine_settings_the_hf_backend_cannot_honour(tmp_path, capsys):
    small = ["data.train=builtin", "data.builtin_size=16", "trainer.progress_bar=false", "reward.function=builtin"]
    assert main(["ppo", f"trainer.output_dir={tmp_path}", *small, "rollout.backend=hf", "rollout.num_engines=2"]) == 2
    err = capsys.readouterr().err
    assert "rollout.num_engines: rollout.backend is hf, so the actor would generate with transformers' generate()" in err
    assert not (tmp_path / "checkpoints").exists()
