"""The built-in tiny model: a Llama-architecture causal LM and a character tokenizer, made by code.

`stema demo` and the tests need a model with no download. `save_tiny_model(path)` writes an
ordinary Hugging Face folder (config.json, model.safetensors, tokenizer files with a chat
template) that `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load as
they are, so everything downstream treats it like any other local checkpoint.

The tokenizer maps each printable ASCII character (and newline) to one token, plus special tokens:
`<pad>`, `<s>` (begin), `<|end|>` (end of a turn; also the EOS token, so generation stops there),
`<unk>`, and the role markers `<|system|>`, `<|user|>`, `<|assistant|>` used by the chat template.
"""

from __future__ import annotations

import string
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

PAD, BOS, EOS, UNK = "<pad>", "<s>", "<|end|>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
CHARACTERS = tuple(string.printable[:95]) + ("\n",)  # digits, letters, punctuation, space, newline

# Each message is `<|role|>content<|end|>`; a generation prompt opens the assistant turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass(frozen=True)
class TinyModelSpec:
    """Size of the tiny Llama. The defaults (about 1.3M parameters) train in minutes on 2 CPU cores."""

    hidden_size: int = 160
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 432
    max_position_embeddings: int = 512
    seed: int = 0


def build_tokenizer():
    """The character tokenizer, as a `transformers.PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate((PAD, BOS, EOS, UNK) + ROLE_TOKENS + CHARACTERS)}
    # BPE with no merges splits every string into single characters; Fuse joins them back.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS),
        model_max_length=TinyModelSpec.max_position_embeddings,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_config(spec: TinyModelSpec, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    )


def build_model(spec: TinyModelSpec | None = None, tokenizer=None):
    """A randomly initialized tiny `LlamaForCausalLM` (deterministic for a given `spec.seed`)."""
    from transformers import LlamaForCausalLM

    spec = spec or TinyModelSpec()
    tokenizer = tokenizer or build_tokenizer()
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(build_config(spec, tokenizer))
    finally:
        torch.random.set_rng_state(generator_state)
    return model


def save_tiny_model(path: str | Path, spec: TinyModelSpec | None = None) -> Path:
    """Write the tiny model and its tokenizer as a Hugging Face folder at `path`; returns the path."""
    spec = spec or TinyModelSpec()
    path = Path(path)
    tokenizer = build_tokenizer()
    model = build_model(spec, tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "stema_tiny_spec.json").write_text(__import__("json").dumps(asdict(spec), indent=2) + "\n")
    return path
