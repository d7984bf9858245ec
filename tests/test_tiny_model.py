"""The built-in tiny model is an ordinary Hugging Face checkpoint made by STEMA's own code."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from stema.models import tiny


def test_character_tokenizer_round_trips_text_and_chat():
    tokenizer = tiny.build_tokenizer()
    text = "What is 12+30?\nAnswer: 42"
    ids = tokenizer(text).input_ids
    assert len(ids) == len(text)  # one token per character
    assert tokenizer.decode(ids) == text
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "2+2"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<s><|user|>2+2<|end|><|assistant|>"
    assert tokenizer.eos_token == "<|end|>"


def test_saved_folder_loads_with_auto_classes(tmp_path):
    path = tiny.save_tiny_model(tmp_path / "tiny", tiny.TinyModelSpec(hidden_size=32, num_layers=1, intermediate_size=64))
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == len(tokenizer)
    batch = tokenizer(["1+1", "22+3"], return_tensors="pt", padding=True)
    logits = model(**batch).logits
    assert logits.shape == (2, batch.input_ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


def test_build_model_is_deterministic_and_leaves_global_rng_alone():
    spec = tiny.TinyModelSpec(hidden_size=32, num_layers=1, intermediate_size=64, seed=3)
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = tiny.build_model(spec)
    assert torch.equal(torch.rand(1), expected_next)
    second = tiny.build_model(spec)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    assert sum(p.numel() for p in tiny.build_model().parameters()) > 1_000_000
