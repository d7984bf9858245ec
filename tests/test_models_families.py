"""Every supported architecture family loads, trains, pools rewards and takes LoRA the same way."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from stema.config import LoraConfig, ModelConfig
from stema.models import families, loading
from stema.models.value_head import token_values

# The attention projections LoRA targets in each family (GPT-2 and Phi-3 fuse q, k and v).
ATTENTION_MODULES = {
    "llama": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "phi3": ["qkv_proj"],
}
TEXTS = ["1+2", "12+30=42", "7*6=4"]


@pytest.fixture(scope="module", params=families.FAMILIES)
def family_path(request, tmp_path_factory):
    family = request.param
    return family, families.save_family_model(tmp_path_factory.mktemp(family) / family, family)


def test_every_family_is_covered():
    assert set(families.FAMILIES) == {"llama", "qwen2", "mistral", "gpt2", "gemma", "phi3"} == set(ATTENTION_MODULES)
    with pytest.raises(ValueError, match="known families: llama, qwen2"):
        families.tiny_family_config("bert", vocab_size=10)


def test_build_is_deterministic_per_seed():
    first = families.build_family_model("gpt2", seed=1)
    second = families.build_family_model("gpt2", seed=1)
    third = families.build_family_model("gpt2", seed=2)
    for (name, a), b, c in zip(first.state_dict().items(), second.state_dict().values(), third.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(first.transformer.h[0].attn.c_attn.weight, third.transformer.h[0].attn.c_attn.weight)


def test_causal_lm_forward_and_backward_are_finite(family_path):
    family, path = family_path
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert model.config.model_type == family
    assert model.config.vocab_size == len(tokenizer)
    assert sum(parameter.numel() for parameter in model.parameters()) < 50_000
    model.train()
    inputs = tokenizer(TEXTS, return_tensors="pt", padding=True)
    labels = inputs.input_ids.masked_fill(inputs.attention_mask == 0, -100)
    output = model(**inputs, labels=labels)
    assert output.logits.shape == (*inputs.input_ids.shape, len(tokenizer))
    assert torch.isfinite(output.loss) and 3.0 < output.loss.item() < 6.0  # about log(103) at init
    output.loss.backward()
    gradients = [parameter.grad for parameter in model.parameters()]
    assert all(gradient is not None and torch.isfinite(gradient).all() for gradient in gradients)


def test_reward_model_pools_the_last_non_pad_token(tmp_path, family_path):
    """load_reward_model goes through AutoModelForSequenceClassification, so this also loads the folder as one."""
    family, path = family_path
    model, tokenizer = loading.load_reward_model(ModelConfig(path=str(path)), num_labels=2, cache_dir=tmp_path)
    assert model.config.model_type == family and type(model).__name__.endswith("ForSequenceClassification")
    padded = tokenizer(TEXTS, return_tensors="pt", padding=True)
    assert (padded.attention_mask == 0).any() and padded.input_ids[0, -1] == tokenizer.pad_token_id
    with torch.no_grad():
        batch_scores = model(**padded).logits  # [3, 2]
        alone = torch.cat([model(**tokenizer([text], return_tensors="pt")).logits for text in TEXTS])
    # Each row's score is its own unpadded score: the pooled position is its last real token.
    torch.testing.assert_close(batch_scores, alone, rtol=0, atol=1e-5)
    assert (batch_scores[0] - batch_scores[1]).abs().max() > 1e-4


def test_lora_critic_on_the_attention_projections(tmp_path, family_path):
    family, path = family_path
    lora = LoraConfig(enabled=True, r=2, alpha=4.0, target_modules=ATTENTION_MODULES[family])
    model, tokenizer = loading.load_reward_model(ModelConfig(path=str(path), lora=lora), num_labels=1, cache_dir=tmp_path)
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert any("lora_" in name for name in trainable) and any("score" in name for name in trainable)
    inputs = tokenizer(TEXTS, return_tensors="pt", padding=True)
    values = token_values(model, inputs.input_ids, inputs.attention_mask)  # [3, T]
    last = inputs.attention_mask.sum(-1) - 1
    torch.testing.assert_close(values[torch.arange(3), last].detach(), model(**inputs).logits.squeeze(-1).detach(), rtol=0, atol=1e-5)
    values.sum().backward()
    assert all(torch.isfinite(model.get_parameter(name).grad).all() for name in trainable)

