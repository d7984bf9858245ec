"""The engine's oneDNN-prepacked linear weights on the CPU, and refit straight into them.

At decoding batch sizes torch's CPU linear repacks the weight into the GEMM library's blocked layout
on every call; packed once, the 55M benchmark model (benchmarks/bench_rollout.py) decodes about 1.6x
faster at batch 8 in fp32 and bf16, and its lm_head GEMM runs about 1.8x faster at batch 64
(measured on an AMD EPYC with AVX-512, one thread). torch's API packs only into newly allocated
tensors (`torch.ops.mkldnn._reorder_linear_weight`), which made every refit a copy plus a repack of
every matrix: about 4x the copy alone.

So `PackedLinears` learns, once per weight shape, where oneDNN puts each element: it packs a probe
matrix with oneDNN and compares the bytes (read through `torch.ops.mkldnn.data_ptr`) with
`stema_kernels.pack_rows_`'s row-block layout for each candidate (block rows, column pair). When
every linear weight's layout is known and every fused slice (q/k/v rows, gate/up rows) starts on a
block, the engine keeps its linear weights ONLY in the packed buffers ("in place"): refitters write
the trainer's weights straight into them (`PackedRows` destinations, one `pack_rows_` pass: a
blocked transpose, no allocation, no oneDNN call), and the plain buffers of those weights are
freed; with tied embeddings the plain embedding too, tokens being looked up in the packed lm_head
(`embedding`). Otherwise (a layout with padding, such as a vocabulary that is not a multiple of the block;
an unknown format) the engine keeps the plain buffers and repacks them with oneDNN after every
refit, as before.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch

# (block rows, column pair) candidates tried against oneDNN's packed bytes, most likely first: fp32
# packs 64-row blocks, bf16 64-row blocks of column pairs (VNNI), on AVX-512 CPUs.
_CANDIDATE_LAYOUTS = ((64, 1), (64, 2), (32, 1), (32, 2), (16, 1), (16, 2), (64, 4), (32, 4), (16, 4), (128, 1),
                      (128, 2), (8, 1), (8, 2))
LINEAR_NAMES = ("qkv", "o", "gate_up", "down")


def can_prepack(*, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `PackedLinears` serves an engine on `device` in `dtype`: CPU, torch built with
    oneDNN (mkldnn), and fp32, or bf16 where oneDNN has bf16 kernels for this CPU (AVX-512 BW/VL/DQ
    or AVX-NE-CONVERT; not on AVX2-only CPUs, nor under ONEDNN_MAX_CPU_ISA=AVX2)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def packed_bytes(packed: torch.Tensor) -> torch.Tensor | None:
    """A flat uint8 tensor over the memory of the oneDNN tensor `packed` (which must outlive it), or
    None where this torch cannot say where that memory is."""
    ops = torch.ops.mkldnn
    if not (hasattr(ops, "data_ptr") and hasattr(ops, "_nbytes")):
        return None
    size, address = int(ops._nbytes(packed)), int(ops.data_ptr(packed))
    if size == 0 or address == 0:
        return None
    return torch.frombuffer((ctypes.c_uint8 * size).from_address(address), dtype=torch.uint8)


def _probe(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """A [rows, cols] matrix whose elements are distinct (as bits) wherever the dtype allows."""
    generator = torch.Generator().manual_seed(rows * 7919 + cols)
    if dtype == torch.bfloat16:
        # positive normal bf16 bit patterns (exponent 1 .. 254): every one a distinct finite value
        bits = torch.randint(0x0080, 0x7F00, (rows, cols), generator=generator, dtype=torch.int16)
        return bits.view(torch.bfloat16)
    return torch.randn(rows, cols, generator=generator, dtype=torch.float32).to(dtype)


@functools.lru_cache(maxsize=None)
def learn_layout(rows: int, cols: int, dtype: torch.dtype, batch_hint: int) -> tuple[int, int] | None:
    """(block, pair) of the row-block layout (`stema_kernels.pack_rows_`) in which oneDNN packs a
    [rows, cols] linear weight of `dtype` for batch `batch_hint` on this CPU, or None when it packs
    another way (padding included) or its memory cannot be read. Learned once per process and
    arguments (the layout depends on them and the CPU only)."""
    from stema_kernels import pack_rows_

    probe = _probe(rows, cols, dtype)
    packed = torch.ops.mkldnn._reorder_linear_weight(probe, batch_hint)
    library = packed_bytes(packed)
    if library is None or library.numel() != probe.numel() * probe.element_size():
        return None
    ours = torch.empty(probe.numel(), dtype=dtype)
    for block, pair in _CANDIDATE_LAYOUTS:
        if rows % block or cols % pair:
            continue
        pack_rows_([ours], [probe], blocks=[block], pairs=[pair])
        if torch.equal(ours.view(torch.uint8), library):
            return block, pair
    return None


@dataclass(frozen=True)
class PackedRows:
    """A refit destination: rows [start, start + rows) of a linear weight kept only packed. `buffer`
    is their contiguous span of the packed memory (rows in whole blocks), in the engine's dtype."""

    buffer: torch.Tensor
    rows: int
    cols: int
    block: int
    pair: int

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.rows, self.cols))

    @property
    def dtype(self) -> torch.dtype:
        return self.buffer.dtype

    @property
    def device(self) -> torch.device:
        return self.buffer.device


