"""The engine's own decoder: inference-only Llama-family forward over fused weights and a static
KV cache, in plain PyTorch.

Layout (L layers, H query heads, KV key/value heads, d = head_dim, I = intermediate size):

    qkv_weight      [L, (H + 2 KV) d, hidden]   rows: q heads, then k heads, then v heads
    gate_up_weight  [L, 2 I, hidden]            rows: gate, then up
    KV cache        [L, 2, max_batch, KV, max_total_len, d]   (index 0: keys after rotary, 1: values)

Each step runs tokens at cache columns [start, start + q) of the first n batch slots, or (continuous
batching, where every slot holds a sequence of its own length) right-padded prompts into columns
[0, L) of any slots, or one token per slot at a column of each slot's own. Which cached columns a row may
attend to is given by a key mask `key_valid [n, columns]`: a prompt's padding columns are False, so
padding is never attended (a padding query attends to itself only, which keeps its values finite). The arithmetic follows transformers' Llama: RMSNorm in fp32 then cast
back, rotary cos/sin computed in fp32 from `position * inv_freq` then cast to the compute dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from .architecture import DecoderSpec
from .packed import PackedLinears


@dataclass
class DecoderWeights:
    """The engine's inference copy of the weights, in its own fused layout (see the module
    docstring). Buffers are plain tensors (no autograd), allocated once; refit writes into them.
    An engine whose linear weights live only in their oneDNN-packed form (`PackedLinears.in_place`)
    releases the plain linear buffers: `lm_head` and the four `*_weight` fields are None, and so is
    `embed` when the embeddings are tied (tokens are looked up in the packed lm_head).
    `lm_head` is the same tensor as `embed` when the model ties them; optional biases are None
    when the model has none.
    """

    embed: torch.Tensor | None  # [V, hidden]
    lm_head: torch.Tensor | None  # [V, hidden]
    final_norm: torch.Tensor  # [hidden]
    input_norm: torch.Tensor  # [L, hidden]
    post_norm: torch.Tensor  # [L, hidden]
    qkv_weight: torch.Tensor | None  # [L, (H + 2 KV) d, hidden]
    o_weight: torch.Tensor | None  # [L, hidden, H d]
    gate_up_weight: torch.Tensor | None  # [L, 2 I, hidden]
    down_weight: torch.Tensor | None  # [L, hidden, I]
    qkv_bias: torch.Tensor | None = None  # [L, (H + 2 KV) d]
    o_bias: torch.Tensor | None = None  # [L, hidden]
    gate_up_bias: torch.Tensor | None = None  # [L, 2 I]
    down_bias: torch.Tensor | None = None  # [L, hidden]

    @classmethod
    def allocate(cls, spec: DecoderSpec, *, dtype: torch.dtype, device: torch.device) -> DecoderWeights:
        """Uninitialized buffers for `spec` (refit fills them)."""
        L, h, i = spec.num_layers, spec.hidden_size, spec.intermediate_size

        def empty(*shape: int) -> torch.Tensor:
            return torch.empty(shape, dtype=dtype, device=device)

        embed = empty(spec.vocab_size, h)
        return cls(
            embed=embed,
            lm_head=embed if spec.tied_embeddings else empty(spec.vocab_size, h),
            final_norm=empty(h),
            input_norm=empty(L, h),
            post_norm=empty(L, h),
            qkv_weight=empty(L, spec.qkv_rows, h),
            o_weight=empty(L, h, spec.num_heads * spec.head_dim),
            gate_up_weight=empty(L, 2 * i, h),
            down_weight=empty(L, h, i),
            qkv_bias=empty(L, spec.qkv_rows) if spec.qkv_bias else None,
            o_bias=empty(L, h) if spec.o_bias else None,
            gate_up_bias=empty(L, 2 * i) if spec.mlp_bias else None,
            down_bias=empty(L, h) if spec.mlp_bias else None,
        )

    def buffers(self) -> dict[str, torch.Tensor]:
        """Every distinct buffer by field name (a tied lm_head is listed once, as `embed`)."""
        named = {}
        for field in fields(self):
            tensor = getattr(self, field.name)
            if tensor is not None and not any(tensor is seen for seen in named.values()):
                named[field.name] = tensor
        return named


@dataclass
class StaticKVCache:
    """Keys and values of every layer, `[L, 2, max_batch, KV, max_total_len, d]`, allocated once.

    `key_valid [max_batch, max_total_len]` marks the columns each batch slot may attend to.
    """

    tensor: torch.Tensor
    key_valid: torch.Tensor

    @classmethod
    def allocate(cls, spec: DecoderSpec, *, max_batch: int, max_total_len: int, dtype: torch.dtype,
                 device: torch.device) -> StaticKVCache:
        shape = (spec.num_layers, 2, max_batch, spec.num_kv_heads, max_total_len, spec.head_dim)
        return cls(
            tensor=torch.zeros(shape, dtype=dtype, device=device),
            key_valid=torch.zeros(max_batch, max_total_len, dtype=torch.bool, device=device),
        )

    @property
    def max_batch(self) -> int:
        return self.tensor.shape[2]

    @property
    def max_total_len(self) -> int:
        return self.tensor.shape[4]

    def copy_slots(self, sources: torch.Tensor, targets: torch.Tensor, *, columns: int) -> None:
        """Slot targets[j] gets slot sources[j]'s keys, values and key mask, first `columns` only
        (no target is also a source)."""
        self.tensor[:, :, targets, :, :columns] = self.tensor[:, :, sources, :, :columns]
        self.key_valid[targets] = False
        self.key_valid[targets, :columns] = self.key_valid[sources, :columns]

    def compact(self, keep: list[int], *, columns: int) -> None:
        """Move batch slots `keep` (increasing) to slots 0 .. len(keep) - 1, first `columns` only.

        In place and without allocation: slot keep[j] >= j, and moving in increasing order never
        overwrites a slot that is still to be read.
        """
        for target, source in enumerate(keep):
            if target != source:
                self.tensor[:, :, target, :, :columns].copy_(self.tensor[:, :, source, :, :columns])
                self.key_valid[target, :columns].copy_(self.key_valid[source, :columns])


@dataclass
class RotaryTable:
    """cos and sin `[max_total_len, d]` of every position, in the compute dtype."""

    cos: torch.Tensor
    sin: torch.Tensor

    @classmethod
    def build(cls, inv_freq: torch.Tensor, *, max_positions: int, dtype: torch.dtype,
              device: torch.device) -> RotaryTable:
        """As transformers computes them: fp32 `position * inv_freq`, duplicated to d, cast last."""
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]  # [P, d / 2]
        angles = torch.cat((freqs, freqs), dim=-1)  # [P, d]
        return cls(angles.cos().to(device=device, dtype=dtype), angles.sin().to(device=device, dtype=dtype))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps), the statistics in fp32; x [..., hidden]."""
    x32 = x.to(torch.float32)
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [n, heads, q, d] rotated by cos, sin [n, 1, q, d]."""
    return x * cos + _rotate_half(x) * sin


def per_row_attention_mask(key_valid: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """[n, 1, 1, end] bool for one query per row at column columns[row]: the row's valid keys at
    columns <= its own, and always itself. key_valid: [n, end] bool; columns: [n] int64."""
    key_index = torch.arange(key_valid.shape[1], device=key_valid.device)
    causal = key_index[None, :] <= columns[:, None]  # [n, end]
    itself = key_index[None, :] == columns[:, None]
    return ((key_valid & causal) | itself)[:, None, None]


def attention_mask(key_valid: torch.Tensor, *, start: int, query_len: int) -> torch.Tensor:
    """[n, 1, q, start + q] bool: query j (column start + j) sees valid keys at columns <= its own,
    and always itself (so a padding query has one key and a finite output).

    key_valid: [n, start + q] bool.
    """
    columns = start + query_len
    key_index = torch.arange(columns, device=key_valid.device)
    query_column = start + torch.arange(query_len, device=key_valid.device)
    causal = key_index[None, :] <= query_column[:, None]  # [q, columns]
    itself = key_index[None, :] == query_column[:, None]
    allowed = (key_valid[:, None, :] & causal[None]) | itself[None]  # [n, q, columns]
    return allowed[:, None]


def additive_bias(mask: torch.Tensor) -> torch.Tensor:
    """fp32 0 where the bool `mask` allows a key, -inf elsewhere (same shape)."""
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, -math.inf)


def single_query_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, *, bias: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v for ONE query per row: q [n, H, 1, d], keys and values
    [n, KV, T, d] (H a multiple of KV: grouped-query heads share their key/value head), bias
    [n, 1, 1, T] fp32 additive (`additive_bias`) -> [n, H, 1, d].

    Why not scaled_dot_product_attention: with one query, torch's CPU flash kernel runs tiny
    blocked GEMMs per (row, head) with a large per-call cost (in bf16 about 2x this function's time
    at batch 64, 55M model). Here the query heads of a key/value head form the rows of one matmul,
    scores go to fp32 before scaling and softmax, and the probabilities are cast to the values'
    dtype for the second matmul (in fp32 the same arithmetic as the math path; in bf16 the scores
    are rounded to bf16 once, a relative error of at most 2^-8 before the softmax)."""
    n, heads, _, d = q.shape
    kv_heads = keys.shape[1]
    grouped = q.view(n, kv_heads, heads // kv_heads, d)  # [n, KV, H / KV, d]
    scores = torch.matmul(grouped, keys.transpose(-1, -2)).float().mul_(scale).add_(bias)  # [n, KV, H / KV, T]
    out = torch.matmul(scores.softmax(dim=-1).to(values.dtype), values)  # [n, KV, H / KV, d]
    return out.view(n, heads, 1, d)


class Decoder:
    """The forward pass over `DecoderWeights`, writing keys and values into a `StaticKVCache`."""

    def __init__(self, spec: DecoderSpec, weights: DecoderWeights, cache: StaticKVCache, rotary: RotaryTable, *,
                 packed: PackedLinears | None = None):
        self.spec = spec
        self.weights = weights
        self.cache = cache
        self.rotary = rotary
        self.packed = packed
        # One query per row through `single_query_attention` over the whole cache block: measured on the CPU
        # only; on CUDA scaled_dot_product_attention's fused kernels keep serving it, over the filled columns.
        self.single_query_matmuls = cache.tensor.device.type == "cpu"

    def _linear(self, x: torch.Tensor, name: str, index: int, bias: torch.Tensor | None) -> torch.Tensor:
        """x @ weight^T + bias for the linear weight `name` ("qkv", "o", "gate_up", "down": of layer
        `index`; "lm_head"), through its packed copy when there is one."""
        if self.packed is not None:
            return self.packed.linear(x, name, index, bias)
        weight = self.weights.lm_head if name == "lm_head" else getattr(self.weights, f"{name}_weight")[index]
        return F.linear(x, weight, bias)

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor, *, start: int) -> torch.Tensor:
        """Final-norm hidden states [n, q, hidden] of tokens input_ids [n, q] at rotary positions
        [n, q], written to cache columns [start, start + q) of slots 0 .. n - 1.

        The slots' `cache.key_valid[:n, :start + q]` must already be set.
        """
        n, query_len = input_ids.shape
        slots = slice(0, n)
        end = start + query_len
        mask = attention_mask(self.cache.key_valid[slots, :end], start=start, query_len=query_len)

        def store(layer_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            layer_cache[0, slots, :, start:end] = k
            layer_cache[1, slots, :, start:end] = v
            return layer_cache[0, slots, :, :end], layer_cache[1, slots, :, :end]

        return self._layers(input_ids, positions, mask=mask, store=store)

    def prefill_hidden_states(self, input_ids: torch.Tensor, valid: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states [m, L, hidden] of RIGHT-padded prompts input_ids [m, L]
        (valid [m, L]: False at padding) written to columns [0, L) of cache slots `slots` [m] (any
        slots); the rotary position is the column. Sets those slots' key mask (padding False,
        later columns False). Attention reads the prompts' own keys, not the cache."""
        length = input_ids.shape[1]
        self.cache.key_valid[slots] = False
        self.cache.key_valid[slots, :length] = valid
        mask = attention_mask(valid, start=0, query_len=length)
        positions = torch.arange(length, device=input_ids.device).expand_as(input_ids)

        def store(layer_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            layer_cache[0][slots, :, :length] = k
            layer_cache[1][slots, :, :length] = v
            return k, v

        return self._layers(input_ids, positions, mask=mask, store=store)

    def decode_hidden_states(self, tokens: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states [n, hidden] of one token per slot 0 .. n - 1, tokens [n] at
        cache columns [n] (each slot its own; the rotary position is the column: a continuously
        batched sequence starts at column 0 of its slot). Marks those columns valid."""
        n = len(tokens)
        rows = torch.arange(n, device=tokens.device)
        self.cache.key_valid[rows, columns] = True
        _, kv_heads, max_total_len, d = self.cache.tensor.shape[2:]
        # On the CPU attention reads every column of the n slots: [n, KV, T, d] is one contiguous block per
        # layer, which the batched matmuls take as it is (a slice up to the furthest column would be copied in
        # bf16); columns beyond a slot's own get probability exactly 0 (their cached values are finite: zeros
        # from the allocation or keys/values written earlier, so 0 * value adds nothing).
        end = max_total_len if self.single_query_matmuls else int(columns.max()) + 1
        mask = per_row_attention_mask(self.cache.key_valid[:n, :end], columns)
        heads = torch.arange(kv_heads, device=tokens.device)
        # Row of (slot, head, column) in a layer's keys viewed as [B * KV * T, d], for every slot and head: [n * KV].
        flat_rows = ((rows[:, None] * kv_heads + heads) * max_total_len + columns[:, None]).flatten()

        def store(layer_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            layer_cache[0].view(-1, d).index_copy_(0, flat_rows, k.reshape(n * kv_heads, d))  # [n, KV, 1, d]
            layer_cache[1].view(-1, d).index_copy_(0, flat_rows, v.reshape(n * kv_heads, d))
            return layer_cache[0, :n, :, :end], layer_cache[1, :n, :, :end]

        hidden = self._layers(tokens[:, None], columns[:, None], mask=mask, store=store)
        return hidden[:, 0]

    def _layers(self, input_ids: torch.Tensor, positions: torch.Tensor, *, mask: torch.Tensor, store) -> torch.Tensor:
        """Every decoder layer and the final norm over input_ids [n, q] at positions [n, q].
        `store(layer_cache, k, v)` writes a layer's keys and values [n, KV, q, d] into the cache and
        returns the keys and values [n, KV, keys, d] attention reads, under `mask` [n, 1, q, keys]
        (bool; with one query per row on the CPU it becomes an fp32 additive bias, `single_query_attention`)."""
        weights, spec = self.weights, self.spec
        if input_ids.shape[1] == 1 and self.single_query_matmuls:
            mask = additive_bias(mask)  # once per step for `single_query_attention`
        cos = self.rotary.cos[positions][:, None]  # [n, 1, q, d]
        sin = self.rotary.sin[positions][:, None]
        if weights.embed is not None:
            x = F.embedding(input_ids, weights.embed)  # [n, q, hidden]
        else:  # tied embeddings kept only in the packed lm_head
            x = self.packed.embedding(input_ids)
        for layer in range(spec.num_layers):
            x = x + self._attention(layer, rms_norm(x, weights.input_norm[layer], spec.rms_norm_eps),
                                    cos=cos, sin=sin, mask=mask, store=store)
            x = x + self._mlp(layer, rms_norm(x, weights.post_norm[layer], spec.rms_norm_eps))
        return rms_norm(x, weights.final_norm, spec.rms_norm_eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., V] logits in the compute dtype from hidden states [..., hidden]."""
        return self._linear(hidden, "lm_head", 0, None)

    def _attention(self, layer: int, x: torch.Tensor, *, cos: torch.Tensor, sin: torch.Tensor,
                   mask: torch.Tensor, store) -> torch.Tensor:
        """Self-attention output [n, q, hidden] of normed x [n, q, hidden]; caches keys/values
        through `store` (see `_layers`)."""
        spec, weights = self.spec, self.weights
        n, query_len, _ = x.shape
        H, KV, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
        bias = None if weights.qkv_bias is None else weights.qkv_bias[layer]
        qkv = self._linear(x, "qkv", layer, bias)  # [n, q, (H + 2 KV) d]
        q, k, v = qkv.split((H * d, KV * d, KV * d), dim=-1)
        q = apply_rotary(q.view(n, query_len, H, d).transpose(1, 2), cos, sin)  # [n, H, q, d]
        k = apply_rotary(k.view(n, query_len, KV, d).transpose(1, 2), cos, sin)  # [n, KV, q, d]
        layer_cache = self.cache.tensor[layer]  # [2, B, KV, T, d]
        keys, values = store(layer_cache, k, v.view(n, query_len, KV, d).transpose(1, 2))
        if query_len == 1 and self.single_query_matmuls:
            out = single_query_attention(q, keys, values, bias=mask, scale=d**-0.5)
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=d**-0.5,
                                                 enable_gqa=H != KV)  # [n, H, q, d]
        out = out.transpose(1, 2).reshape(n, query_len, H * d)
        return self._linear(out, "o", layer, None if weights.o_bias is None else weights.o_bias[layer])

    def _mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU: down(silu(gate(x)) * up(x)), x [n, q, hidden]."""
        weights = self.weights
        bias = None if weights.gate_up_bias is None else weights.gate_up_bias[layer]
        gate, up = self._linear(x, "gate_up", layer, bias).chunk(2, dim=-1)  # [n, q, I] each
        down_bias = None if weights.down_bias is None else weights.down_bias[layer]
        return self._linear(F.silu(gate) * up, "down", layer, down_bias)
