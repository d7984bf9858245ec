"""In-place refit of a `GenerationEngine` from the trainer's model, planned once.

    refitter = EngineRefitter(engine, policy)   # name mapping + copy plan, built once
    for step in ...:
        ... optimizer step on policy ...
        refitter.refit()                        # engine weights <- policy weights, in place

`EngineRefitter` maps every weight of a transformers Llama / Qwen2 / Mistral causal LM onto a view
of the engine's fused buffers (q, k, v -> rows of `qkv_weight`; gate, up -> rows of
`gate_up_weight`; ...) and builds one `EngineCopy` over all pairs, which copies and casts (e.g. fp32
trainer -> bf16 engine) with no allocation: one kernel call of a `stema_kernels.RefitPlan` for the
plain buffers and, for an engine that keeps its linear weights only oneDNN-packed
(`stema.rollout.packed`), one of a `stema_kernels.PackRowsPlan` writing them straight into the
packed layout. The plans record every buffer's address, so the engine's buffers and the trainer's
parameters must stay where they are (optimizers update parameters in place); they raise if one moved.

LoRA (peft): a LoRA linear layer contributes its effective weight W + sum_a scale_a * B_a @ A_a
(over the active adapters; just W while adapters are disabled or already merged). The merge is
computed each refit, in place, into a target allocated once: directly into the engine's view when
the dtypes agree (the merge dtype is that of W and the adapters promoted together), otherwise into
a buffer in the merge dtype that the plan then casts into the engine. peft `modules_to_save`
copies are followed to the copy of the adapter active when the refitter is built. LoRA on the
embeddings, DoRA and other LoRA variants, LoRA biases and fan_in_fan_out layers are rejected.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from stema_kernels import PackRowsPlan, RefitPlan, pack_rows_, refit_

from .architecture import decoder_spec_from_hf, unwrap_hf_model
from .packed import PackedRows

# Where an engine weight is written: a plain buffer (or a view of one), or rows of a linear weight
# kept only packed (a tied embedding's too: the engine looks tokens up in the packed lm_head).
Destination = torch.Tensor | PackedRows


def _active_module(module: torch.nn.Module) -> torch.nn.Module:
    """The module that computes in place of a peft `ModulesToSaveWrapper` (its active copy, or
    the original while adapters are disabled); any other module itself."""
    if hasattr(module, "modules_to_save") and hasattr(module, "original_module"):
        active = module.active_adapters
        if module.disable_adapters or not active:
            return module.original_module
        return module.modules_to_save[active[0]]
    return module


def _is_lora_layer(module: torch.nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "get_base_layer")


def _base_layer(module: torch.nn.Module) -> torch.nn.Module:
    module = _active_module(module)
    return module.get_base_layer() if _is_lora_layer(module) else module


class LoraMerge:
    """Writes the effective weight [out, in] of a peft LoRA Linear layer into `target`, in place:

        target = W                                      adapters disabled or merged into W
        target = W + sum_a scaling_a * B_a @ A_a        otherwise (a over the active adapters)

    B_a [out, r], A_a [r, in]; `addmm_` accumulates without allocating a [out, in] temporary.
    """

    def __init__(self, layer: torch.nn.Module, target: torch.Tensor, *, name: str):
        self.layer = layer
        self.target = target
        self.name = name
        _check_plain_lora(layer, name)

    def apply(self) -> None:
        layer = self.layer
        self.target.copy_(layer.get_base_layer().weight)
        if layer.disable_adapters or layer.merged:
            return
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A:
                self.target.addmm_(layer.lora_B[adapter].weight, layer.lora_A[adapter].weight,
                                   alpha=layer.scaling[adapter])


def _check_plain_lora(layer: torch.nn.Module, name: str) -> None:
    """Raise for LoRA layers whose effective weight is not W + scale * B @ A."""
    if getattr(layer, "fan_in_fan_out", False):
        raise ValueError(f"{name}: LoRA with fan_in_fan_out is not supported by the engine refit")
    variants = getattr(layer, "lora_variant", {})
    if any(adapter in variants for adapter in layer.lora_A):
        raise ValueError(f"{name}: LoRA variants (DoRA, ...) are not supported by the engine refit")
    if any(layer.lora_B[adapter].bias is not None for adapter in layer.lora_B):
        raise ValueError(f"{name}: LoRA biases (lora_bias=True) are not supported by the engine refit")


def _merge_dtype(layer: torch.nn.Module) -> torch.dtype:
    dtype = layer.get_base_layer().weight.dtype
    for adapter in layer.lora_A:
        dtype = torch.promote_types(dtype, layer.lora_A[adapter].weight.dtype)
        dtype = torch.promote_types(dtype, layer.lora_B[adapter].weight.dtype)
    return dtype


@dataclass(frozen=True)
class MappedWeight:
    """One entry of the name mapping: the trainer's weight `hf_name` fills `engine_slot`."""

    hf_name: str
    engine_slot: str