class PackedLinears:
    """oneDNN-prepacked copies of the linear weights (qkv, o, gate_up, down per layer; lm_head),
    which the decoder multiplies with instead of the plain buffers; see the module docstring.

    Built with the engine: every weight is packed once (uninitialized, like the plain buffers until
    the first refit) and its layout learned (`learn_layout`, once per shape). `in_place` tells
    whether refits write into the packed buffers (`rows()`), the plain linear buffers then being
    released (`DecoderWeights` holds None for them); otherwise `refresh()` repacks every weight
    from the plain buffers after each refit, into newly allocated tensors, one at a time (memory
    for one more packed weight, not a second set).

    Args:
        weights: the engine's `DecoderWeights` (plain buffers, still allocated).
        spec: the engine's `DecoderSpec` (for the fused slices that must start on a block).
        batch_hint: the batch size oneDNN picks the packed layout for (the engine's max_batch).
    """

    def __init__(self, weights, spec, *, batch_hint: int):
        self.weights = weights
        self.batch_hint = batch_hint
        plain = self._plain()
        self.by_name: dict[str, list[torch.Tensor]] = {
            name: [torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint) for weight in tensors]
            for name, tensors in plain.items()
        }
        self.layouts: dict[str, tuple[int, int]] = {}
        self.memory: dict[str, list[torch.Tensor]] = {}
        self.in_place = self._learn(plain, spec)

    def _plain(self) -> dict[str, list[torch.Tensor]]:
        weights = self.weights
        plain = {name: list(getattr(weights, f"{name}_weight")) for name in LINEAR_NAMES}
        plain["lm_head"] = [weights.lm_head]
        return plain

    def _learn(self, plain: dict[str, list[torch.Tensor]], spec) -> bool:
        """Learns every weight's layout; True when all are row-block layouts whose fused slices
        start on a block (then the packed memory of every weight is mapped in `memory`)."""
        d = spec.head_dim
        boundaries = {"qkv": (spec.num_heads * d, (spec.num_heads + spec.num_kv_heads) * d), "gate_up": (spec.intermediate_size,)}
        for name, tensors in plain.items():
            rows, cols = tensors[0].shape
            layout = learn_layout(rows, cols, tensors[0].dtype, self.batch_hint)
            if layout is None or any(boundary % layout[0] for boundary in boundaries.get(name, ())):
                return False
            self.layouts[name] = layout
        memory = {}
        for name, packed in self.by_name.items():
            dtype = plain[name][0].dtype
            memory[name] = [packed_bytes(tensor).view(dtype) for tensor in packed]
        self.memory = memory
        block, pair = self.layouts["lm_head"]
        columns = torch.arange(self.by_name["lm_head"][0].shape[1])
        self.lm_head_columns = (columns // pair) * (block * pair) + columns % pair
        return True

    def rows(self, name: str, index: int, start: int, end: int) -> PackedRows:
        """The destination of rows [start, end) of weight `name`[index] (in-place engines only)."""
        block, pair = self.layouts[name]
        cols = self.by_name[name][index].shape[1]
        return PackedRows(self.memory[name][index][start * cols:end * cols], end - start, cols, block, pair)

    def embedding(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Rows `input_ids` [...] of the packed lm_head [..., hidden]: the token embeddings of an
        in-place engine with tied embeddings, which keeps no plain copy of them."""
        block, pair = self.layouts["lm_head"]
        cols = self.lm_head_columns.shape[0]
        first = (input_ids // block) * (block * cols) + (input_ids % block) * pair  # element (row, 0)
        return self.memory["lm_head"][0][first[..., None] + self.lm_head_columns]

    def buffers(self) -> dict[str, torch.Tensor]:
        """The packed memory of every weight by name (`qkv.0`, ..., `lm_head.0`), in-place engines."""
        return {f"packed_{name}.{index}": tensor for name, tensors in self.memory.items() for index, tensor in enumerate(tensors)}

    def refresh(self) -> None:
        """After the plain buffers were written: repack every linear weight from them (a no-op for
        an in-place engine, whose refits write the packed buffers themselves)."""
        if self.in_place:
            return
        for name, tensors in self._plain().items():
            packed = self.by_name[name]
            for index, weight in enumerate(tensors):
                packed[index] = None
                packed[index] = torch.ops.mkldnn._reorder_linear_weight(weight, self.batch_hint)

    def linear(self, x: torch.Tensor, name: str, index: int, bias: torch.Tensor | None) -> torch.Tensor:
        """x @ packed weight `name`[index]^T + bias."""
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.by_name[name][index], bias, "none", [], "")
