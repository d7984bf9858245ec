"""The one seam between a Hugging Face model and the ranks that share it: tensor parallel (DTensor
plans) on the mesh's "tp" dimension, then FSDP2 (`fully_shard` per decoder layer, then the root)
on its "dp" dimension.

    model = parallelize(model, mesh=world.mesh, mixed_precision="bf16")
    model = parallelize(meta_model, mesh=world.mesh, full_state_dict=weights_on_rank0_else_empty)

Order (torchtitan's): build (real weights, or on the meta device) -> shard -> load the full state
dict (rank 0's, broadcast) -> assert nothing is left on meta.

Gradients are SUMMED over the data-parallel ranks (FSDP2 averages by default): STEMA's losses are
already divided by global denominators (tokens, pairs of the whole global batch), so each rank's
gradient is its share of the global one and the sum is the full-batch gradient.
"""

from __future__ import annotations

from typing import Any

import torch

from stema.models.loading import unwrap_lora

# Families whose decoder layers have q/k/v/o_proj attention and gate/up/down_proj MLPs.
TENSOR_PARALLEL_FAMILIES = ("llama", "qwen2", "mistral")


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether `model` was given to `fully_shard` (its class is then an FSDPModule)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def backbone_of(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer inside a causal LM / sequence classifier (`model.model`, `transformer`, ...)."""
    hf_model = unwrap_lora(model)
    backbone = getattr(hf_model, hf_model.base_model_prefix, None)
    if backbone is None:
        raise ValueError(f"{type(hf_model).__name__} has no '{hf_model.base_model_prefix}' backbone to parallelize")
    return backbone


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of a Hugging Face model, in order (`layers` or GPT-2's `h`; a pipeline
    stage's ModuleDict of its layers by index)."""
    backbone = backbone_of(model)
    for name in ("layers", "h"):
        layers = getattr(backbone, name, None)
        if isinstance(layers, torch.nn.ModuleList):
            return list(layers)
        if isinstance(layers, torch.nn.ModuleDict):
            return list(layers.values())
    raise ValueError(f"{type(backbone).__name__} has no 'layers' or 'h' list of decoder layers to shard")


def tensor_parallel_plan(model: torch.nn.Module) -> dict[str, Any]:
    """DTensor `parallelize_module` plan, module name -> style, for a Llama / Qwen2 / Mistral model:
    q/k/v and gate/up projections column-wise (each rank a slice of the heads / MLP width), o and
    down projections row-wise (partial sums all-reduced), the token embedding and LM head
    vocabulary-parallel (the logits are gathered whole). Norms and a reward head stay replicated."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    hf_model = unwrap_lora(model)
    family = hf_model.config.model_type
    if family not in TENSOR_PARALLEL_FAMILIES:
        raise ValueError(
            f"distributed.tp_size > 1: tensor parallel supports the {', '.join(TENSOR_PARALLEL_FAMILIES)} families, "
            f"not {family!r}; use tp_size 1 (FSDP only)"
        )
    names = {module: name for name, module in hf_model.named_modules()}
    plan: dict[str, Any] = {}
    embedding = backbone_of(hf_model).embed_tokens  # None on a pipeline stage after the first
    if embedding is not None:
        plan[names[embedding]] = RowwiseParallel(input_layouts=Replicate())
    for layer in decoder_layers(hf_model):
        prefix = names[layer]
        for projection in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            plan[f"{prefix}.{projection}"] = ColwiseParallel()
        for projection in ("self_attn.o_proj", "mlp.down_proj"):
            plan[f"{prefix}.{projection}"] = RowwiseParallel()
    head = hf_model.get_output_embeddings()
    if head is not None:
        plan[names[head]] = ColwiseParallel(output_layouts=Replicate())
    return plan


def apply_tensor_parallel(model: torch.nn.Module, tp_mesh: Any) -> None:
    """Shard `model` in place by `tensor_parallel_plan` over the 1-D `tp_mesh`; a tied LM head is
    tied again to the (identically sharded) embedding afterwards."""
    from torch.distributed.tensor.parallel import parallelize_module

    hf_model = unwrap_lora(model)
    head, embedding = hf_model.get_output_embeddings(), hf_model.get_input_embeddings()
    tied = head is not None and embedding is not None and head.weight is embedding.weight
    num_heads, num_kv_heads = hf_model.config.num_attention_heads, hf_model.config.num_key_value_heads
    if num_heads % tp_mesh.size() or num_kv_heads % tp_mesh.size():
        raise ValueError(
            f"distributed.tp_size={tp_mesh.size()} must divide the attention heads ({num_heads}) and key/value heads ({num_kv_heads})"
        )
    parallelize_module(hf_model, tp_mesh, tensor_parallel_plan(hf_model))
    if tied:
        hf_model.get_output_embeddings().weight = hf_model.get_input_embeddings().weight


def restore_non_persistent_buffers(model: torch.nn.Module, device: torch.device) -> None:
    """After `to_empty`, buffers outside the state dict (rotary `inv_freq`) hold garbage: rebuild
    each module that has such a buffer from its `config` (Hugging Face rotary embeddings do) and
    copy the fresh buffers in."""
    for module in model.modules():
        non_persistent = getattr(module, "_non_persistent_buffers_set", set())
        if not non_persistent:
            continue
        config = getattr(module, "config", None)
        if config is None:
            raise ValueError(f"{type(module).__name__} has non-persistent buffers {sorted(non_persistent)} and no config to rebuild them from")
        fresh = type(module)(config)
        for name in non_persistent:
            setattr(module, name, getattr(fresh, name).to(device))


def parallelize(
    model: torch.nn.Module,
    *,
    mesh: Any,
    mixed_precision: str = "none",
    cpu_offload: bool = False,
    full_state_dict: dict[str, torch.Tensor] | None = None,
) -> torch.nn.Module:
    """`model` sharded over the 2-D device `mesh` ("dp", "tp"), in place; returns it.

    1. tp size > 1: `apply_tensor_parallel` on mesh["tp"];
    2. `fully_shard` each decoder layer, then (inside a peft LoRA wrapper) the Hugging Face model,
       then the root, on mesh["dp"] with `mixed_precision`
       ('bf16': bf16 compute copies, fp32 gradient reduction) and `cpu_offload`; gradients summed;
    3. a model built on the meta device is materialized on the mesh's device and
       `full_state_dict` (all weights on rank 0; other ranks may pass {}) is loaded, broadcast from
       rank 0;
    4. nothing may be left on the meta device.
    """
    if mesh["tp"].size() > 1:
        apply_tensor_parallel(model, mesh["tp"])
    hf_model = unwrap_lora(model)
    # A peft model: its Hugging Face model (embedding, final norm, head) is a group of its own
    # under the wrapper, so code that looks through the wrapper sees a sharded model (and runs
    # the model's own forward, the one that gathers those weights).
    roots = [model] if hf_model is model else [hf_model, model]
    shard_with_fsdp(model, mesh=mesh, roots=roots, mixed_precision=mixed_precision, cpu_offload=cpu_offload)

    on_meta = any(tensor.is_meta for tensor in [*model.parameters(), *model.buffers()])
    if on_meta:
        if full_state_dict is None:
            raise ValueError("parallelize: the model is on the meta device; pass full_state_dict (rank 0's weights)")
        on_gpu = mesh.device_type == "cuda" and not cpu_offload
        device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
        model.to_empty(device=device)
        restore_non_persistent_buffers(model, device)
    if full_state_dict is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, full_state_dict, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    left = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if left:
        raise RuntimeError(f"parallelize: {len(left)} tensors are still on the meta device after loading (first: {left[:3]})")
    return model


def shard_with_fsdp(model: torch.nn.Module, *, mesh: Any, roots: list[torch.nn.Module], mixed_precision: str,
                    cpu_offload: bool) -> None:
    """`fully_shard` each decoder layer of `model`, then each of `roots` in order (the modules
    whose forward runs the rest: the model itself, or a pipeline rank's stages), on mesh["dp"]
    with `mixed_precision` ('bf16': bf16 compute copies, fp32 gradient reduction) and
    `cpu_offload`; gradients summed over the data-parallel ranks, not averaged."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    policy = MixedPrecisionPolicy()
    if mixed_precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    elif mixed_precision != "none":
        raise ValueError(f"distributed.mixed_precision: expected 'none' or 'bf16', got {mixed_precision!r}")
    options = dict(mesh=mesh["dp"], mp_policy=policy, offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy())
    for layer in decoder_layers(model):
        fully_shard(layer, **options)
    for root in roots:
        fully_shard(root, **options)
    for module in [*model.modules(), *roots]:
        if is_sharded(module):
            module.set_gradient_divide_factor(1.0)
            # Plain SUM reductions (gloo has no pre-multiplied sum; NCCL then copies less).
            module.set_force_sum_reduction_for_comms(True)


def set_gradient_sync(model: torch.nn.Module, enabled: bool) -> None:
    """Whether the next backward reduces gradients across ranks (off for all but the last
    micro-batch of a step: gradients accumulate locally, one reduce-scatter per step). A no-op
    for a model that is not sharded."""
    if is_sharded(model):
        model.set_requires_gradient_sync(enabled)


def reshard(model: torch.nn.Module) -> None:
    """Put a sharded model's parameters back in their sharded form. FSDP2 keeps the root's
    parameters gathered after a forward until the backward that follows; after a forward without
    one (no_grad evaluation, reference log-probs) `model.parameters()` would hand an optimizer the
    gathered copies instead of the shards. A no-op for a model that is not sharded."""
    for module in model.modules():
        if is_sharded(module):
            module.reshard()


def clip_grad_norm_(parameters: list[torch.nn.Parameter], max_norm: float, *, pipeline_group: Any = None) -> float:
    """Scale the gradients of `parameters` so that their global L2 norm is at most `max_norm`;
    returns the norm before clipping (of the whole model, gathered over the ranks).

    Plain tensors go to `torch.nn.utils.clip_grad_norm_`. Sharded gradients may live on different
    meshes (tensor-parallel weights on ("dp", "tp"), replicated norms on "dp" only), which one
    DTensor reduction cannot mix: the norm is taken per mesh, gathered, and combined. With a
    `pipeline_group` (each rank holding some stages' parameters) the squared norms are also
    summed over the pipeline stages."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    if pipeline_group is None and not any(isinstance(grad, DTensor) for grad in grads):
        return float(torch.nn.utils.clip_grad_norm_(parameters, max_norm))
    by_mesh: dict[Any, list[torch.Tensor]] = {}
    for grad in grads:
        by_mesh.setdefault(grad.device_mesh if isinstance(grad, DTensor) else None, []).append(grad)
    squares = 0.0
    for group in by_mesh.values():
        norm = torch.nn.utils.get_total_norm(group, norm_type=2.0)
        squares += float(norm.full_tensor() if isinstance(norm, DTensor) else norm) ** 2
    if pipeline_group is not None:
        import torch.distributed as dist

        summed = torch.tensor([squares], dtype=torch.float64, device=grads[0].device if grads else "cpu")
        dist.all_reduce(summed, group=pipeline_group)
        squares = float(summed)
    total = squares**0.5
    scale = min(1.0, max_norm / (total + 1e-6))
    for grad in grads:
        grad.mul_(scale)
    return total