class EngineRefitter:
    """Copies `trainer_model`'s current weights into `engine` in place; see the module docstring.

    Args:
        engine: a `GenerationEngine` built for the same architecture and sizes.
        trainer_model: the transformers causal LM being trained (or its peft wrapper), on the
            engine's device.

    Attributes:
        mapping: list of `MappedWeight`, every trainer weight and the engine view it fills.
        plan: the `EngineCopy` applied by `refit()`.
        lora_merges: the `LoraMerge`s run before the plan, one per LoRA linear layer.
    """

    def __init__(self, engine, trainer_model: torch.nn.Module):
        self.engine = engine
        check_same_architecture(engine.spec, decoder_spec_from_hf(trainer_model))
        model = unwrap_hf_model(trainer_model)
        _check_device(engine, model)
        self.mapping: list[MappedWeight] = []
        self.lora_merges: list[LoraMerge] = []
        destinations: list[torch.Tensor] = []
        sources: list[torch.Tensor] = []
        for hf_name, module, attribute, engine_slot, view in weight_pairs(model, engine):
            self.mapping.append(MappedWeight(hf_name, engine_slot))
            source = self._source(module, attribute, view, hf_name)
            _check_shape(view, source if source is not None else _base_layer(module).weight, hf_name, engine_slot)
            if source is not None:
                destinations.append(view)
                sources.append(source)
        self.plan = EngineCopy(destinations, sources)

    def _source(self, module: torch.nn.Module, attribute: str, view: torch.Tensor, hf_name: str):
        """The tensor the plan copies into `view`, or None when a LoRA merge writes `view` itself."""
        module = _active_module(module)
        if _is_lora_layer(module):
            if len(getattr(module, "lora_embedding_A", ())):
                raise ValueError(f"{hf_name}: LoRA on the embeddings is not supported by the engine refit")
            if attribute == "weight":
                return self._lora_merge_source(module, view, hf_name)
            module = module.get_base_layer()
        # The parameter itself, not a detached alias: the plan then notices if its storage is replaced.
        return getattr(module, attribute)

    def _lora_merge_source(self, layer: torch.nn.Module, view: Destination, hf_name: str):
        """Registers the LoRA merge of `layer`: into `view` when it is a plain buffer of the merge
        dtype (returns None), else into a buffer allocated here, which it returns for the plan to
        cast (or pack) into `view`."""
        merge_dtype = _merge_dtype(layer)
        if isinstance(view, torch.Tensor) and merge_dtype == view.dtype:
            self.lora_merges.append(LoraMerge(layer, view, name=hf_name))
            return None
        base_weight = layer.get_base_layer().weight
        buffer = torch.empty(base_weight.shape, dtype=merge_dtype, device=base_weight.device)
        self.lora_merges.append(LoraMerge(layer, buffer, name=hf_name))
        return buffer

    @torch.no_grad()
    def refit(self) -> None:
        """Write the trainer's current (effective) weights into the engine's buffers, in place."""
        for merge in self.lora_merges:
            merge.apply()
        self.plan.apply()
        self.engine.weights_written()


