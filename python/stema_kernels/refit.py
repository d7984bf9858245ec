"""In-place refit: copy the trainer's weights into a generation engine's own buffers.

In PPO the generation engine keeps an inference copy of the weights in another dtype and its own
layout (a fused QKV buffer, for one). Each step the trainer's weights are copied into those buffers
in place: `refit_(dst, src)` copies every pair in one call (on CUDA one kernel launch, on the CPU
one OpenMP region whose chunks span all pairs), casting dtype, allocating no tensor or device
memory. `RefitPlan` validates a fixed set of pairs once and re-runs the copy each step.

Results are bit-identical to `dst.copy_(src)`: conversions round to nearest even through float, as
torch's do. The one exception is the payload bits of NaNs on the CPU, which torch itself sets
differently in its vector and scalar paths (bf16: 0xffff or 0x7fc0); there a NaN stays a NaN of the
same sign. On CUDA the kernel uses torch's own conversion intrinsics and NaN bits match as well.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import NamedTuple

import torch

from . import _dispatch, reference
from ._dispatch import _C

__all__ = ["PackRowsPlan", "RefitPlan", "pack_rows_", "refit_"]


class _Pairs(NamedTuple):
    """Validated pairs as the `_C` refit functions take them (parallel lists, one entry per pair)."""

    device: torch.device | None  # None when there are no pairs
    dst_ptrs: list[int]
    src_ptrs: list[int]
    counts: list[int]  # elements, or bytes for a same-dtype pair
    dst_dtypes: list[int]  # stema::DType codes, or _C.refit_raw_bytes for a same-dtype pair
    src_dtypes: list[int]


_device_of = operator.attrgetter("device")
_shape_of = operator.attrgetter("shape")
_dtype_of = operator.attrgetter("dtype")
_layout_of = operator.attrgetter("layout")
_requires_grad_of = operator.attrgetter("requires_grad")


def _passes_bulk_checks(dst: list, src: list) -> bool:
    """Every per-pair check of `_check_pair` and the one-device rule, in bulk (a few C-level maps
    over the tensors, no Python frame per pair): the common, valid case costs little. False sends
    the caller to the per-pair checks, which name the first bad pair."""
    tensors = dst + src
    return (
        all(isinstance(tensor, torch.Tensor) for tensor in tensors)
        and len(set(map(_device_of, tensors))) == 1
        and list(map(_shape_of, dst)) == list(map(_shape_of, src))
        and set(map(_layout_of, tensors)) == {torch.strided}
        and all(map(torch.Tensor.is_contiguous, tensors))
        and not any(map(torch.Tensor.is_conj, tensors))
        and not any(map(torch.Tensor.is_neg, tensors))
        and not any(map(_requires_grad_of, dst))
        and all(
            dst_dtype is src_dtype or (dst_dtype in _dispatch.DTYPE_CODES and src_dtype in _dispatch.DTYPE_CODES)
            for dst_dtype, src_dtype in set(zip(map(_dtype_of, dst), map(_dtype_of, src)))
        )
    )


def _check_pair(index: int, dst: object, src: object) -> None:
    """Per-pair checks: tensors, one device, same shape, dense, writable inference buffer."""
    for name, value in (("dst", dst), ("src", src)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"refit pair {index}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if dst.device != src.device:
        raise ValueError(f"refit pair {index}: dst is on {dst.device} but src is on {src.device}")
    if dst.shape != src.shape:
        raise ValueError(
            f"refit pair {index}: dst shape {tuple(dst.shape)} != src shape {tuple(src.shape)} "
            "(shapes must be equal; refit does not broadcast)"
        )
    for name, tensor in (("dst", dst), ("src", src)):
        if tensor.layout != torch.strided or not tensor.is_contiguous():
            raise ValueError(
                f"refit pair {index}: {name} is not contiguous; pass a contiguous view (a slice "
                "along dim 0 of a contiguous buffer, such as qkv[0:q_rows], is contiguous)"
            )
        if tensor.is_conj() or tensor.is_neg():
            raise ValueError(
                f"refit pair {index}: {name} is a lazy conjugate/negative view; call "
                ".resolve_conj().resolve_neg() first"
            )
    if dst.requires_grad:
        raise ValueError(
            f"refit pair {index}: dst requires grad; refit writes inference buffers in place "
            "behind autograd's back (pass param.detach() or buffers made under torch.no_grad())"
        )
    if dst.dtype != src.dtype and (
        dst.dtype not in _dispatch.DTYPE_CODES or src.dtype not in _dispatch.DTYPE_CODES
    ):
        supported = ", ".join(str(dtype) for dtype in _dispatch.DTYPE_CODES)
        raise ValueError(
            f"refit pair {index}: cannot convert {src.dtype} to {dst.dtype} (conversions are "
            f"between {supported}; tensors of one dtype, of any dtype, are copied bytewise)"
        )


def _check_pairs_one_by_one(dst: list, src: list) -> None:
    """The checks of `_passes_bulk_checks`, pair by pair, raising for the first bad pair."""
    for index, (dst_tensor, src_tensor) in enumerate(zip(dst, src)):
        _check_pair(index, dst_tensor, src_tensor)
    device = dst[0].device
    for index, tensor in enumerate(dst):
        if tensor.device != device:
            raise ValueError(
                f"refit pair {index} is on {tensor.device} but pair 0 is on {device} "
                "(all pairs of one refit must be on one device)"
            )


def _validate(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor]) -> _Pairs:
    """Checks every pair (errors name the pair index) and turns them into `_C` arguments.

    Overlaps (a dst with another dst or with any src) are checked by `_C` from the addresses, when
    it describes the pairs.
    """
    dst, src = list(dst), list(src)
    if len(dst) != len(src):
        raise ValueError(f"refit: dst has {len(dst)} tensors but src has {len(src)}")
    if not dst:
        return _Pairs(None, [], [], [], [], [])
    if not _passes_bulk_checks(dst, src):
        _check_pairs_one_by_one(dst, src)
    codes = _dispatch.DTYPE_CODES
    raw = _C.refit_raw_bytes
    dst_dtypes = list(map(_dtype_of, dst))
    src_dtypes = list(map(_dtype_of, src))
    same_dtype = list(map(operator.is_, dst_dtypes, src_dtypes))
    return _Pairs(
        device=dst[0].device,
        dst_ptrs=list(map(torch.Tensor.data_ptr, dst)),
        src_ptrs=list(map(torch.Tensor.data_ptr, src)),
        counts=[
            numel * dtype.itemsize if same else numel
            for numel, dtype, same in zip(map(torch.Tensor.numel, dst), dst_dtypes, same_dtype)
        ],
        dst_dtypes=[raw if same else codes[dtype] for dtype, same in zip(dst_dtypes, same_dtype)],
        src_dtypes=[raw if same else codes[dtype] for dtype, same in zip(src_dtypes, same_dtype)],
    )


def _list_args(pairs: _Pairs) -> tuple[list[int], ...]:
    return pairs.dst_ptrs, pairs.src_ptrs, pairs.counts, pairs.dst_dtypes, pairs.src_dtypes


def refit_(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor]) -> None:
    """Copy each `src[i]` into `dst[i]` in place, casting dtype; all pairs in one kernel call.

    dst, src: equal-length sequences of tensors on one device; pair i has equal shapes (no
    broadcasting), both contiguous. Conversions between fp32, fp16, bf16 and fp64 in any
    combination; pairs of one dtype (any dtype, integers too) are copied bytewise. A dst may be a
    slice of a fused buffer (`qkv[0:q_rows]` of a contiguous [3H, D] buffer). Destinations must not
    overlap each other or any src, and must not require grad (refit is for inference buffers).
    Raises ValueError naming the pair index (TypeError for a non-tensor). On CUDA the copy runs on
    torch's current stream, in one launch per `_C.refit_max_descriptors_per_launch` (640) pairs,
    the descriptors passed by value; nothing is allocated on the device.
    Use `RefitPlan` to validate once and refit every step.
    """
    dst, src = list(dst), list(src)
    pairs = _validate(dst, src)
    if pairs.device is None:
        return
    if not _dispatch.has_kernel(pairs.device):
        _C.refit_check_pairs(*_list_args(pairs))
        with torch.no_grad():
            reference.refit_(dst, src)
    elif pairs.device.type == "cpu":
        _C.refit_cpu(*_list_args(pairs))
    else:
        _C.refit_cuda(*_list_args(pairs), _cuda_index(pairs.device), _dispatch.stream_handle(pairs.device))


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _raise_if_moved(item: str, plan: str, groups) -> None:
    """ValueError naming the first tensor (`item` index, its role) whose data_ptr is not the one a
    plan recorded; groups: (role, tensors, recorded addresses)."""
    for role, tensors, recorded in groups:
        current = list(map(torch.Tensor.data_ptr, tensors))
        if current != recorded:
            index = next(i for i, (now, then) in enumerate(zip(current, recorded)) if now != then)
            raise ValueError(
                f"{item} {index}: {role} storage moved since the {plan} was built "
                f"(data_ptr {recorded[index]:#x} -> {current[index]:#x}); build a new plan"
            )


class RefitPlan:
    """A fixed refit (dst[i] <- src[i] for every pair), validated once, re-run every step.

    `RefitPlan(dst, src)` runs every check of `refit_` once, records the buffers' addresses and
    dtypes in a descriptor table (on CUDA uploaded to the device once), and `plan.apply()` (or
    `plan()`) re-runs the copy with no re-validation and no allocation: on CUDA one launch for all
    pairs, on torch's current stream.

    The plan holds references to the tensors, and their storage must stay where it is (that is the
    point of refitting in place): `apply()` compares each tensor's data_ptr with the recorded one
    (a cheap check, one call per tensor) and raises ValueError naming the pair if one moved; build
    a new plan then. The values in the buffers may change freely between applies.

    Attributes: `num_bytes`, the bytes written into the dst buffers per apply; `len(plan)`, pairs.
    """

    def __init__(self, dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor]) -> None:
        self._dst = tuple(dst)
        self._src = tuple(src)
        pairs = _validate(self._dst, self._src)
        self._device = pairs.device
        self._dst_ptrs = pairs.dst_ptrs
        self._src_ptrs = pairs.src_ptrs
        self.num_bytes = sum(tensor.nbytes for tensor in self._dst)
        self._table: torch.Tensor | None = None
        self._total_chunks = 0
        if self._device is not None and _dispatch.has_kernel(self._device):
            self._table, self._total_chunks = self._build_table(pairs)
        else:
            _C.refit_check_pairs(*_list_args(pairs))

    def _build_table(self, pairs: _Pairs) -> tuple[torch.Tensor, int]:
        """The descriptor table (written by `_C` on the host, then moved to the plan's device)."""
        host_table = torch.empty(len(self) * _C.refit_descriptor_bytes, dtype=torch.uint8)
        if self._device.type == "cpu":
            total_chunks = _C.refit_write_table_cpu(host_table.data_ptr(), *_list_args(pairs))
            return host_table, total_chunks
        total_chunks = _C.refit_write_table_cuda(host_table.data_ptr(), *_list_args(pairs))
        device_table = host_table.to(self._device)
        # apply() may run on another stream: the upload must have landed before any launch reads it.
        torch.cuda.current_stream(self._device).synchronize()
        return device_table, total_chunks

    def __len__(self) -> int:
        return len(self._dst)

    def __repr__(self) -> str:
        return f"RefitPlan(pairs={len(self)}, num_bytes={self.num_bytes}, device={self._device})"

    def _check_pointers(self) -> None:
        _raise_if_moved("refit pair", "RefitPlan", (("dst", self._dst, self._dst_ptrs), ("src", self._src, self._src_ptrs)))

    def apply(self) -> None:
        """Copy every src into its dst again (their current values), in place."""
        self._check_pointers()
        if self._table is None:
            if self._device is not None:
                with torch.no_grad():
                    reference.refit_(list(self._dst), list(self._src))
            return
        if self._device.type == "cpu":
            _C.refit_table_cpu(self._table.data_ptr(), len(self), self._total_chunks)
        else:
            _C.refit_table_cuda(
                self._table.data_ptr(),
                len(self),
                self._total_chunks,
                _cuda_index(self._device),
                _dispatch.stream_handle(self._device),
            )

    __call__ = apply


# ---- refit into a row-block packed layout ---------------------------------------------------------

MAX_PACK_BLOCK = 128


def _pack_rows_args(packed: Sequence[torch.Tensor], src: Sequence[torch.Tensor], blocks: Sequence[int],
                    pairs: Sequence[int]) -> tuple[list, ...]:
    """Checks every descriptor (errors name its index) and returns the `_C.refit_pack_rows_cpu` lists."""
    packed, src, blocks, pairs = list(packed), list(src), list(blocks), list(pairs)
    if not len(packed) == len(src) == len(blocks) == len(pairs):
        raise ValueError(f"pack_rows_: {len(packed)} packed, {len(src)} src, {len(blocks)} blocks and "
                         f"{len(pairs)} pairs; one of each per weight")
    for index, (dst, source, block, pair) in enumerate(zip(packed, src, blocks, pairs)):
        where = f"pack_rows_ weight {index}"
        if not isinstance(dst, torch.Tensor) or not isinstance(source, torch.Tensor):
            raise TypeError(f"{where}: packed and src must be torch.Tensors")
        if dst.device.type != "cpu" or source.device.type != "cpu":
            raise ValueError(f"{where}: packed layouts are a CPU thing; got {dst.device} and {source.device}")
        if source.dim() != 2 or not source.is_contiguous() or not dst.is_contiguous():
            raise ValueError(f"{where}: src must be a contiguous [rows, cols] matrix and packed contiguous, got src "
                             f"shape {tuple(source.shape)}")
        rows, cols = source.shape
        if dst.numel() != source.numel():
            raise ValueError(f"{where}: packed holds {dst.numel()} elements but src [{rows}, {cols}] has {source.numel()}")
        if not 1 <= block <= MAX_PACK_BLOCK or pair < 1 or rows % block or cols % pair or 64 % pair:
            raise ValueError(f"{where}: block {block} (1 to {MAX_PACK_BLOCK}) must divide rows {rows} and pair "
                             f"{pair} (which divides 64) must divide cols {cols}")
        if dst.requires_grad:
            raise ValueError(f"{where}: packed requires grad; pack into inference buffers only")
        if pair * dst.dtype.itemsize > 16:
            raise ValueError(f"{where}: a group of pair {pair} {dst.dtype} elements exceeds 16 bytes")
        for name, tensor in (("packed", dst), ("src", source)):
            if tensor.dtype not in _dispatch.DTYPE_CODES:
                supported = ", ".join(str(dtype) for dtype in _dispatch.DTYPE_CODES)
                raise ValueError(f"{where}: {name} is {tensor.dtype}; packing takes {supported}")
    return (
        [tensor.data_ptr() for tensor in packed],
        [tensor.data_ptr() for tensor in src],
        [tensor.shape[0] for tensor in src],
        [tensor.shape[1] for tensor in src],
        blocks,
        pairs,
        [_dispatch.DTYPE_CODES[tensor.dtype] for tensor in packed],
        [_dispatch.DTYPE_CODES[tensor.dtype] for tensor in src],
    )


def pack_rows_(packed: Sequence[torch.Tensor], src: Sequence[torch.Tensor], *, blocks: Sequence[int],
               pairs: Sequence[int]) -> None:
    """Write each `src[i]` [rows, cols] into `packed[i]` in a row-block packed layout, casting dtype;
    one OpenMP region over every row block of every weight (CPU only).

    The layout is oneDNN's prepacked inner-product weight on the CPU for blocks of `block` rows and
    VNNI groups of `pair` columns: flat, packed[b][c // pair][r][c % pair] = src[b * block + r][c]
    (`stema_kernels.reference.pack_rows`). A refit that writes the trainer's weights straight into a
    generation engine's prepacked buffers this way skips the repack (a reorder into newly allocated
    memory) that torch's API would need after every refit. Bit-identical to casting with `refit_`
    and then reordering.

    packed[i]: a contiguous tensor of src[i].numel() elements in the destination dtype (a span of
    rows [b0 * block, b1 * block) of a packed weight is contiguous); src[i]: contiguous 2-D, rows a
    multiple of blocks[i] (1 to 128), cols a multiple of pairs[i] (which divides 64). Raises
    ValueError naming the weight index; destinations must not overlap each other or any src.
    """
    args = _pack_rows_args(packed, src, blocks, pairs)
    _check_no_overlap(list(packed), list(src))
    _C.refit_pack_rows_cpu(*args)


def _check_no_overlap(packed: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """The flat refit's overlap check over the same byte ranges (each pair flattened)."""
    flat = _validate([tensor.view(-1) for tensor in packed], [tensor.detach().view(-1) for tensor in src])
    _C.refit_check_pairs(*_list_args(flat))


class PackRowsPlan:
    """`pack_rows_` over a fixed set of weights, checked once, re-run every refit (`apply()`), like
    `RefitPlan`: the tensors' storage must stay where it is (apply raises ValueError naming the
    weight if one moved)."""

    def __init__(self, packed: Sequence[torch.Tensor], src: Sequence[torch.Tensor], *, blocks: Sequence[int],
                 pairs: Sequence[int]) -> None:
        self._packed, self._src = tuple(packed), tuple(src)
        self._args = _pack_rows_args(self._packed, self._src, blocks, pairs)
        _check_no_overlap(list(self._packed), list(self._src))
        self.num_bytes = sum(tensor.nbytes for tensor in self._packed)

    def __len__(self) -> int:
        return len(self._packed)

    def apply(self) -> None:
        """Pack every src into its destination again (their current values), in place."""
        _raise_if_moved("pack_rows weight", "PackRowsPlan",
                        (("packed", self._packed, self._args[0]), ("src", self._src, self._args[1])))
        if self._packed:
            _C.refit_pack_rows_cpu(*self._args)

    __call__ = apply
