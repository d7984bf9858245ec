"""What the generation engine needs to know about a decoder, read from a Hugging Face model.

The engine implements one block, the Llama family's: RMSNorm -> attention with rotary embeddings
and grouped-query attention -> RMSNorm -> SwiGLU MLP, pre-norm residuals, a final RMSNorm and an
lm_head that may be tied to the embeddings. Llama, Qwen2 (q/k/v biases) and Mistral are that block
with different biases and defaults. `decoder_spec_from_hf(model)` reads a `DecoderSpec` from a
model (a peft wrapper is looked through) and raises `UnsupportedModelError` naming what it cannot
run: another architecture, another activation, a rotary scaling that is not implemented, or a
sliding window shorter than the engine's sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
# Rotary types whose inverse frequencies are fixed (no dependence on the sequence length) and whose
# cos/sin are not rescaled: the engine takes the model's own inv_freq and needs nothing else.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SILU_NAMES = ("silu", "swish")


class UnsupportedModelError(ValueError):
    """The model is outside what `GenerationEngine` implements; the message says what and why."""


@dataclass(frozen=True)
class DecoderSpec:
    """Sizes and options of a Llama-family decoder.

    Attributes:
        model_type: the Hugging Face `config.model_type` ("llama", "qwen2" or "mistral").
        vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, head_dim, intermediate_size:
            the usual sizes; H = num_heads, KV = num_kv_heads, d = head_dim.
        rms_norm_eps: epsilon of every RMSNorm.
        tied_embeddings: whether lm_head is the embedding matrix (one buffer in the engine).
        qkv_bias, o_bias, mlp_bias: which projections have biases (Qwen2: qkv; Llama: per
            `attention_bias` / `mlp_bias`; Mistral: none).
        inv_freq: [d / 2] fp32 inverse rotary frequencies, as the model computes them.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    tied_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    inv_freq: torch.Tensor

    @property
    def qkv_rows(self) -> int:
        """Rows of the fused qkv projection: (H + 2 * KV) * d."""
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim


def unwrap_hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The `*ForCausalLM` inside a peft wrapper (adapters still in place), or `model` itself."""
    from stema.models.loading import unwrap_lora

    return unwrap_lora(model)


def _architecture_name(model: torch.nn.Module, config) -> str:
    architectures = getattr(config, "architectures", None) or [type(model).__name__]
    return f"{architectures[0]} (model_type {getattr(config, 'model_type', None)!r})"


def _check_model_type(model: torch.nn.Module, config) -> None:
    if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"GenerationEngine does not implement {_architecture_name(model, config)}: it runs the Llama "
            f"family ({', '.join(SUPPORTED_MODEL_TYPES)}); stema.rollout.HFGenerator (transformers' generate(), "
            "which stema generate, rs, spin and ppo fall back to) runs the others"
        )
    activation = getattr(config, "hidden_act", "silu")
    if activation not in SILU_NAMES:
        raise UnsupportedModelError(
            f"GenerationEngine implements the SwiGLU MLP (hidden_act 'silu'); {_architecture_name(model, config)} "
            f"has hidden_act {activation!r}"
        )


def _rope_type(config) -> str:
    """The rotary type of a transformers 5 (`rope_parameters`) or 4 (`rope_scaling`) config."""
    parameters = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return parameters.get("rope_type", parameters.get("type", "default"))


def _inverse_frequencies(model: torch.nn.Module, config) -> torch.Tensor:
    """[d / 2] fp32 inv_freq of the model's own rotary module, after checking the rotary type."""
    rope_type = _rope_type(config)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"{_architecture_name(model, config)}: rotary scaling type {rope_type!r} is not implemented by "
            f"GenerationEngine (implemented: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    rotary = model.model.rotary_emb
    if float(getattr(rotary, "attention_scaling", 1.0)) != 1.0:
        raise UnsupportedModelError(
            f"{_architecture_name(model, config)}: rotary attention scaling "
            f"{rotary.attention_scaling} is not implemented by GenerationEngine"
        )
    inv_freq = getattr(rotary, "original_inv_freq", None)
    if inv_freq is None:
        inv_freq = rotary.inv_freq
    return inv_freq.detach().to(device="cpu", dtype=torch.float32).clone()


def _sliding_window_in_use(config) -> int | None:
    """The attention window of the model's layers, or None when every layer attends to all keys."""
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    if config.model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
        return None
    return int(window)


def check_sequence_length(model: torch.nn.Module, *, max_total_len: int) -> None:
    """Raise when the model uses a sliding attention window shorter than `max_total_len` (the
    engine attends to every earlier key, which equals a window only as long as the sequence)."""
    model = unwrap_hf_model(model)
    config = model.config
    window = _sliding_window_in_use(config)
    if window is not None and max_total_len > window:
        raise UnsupportedModelError(
            f"{_architecture_name(model, config)} attends within a sliding window of {window} tokens; "
            f"GenerationEngine implements full attention only, so max_total_len ({max_total_len}) must be "
            f"<= {window}"
        )


def _has_bias(module: torch.nn.Module) -> bool:
    """Whether a (possibly LoRA-wrapped) linear layer has a bias."""
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    return getattr(base, "bias", None) is not None


def decoder_spec_from_hf(model: torch.nn.Module) -> DecoderSpec:
    """The `DecoderSpec` of a transformers LlamaForCausalLM / Qwen2ForCausalLM / MistralForCausalLM
    (possibly inside a peft wrapper); raises UnsupportedModelError for anything else."""
    model = unwrap_hf_model(model)
    config = model.config
    _check_model_type(model, config)
    inv_freq = _inverse_frequencies(model, config)
    first_layer = model.model.layers[0]
    attention, mlp = first_layer.self_attn, first_layer.mlp
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return DecoderSpec(
        model_type=config.model_type,
        vocab_size=model.model.embed_tokens.weight.shape[0],
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads or config.num_attention_heads,
        head_dim=head_dim,
        intermediate_size=config.intermediate_size,
        rms_norm_eps=float(config.rms_norm_eps),
        tied_embeddings=_lm_head_is_embedding(model),
        qkv_bias=_has_bias(attention.q_proj),
        o_bias=_has_bias(attention.o_proj),
        mlp_bias=_has_bias(mlp.gate_proj),
        inv_freq=inv_freq,
    )


def _lm_head_is_embedding(model: torch.nn.Module) -> bool:
    """Whether lm_head computes with the embedding matrix itself (tied, and neither side replaced
    by a LoRA layer or a peft `modules_to_save` copy)."""
    lm_head, embedding = model.lm_head, model.model.embed_tokens
    plain = isinstance(lm_head, torch.nn.Linear) and isinstance(embedding, torch.nn.Embedding)
    return plain and lm_head.weight is embedding.weight
