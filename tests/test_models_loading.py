"""Loading policies and reward models, LoRA, the adapter-free reference model, and HF export."""

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from stema.config import ConfigError, LoraConfig, ModelConfig
from stema.models import loading, tiny

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def model_config(path, **fields) -> ModelConfig:
    lora = fields.pop("lora", None)
    config = ModelConfig(path=str(path), **fields)
    if lora is not None:
        config.lora = lora
    return config


def lora_config(**fields) -> LoraConfig:
    return LoraConfig(enabled=True, r=4, alpha=8.0, target_modules=list(ATTENTION), **fields)


def batch(tokenizer, texts=("12+30=42", "7*6")):
    return tokenizer(list(texts), return_tensors="pt", padding=True)


def randomize_trainable(model, seed=1):
    """Move every trainable weight (LoRA B starts at zero, making LoRA a no-op) to random values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))


# ---------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------


def test_tiny_path_is_written_once_into_the_cache(tmp_path):
    cache = tmp_path / "cache"
    path = loading.resolve_model_path(ModelConfig(path="tiny"), cache_dir=cache)
    assert path == cache / "tiny"
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    written = (path / "model.safetensors").stat().st_mtime_ns
    assert loading.resolve_model_path(ModelConfig(path="tiny"), cache_dir=cache) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == written
    assert sorted(p.name for p in cache.iterdir()) == ["tiny"]  # no temporary folders left behind
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    expected = tiny.build_model()
    assert torch.equal(model.model.embed_tokens.weight, expected.model.embed_tokens.weight)


def test_local_path_must_exist_and_be_a_model_folder(tmp_path, llama_path):
    assert loading.resolve_model_path(ModelConfig(path=str(llama_path)), cache_dir=tmp_path) == llama_path
    missing = tmp_path / "no-such-model"
    with pytest.raises(ConfigError, match=rf"^model\.path: {missing} is not a folder"):
        loading.resolve_model_path(ModelConfig(path=str(missing)), cache_dir=tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="has no config.json"):
        loading.resolve_model_path(ModelConfig(path=str(empty)), cache_dir=tmp_path)
    (empty / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="holds only LoRA adapters"):
        loading.resolve_model_path(ModelConfig(path=str(empty)), cache_dir=tmp_path)


# ---------------------------------------------------------------------------------------------
# Tokenizer and policy
# ---------------------------------------------------------------------------------------------


def test_tokenizer_without_pad_token_pads_with_eos(tmp_path, caplog):
    tokenizer = tiny.build_tokenizer()
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).pad_token is None
    with caplog.at_level(logging.INFO, logger="stema.models.loading"):
        loaded = loading.load_tokenizer(tmp_path)
    assert loaded.pad_token == loaded.eos_token == "<|end|>"
    assert loaded.padding_side == "right"
    assert "no pad token" in caplog.text


def test_policy_loads_in_the_configured_dtype(tmp_path, llama_path):
    model, tokenizer = loading.load_policy(model_config(llama_path, dtype="bfloat16"), cache_dir=tmp_path)
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}
    assert tokenizer.padding_side == "right" and tokenizer.pad_token == "<pad>"
    model, _ = loading.load_policy(model_config(llama_path), cache_dir=tmp_path)
    assert {parameter.dtype for parameter in model.parameters()} == {torch.float32}


def test_lora_target_that_matches_nothing_lists_the_linear_modules(tmp_path, llama_path):
    cfg = model_config(llama_path, lora=LoraConfig(enabled=True, target_modules=["q_proj", "c_attn"]))
    with pytest.raises(ConfigError, match=r"model\.lora\.target_modules: c_attn match no module") as error:
        loading.load_policy(cfg, cache_dir=tmp_path)
    assert "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj" in str(error.value)


def test_lora_trains_adapters_only_with_gradient_checkpointing(tmp_path, llama_path):
    cfg = model_config(llama_path, lora=lora_config(), gradient_checkpointing=True)
    model, tokenizer = loading.load_policy(cfg, cache_dir=tmp_path)
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    # 2 layers x 4 projections x (A [4, 32] + B [out, 4]); k/v project to 2 kv heads x 8 = 16.
    assert sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad) == 2 * (
        2 * (4 * 32 + 32 * 4) + 2 * (4 * 32 + 16 * 4)
    )
    assert any(getattr(module, "gradient_checkpointing", False) for module in model.modules())
    model.train()
    inputs = batch(tokenizer)
    model(**inputs, labels=inputs.input_ids).loss.backward()
    for name, parameter in model.named_parameters():
        assert (parameter.grad is not None) == parameter.requires_grad, name
    assert any(parameter.grad.abs().sum() > 0 for parameter in model.parameters() if parameter.grad is not None)


def test_disable_adapters_gives_the_base_model_logits(tmp_path, llama_path):
    model, tokenizer = loading.load_policy(model_config(llama_path, lora=lora_config()), cache_dir=tmp_path)
    randomize_trainable(model)
    base, _ = loading.load_policy(model_config(llama_path), cache_dir=tmp_path)
    inputs = batch(tokenizer)
    with torch.no_grad():
        base_logits = base(**inputs).logits
        adapted_logits = model(**inputs).logits
        with loading.disable_adapters(model) as reference:
            reference_logits = reference(**inputs).logits
        after_logits = model(**inputs).logits
    torch.testing.assert_close(reference_logits, base_logits, rtol=0, atol=1e-6)
    assert (adapted_logits - base_logits).abs().max() > 1e-3
    torch.testing.assert_close(after_logits, adapted_logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="needs a LoRA"):
        with loading.disable_adapters(base):
            pass


# ---------------------------------------------------------------------------------------------
# Reward model
# ---------------------------------------------------------------------------------------------


def test_reward_head_is_seeded_and_leaves_global_rng_alone(tmp_path, llama_path):
    cfg = model_config(llama_path)
    torch.manual_seed(5)
    expected_next = torch.rand(1)
    torch.manual_seed(5)
    first, _ = loading.load_reward_model(cfg, num_labels=3, cache_dir=tmp_path, seed=0)
    again, _ = loading.load_reward_model(cfg, num_labels=3, cache_dir=tmp_path, seed=0)
    assert torch.equal(torch.rand(1), expected_next)
    other, _ = loading.load_reward_model(cfg, num_labels=3, cache_dir=tmp_path, seed=1)
    assert first.score.weight.shape == (3, 32)
    assert torch.equal(first.score.weight, again.score.weight)
    assert not torch.equal(first.score.weight, other.score.weight)
    assert first.config.pad_token_id == 0  # the character tokenizer's <pad>


def test_reward_lora_keeps_the_head_trainable(tmp_path, llama_path):
    model, tokenizer = loading.load_reward_model(model_config(llama_path, lora=lora_config()), num_labels=1, cache_dir=tmp_path)
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert any("score" in name for name in trainable)
    assert all("lora_" in name or "score.modules_to_save" in name for name in trainable), trainable
    model(**batch(tokenizer)).logits.sum().backward()
    assert all(parameter.grad is not None for parameter in model.parameters() if parameter.requires_grad)


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def test_export_causal_lm_reloads_with_equal_logits(tmp_path):
    model, tokenizer = loading.load_policy(ModelConfig(path="tiny"), cache_dir=tmp_path)
    out = loading.export_hf(model, tokenizer, tmp_path / "export")
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    inputs = batch(AutoTokenizer.from_pretrained(out, local_files_only=True))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=1e-5)


def test_export_merges_lora_on_a_copy(tmp_path, llama_path):
    model, tokenizer = loading.load_policy(model_config(llama_path, lora=lora_config()), cache_dir=tmp_path)
    randomize_trainable(model)
    out = loading.export_hf(model, tokenizer, tmp_path / "merged")
    assert loading.is_lora_model(model)  # the trained model keeps its adapters
    reloaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert not any("lora" in name for name, _ in reloaded.named_parameters())
    inputs = batch(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=1e-5)


def test_export_without_merging_writes_an_adapter_folder(tmp_path, llama_path):
    import peft

    model, tokenizer = loading.load_policy(model_config(llama_path, lora=lora_config()), cache_dir=tmp_path)
    randomize_trainable(model)
    out = loading.export_hf(model, tokenizer, tmp_path / "adapter", merge_lora=False)
    assert (out / "adapter_config.json").is_file() and not (out / "config.json").exists()
    base = AutoModelForCausalLM.from_pretrained(llama_path, local_files_only=True)
    reloaded = peft.PeftModel.from_pretrained(base, out, local_files_only=True)
    inputs = batch(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("num_labels", [1, 3])
@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_export_reward_model_reloads_with_equal_scores(tmp_path, llama_path, num_labels, use_lora):
    cfg = model_config(llama_path, lora=lora_config() if use_lora else None)
    model, tokenizer = loading.load_reward_model(cfg, num_labels=num_labels, cache_dir=tmp_path)
    randomize_trainable(model)
    out = loading.export_hf(model, tokenizer, tmp_path / "rm")
    reloaded = AutoModelForSequenceClassification.from_pretrained(out, local_files_only=True)
    assert reloaded.config.num_labels == num_labels and reloaded.config.pad_token_id == tokenizer.pad_token_id
    inputs = batch(tokenizer)
    with torch.no_grad():
        scores = model(**inputs).logits
        assert scores.shape == (2, num_labels)
        torch.testing.assert_close(reloaded(**inputs).logits, scores, rtol=0, atol=1e-5)
        # Loading the export again through STEMA keeps its trained head instead of re-initializing it.
        again, _ = loading.load_reward_model(model_config(out), num_labels=num_labels, cache_dir=tmp_path)
        torch.testing.assert_close(again(**inputs).logits, scores, rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match=rf"reward model with {num_labels} outputs, but 2 were asked for"):
        loading.load_reward_model(model_config(out), num_labels=2, cache_dir=tmp_path)


def test_export_replaces_an_existing_folder_and_keeps_it_on_failure(tmp_path, llama_path):
    model, tokenizer = loading.load_policy(model_config(llama_path), cache_dir=tmp_path)
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale.txt").write_text("old export")
    loading.export_hf(model, tokenizer, target)
    assert not (target / "stale.txt").exists() and (target / "config.json").is_file()

    class Unsaveable(torch.nn.Module):
        def save_pretrained(self, path):
            (path / "partial.bin").write_bytes(b"x")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        loading.export_hf(Unsaveable(), tokenizer, target)
    assert (target / "config.json").is_file() and not (target / "partial.bin").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out")) == ["out"]
