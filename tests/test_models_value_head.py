"""`token_values`: the critic's per-token values agree with the sequence classifier's own pooling."""

import pytest
import torch

from stema.config import LoraConfig, ModelConfig
from stema.models import loading
from stema.models.value_head import token_values


def right_padded(tokenizer):
    """A right-padded batch whose rows have 3, 8 and 5 tokens."""
    return tokenizer(["1+2", "12+30=42", "7*6=4"], return_tensors="pt", padding=True)


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_value_at_last_token_equals_pooled_score(tmp_path, llama_path, use_lora):
    lora = LoraConfig(enabled=use_lora, r=4, alpha=8.0)
    model, tokenizer = loading.load_reward_model(ModelConfig(path=str(llama_path), lora=lora), num_labels=1, cache_dir=tmp_path)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:  # nonzero LoRA B and head copy, so both take part
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    inputs = right_padded(tokenizer)
    with torch.no_grad():
        values = token_values(model, inputs.input_ids, inputs.attention_mask)
        pooled = model(**inputs).logits  # [B, 1]
    assert values.shape == inputs.input_ids.shape
    last = inputs.attention_mask.sum(-1) - 1  # [B]
    assert last.tolist() == [2, 7, 4]
    torch.testing.assert_close(values[torch.arange(3), last], pooled.squeeze(-1), rtol=0, atol=1e-6)
    # Values differ along the sequence: the head really is applied at every position.
    assert values[1].std() > 1e-4


def test_values_carry_gradients_to_the_trainable_weights(tmp_path, llama_path):
    model, tokenizer = loading.load_reward_model(ModelConfig(path=str(llama_path)), num_labels=1, cache_dir=tmp_path)
    inputs = right_padded(tokenizer)
    (token_values(model, inputs.input_ids, inputs.attention_mask) * inputs.attention_mask).sum().backward()
    assert model.score.weight.grad.abs().sum() > 0
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_multi_output_model_is_refused(tmp_path, llama_path):
    model, tokenizer = loading.load_reward_model(ModelConfig(path=str(llama_path)), num_labels=3, cache_dir=tmp_path)
    inputs = right_padded(tokenizer)
    with pytest.raises(ValueError, match="one output"):
        token_values(model, inputs.input_ids, inputs.attention_mask)