def check_same_architecture(engine_spec, trainer_spec) -> None:
    """Raise ValueError naming every field in which two `DecoderSpec`s differ (an engine and the
    trainer model that refits it must agree in all of them)."""
    differing = [
        field.name
        for field in fields(engine_spec)
        if field.name != "inv_freq" and getattr(engine_spec, field.name) != getattr(trainer_spec, field.name)
    ]
    if not torch.equal(engine_spec.inv_freq, trainer_spec.inv_freq):
        differing.append("inv_freq")
    if differing:
        details = ", ".join(
            f"{name} (engine {getattr(engine_spec, name)!r}, trainer {getattr(trainer_spec, name)!r})"
            for name in differing if name != "inv_freq"
        ) or "rotary frequencies"
        raise ValueError(f"EngineRefitter: the trainer model differs from the engine's architecture: {details}")


def _check_device(engine, model: torch.nn.Module) -> None:
    trainer_device = next(model.parameters()).device
    if trainer_device != engine.device:
        raise ValueError(
            f"EngineRefitter: the trainer model is on {trainer_device} but the engine on {engine.device}; "
            "refit copies within one device"
        )


def _check_shape(view: Destination, source: torch.Tensor, hf_name: str, engine_slot: str) -> None:
    if tuple(view.shape) != tuple(source.shape):
        raise ValueError(
            f"EngineRefitter: {hf_name} has shape {tuple(source.shape)} but engine {engine_slot} has "
            f"{tuple(view.shape)}"
        )


def _split(views: list[Destination], sources: list[torch.Tensor]):
    """(plain destinations, their sources, packed destinations, their sources)."""
    plain, plain_sources, packed, packed_sources = [], [], [], []
    for view, source in zip(views, sources, strict=True):
        if isinstance(view, PackedRows):
            packed.append(view)
            packed_sources.append(source)
        else:
            plain.append(view)
            plain_sources.append(source)
    return plain, plain_sources, packed, packed_sources


def _packed_args(packed: list[PackedRows]) -> dict:
    return {"blocks": [part.block for part in packed], "pairs": [part.pair for part in packed]}


class EngineCopy:
    """Copies fixed sources into engine `Destination`s, checked once, re-run by `apply()`: the plain
    ones through one `stema_kernels.RefitPlan`, the packed ones through one `PackRowsPlan`."""

    def __init__(self, views: list[Destination], sources: list[torch.Tensor]):
        plain, plain_sources, packed, packed_sources = _split(views, sources)
        self.plain = RefitPlan(plain, plain_sources)
        self.packed = PackRowsPlan([part.buffer for part in packed], packed_sources, **_packed_args(packed))

    def __len__(self) -> int:
        return len(self.plain) + len(self.packed)

    def apply(self) -> None:
        self.plain.apply()
        self.packed.apply()


def copy_into(views: list[Destination], sources: list[torch.Tensor]) -> None:
    """Copy (cast, pack) each source into its engine `Destination` once: `refit_` and `pack_rows_`."""
    plain, plain_sources, packed, packed_sources = _split(views, sources)
    refit_(plain, plain_sources)
    if packed:
        pack_rows_([part.buffer for part in packed], [source.contiguous() for source in packed_sources],
                   **_packed_args(packed))


def _row_blocks(sizes: tuple[int, ...]) -> list[tuple[int, int]]:
    """[(start, end)] of consecutive row blocks of the given sizes."""
    blocks, start = [], 0
    for size in sizes:
        blocks.append((start, start + size))
        start += size
    return blocks


def _linear_destination(engine, name: str, index: int, start: int, end: int) -> Destination:
    """Rows [start, end) of linear weight `name` (of layer `index`; "lm_head"): its packed rows
    when the engine keeps it only packed, else a view of the plain buffer."""
    packed = engine.decoder.packed
    if packed is not None and packed.in_place:
        return packed.rows(name, index, start, end)
    weights = engine.weights
    buffer = weights.lm_head if name == "lm_head" else getattr(weights, f"{name}_weight")[index]
    return buffer[start:end]


def weight_pairs(model: torch.nn.Module, engine):
    """Yields (hf_name, module, attribute, engine_slot, engine `Destination`) for every weight of
    `model` (the unwrapped causal LM) that `engine` holds, in the order refits copy them."""
    spec, weights = engine.spec, engine.weights
    d = spec.head_dim
    qkv_blocks = _row_blocks((spec.num_heads * d, spec.num_kv_heads * d, spec.num_kv_heads * d))
    gate_up_blocks = _row_blocks((spec.intermediate_size, spec.intermediate_size))
    hidden, vocab = spec.hidden_size, spec.vocab_size
    decoder = model.model
    # Tied: the lm_head's destination (the embedding buffer itself, or the packed lm_head in which
    # the engine looks tokens up).
    embed = _linear_destination(engine, "lm_head", 0, 0, vocab) if spec.tied_embeddings else weights.embed
    yield "model.embed_tokens.weight", decoder.embed_tokens, "weight", "embed", embed
    for index, layer in enumerate(decoder.layers):
        prefix = f"model.layers.{index}"
        yield (f"{prefix}.input_layernorm.weight", layer.input_layernorm, "weight", f"input_norm[{index}]",
               weights.input_norm[index])
        yield (f"{prefix}.post_attention_layernorm.weight", layer.post_attention_layernorm, "weight",
               f"post_norm[{index}]", weights.post_norm[index])
        attention, mlp = layer.self_attn, layer.mlp
        for projection, (start, end) in zip(("q_proj", "k_proj", "v_proj"), qkv_blocks):
            module, name = getattr(attention, projection), f"{prefix}.self_attn.{projection}"
            slot = f"[{index}, {start}:{end}]"
            yield f"{name}.weight", module, "weight", f"qkv_weight{slot}", _linear_destination(engine, "qkv", index, start, end)
            if weights.qkv_bias is not None:
                yield f"{name}.bias", module, "bias", f"qkv_bias{slot}", weights.qkv_bias[index, start:end]
        yield (f"{prefix}.self_attn.o_proj.weight", attention.o_proj, "weight", f"o_weight[{index}]",
               _linear_destination(engine, "o", index, 0, hidden))
        if weights.o_bias is not None:
            yield f"{prefix}.self_attn.o_proj.bias", attention.o_proj, "bias", f"o_bias[{index}]", weights.o_bias[index]
        for projection, (start, end) in zip(("gate_proj", "up_proj"), gate_up_blocks):
            module, name = getattr(mlp, projection), f"{prefix}.mlp.{projection}"
            slot = f"[{index}, {start}:{end}]"
            yield (f"{name}.weight", module, "weight", f"gate_up_weight{slot}",
                   _linear_destination(engine, "gate_up", index, start, end))
            if weights.gate_up_bias is not None:
                yield f"{name}.bias", module, "bias", f"gate_up_bias{slot}", weights.gate_up_bias[index, start:end]
        yield (f"{prefix}.mlp.down_proj.weight", mlp.down_proj, "weight", f"down_weight[{index}]",
               _linear_destination(engine, "down", index, 0, hidden))
        if weights.down_bias is not None:
            yield f"{prefix}.mlp.down_proj.bias", mlp.down_proj, "bias", f"down_bias[{index}]", weights.down_bias[index]
    yield "model.norm.weight", decoder.norm, "weight", "final_norm", weights.final_norm
    if not spec.tied_embeddings:
        yield "lm_head.weight", model.lm_head, "weight", "lm_head", _linear_destination(engine, "lm_head", 0, 0, vocab)
