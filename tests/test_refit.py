"""refit_ and RefitPlan against torch's own `dst.copy_(src)`, bit for bit, plus every error; pack_rows_
and PackRowsPlan (the CPU refit into a row-block packed layout) against `reference.pack_rows`.

NaN payloads: torch's CPU copy_ writes different NaN bits in its vector and scalar paths (bf16:
0xffff or 0x7fc0), so on the CPU a NaN must stay a NaN and every other value must match bit for
bit; on CUDA all bits must match.
"""

from __future__ import annotations

import math

import pytest
import torch

from stema_kernels import PackRowsPlan, RefitPlan, _dispatch, pack_rows_, refit_, reference

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

SPECIAL_VALUES = [
    0.0, -0.0, 1.0, -1.0, 0.1, -2.5, math.pi,
    math.inf, -math.inf, math.nan, -math.nan,
    1 + 2**-8, 1 + 3 * 2**-8,  # bf16 ties: round to even, down then up
    1 + 2**-11, 1 + 3 * 2**-11,  # fp16 ties
    1 + 2**-8 + 2**-40, 1 + 2**-11 + 2**-40,  # fp64 -> 16-bit: torch rounds through float first
    1 + 2**-24 + 2**-60,  # fp64 -> fp32 just above a tie
    2**-24, 2**-25, 3 * 2**-25, 2**-26, -(5 * 2**-26),  # fp16 subnormals and their ties
    2**-14, 2**-14 - 2**-25,  # fp16 normal / subnormal boundary
    2**-126, 2**-127, 2**-133, 2**-149, 1e-40, -1e-40,  # fp32 and bf16 subnormals
    65504.0, 65519.0, 65520.0, 65536.0, 1e5, -1e5,  # fp16 max, rounding to max, overflow to inf
    3.0e38, 3.3895313892515355e38, 3.4e38, -3.4028234663852886e38,  # bf16 max and overflow
    1e300, -1e300, 1e-300,  # fp64 only: inf and zero in every narrower dtype
]


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(INT_VIEW[tensor.element_size()])


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bitwise equality; NaN payloads on the CPU only need to be NaN (see the module docstring)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if actual.device.type == "cpu" and actual.is_floating_point():
        actual_nan = torch.isnan(actual)
        assert torch.equal(actual_nan, torch.isnan(expected)), "NaN positions differ"
        differ = (bits(actual) != bits(expected)) & ~actual_nan
    else:
        differ = bits(actual) != bits(expected)
    assert not differ.any(), (
        f"{int(differ.sum())} of {actual.numel()} values differ, first at flat index "
        f"{int(differ.flatten().nonzero()[0])}"
    )


def copied_by_torch(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    expected = torch.empty_like(dst)
    expected.copy_(src)
    return expected


def random_bit_patterns(dtype: torch.dtype, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` values of `dtype` with uniformly random bits: every class (subnormal, NaN, ...)."""
    width = torch.finfo(dtype).bits // 8
    raw = torch.randint(0, 256, (count * width,), generator=generator, dtype=torch.int64).to(torch.uint8)
    return raw.view(dtype)


def sample_values(dtype: torch.dtype, device: str) -> torch.Tensor:
    """Special values, every 16-bit pattern (for 16-bit dtypes) or random bits, and scaled
    normals, of an odd length (vector tails)."""
    generator = torch.Generator().manual_seed(1234)
    special = torch.tensor(SPECIAL_VALUES, dtype=torch.float64).to(dtype)
    if torch.finfo(dtype).bits == 16:
        patterns = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    else:
        patterns = random_bit_patterns(dtype, 5001, generator)
    scaled = torch.cat([torch.randn(999, generator=generator, dtype=torch.float64) * scale for scale in (1e-6, 1, 1e4)])
    return torch.cat([special, patterns, scaled.to(dtype)]).to(device)


@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "offset"])
@pytest.mark.parametrize("dst_dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("src_dtype", FLOAT_DTYPES, ids=str)
def test_every_dtype_pair_is_bit_exact_with_copy(src_dtype, dst_dtype, offset, device):
    values = sample_values(src_dtype, device)
    src_buffer = torch.cat([values.new_zeros(offset), values])
    dst_buffer = torch.full((values.numel() + offset,), 7.0, dtype=dst_dtype, device=device)
    src, dst = src_buffer[offset:], dst_buffer[offset:]  # offset 1: not 16-byte aligned
    refit_([dst], [src])
    assert_same_bits(dst, copied_by_torch(dst, src))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool, torch.complex64])
@pytest.mark.parametrize("offset", [0, 1, 2])
def test_same_dtype_pairs_of_any_dtype_are_copied_bytewise(dtype, offset, device):
    # Offsets of 1 or 2 elements leave the buffers aligned to 1, 2, 4 or 8 bytes only.
    count = 1237 + offset
    width = torch.empty((), dtype=dtype).element_size()
    generator = torch.Generator().manual_seed(offset)
    high = 2 if dtype == torch.bool else 256
    raw = torch.randint(0, high, (count * width,), generator=generator, dtype=torch.int64).to(torch.uint8)
    src = raw.view(dtype).to(device)[offset:]
    dst = torch.zeros(count, dtype=dtype, device=device)[offset:]
    refit_([dst], [src])
    assert torch.equal(dst.view(torch.uint8), src.view(torch.uint8))


@pytest.mark.parametrize(
    ("src_dtype", "dst_dtype"),
    [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float32, torch.float32)],
    ids=["fp32-bf16", "bf16-fp32", "fp32-fp32"],
)
def test_a_pair_larger_than_many_chunks(src_dtype, dst_dtype, device):
    # 300k elements: several CPU chunks (256 KiB of src) and many CUDA chunks (32 KiB), unaligned.
    src = torch.randn(300_003, dtype=torch.float64).to(src_dtype).to(device)[3:]
    dst = torch.empty(300_003, dtype=dst_dtype, device=device)[3:]
    refit_([dst], [src])
    assert_same_bits(dst, copied_by_torch(dst, src))


@pytest.mark.parametrize("row_width", [64, 37], ids=["aligned-rows", "odd-rows"])
def test_fused_qkv_slices_get_q_k_v_and_the_rest_is_untouched(row_width, device):
    heads_dim, guard_rows = 6, 2
    fused = torch.full((guard_rows + 3 * heads_dim + guard_rows, row_width), -3.0, dtype=torch.bfloat16, device=device)
    before = fused.clone()
    qkv = fused[guard_rows : guard_rows + 3 * heads_dim]
    q_rows = slice(0, heads_dim), slice(heads_dim, 2 * heads_dim), slice(2 * heads_dim, 3 * heads_dim)
    dst = [qkv[rows] for rows in q_rows]
    src = [torch.randn(heads_dim, row_width, device=device) for _ in range(3)]
    pointers = [tensor.data_ptr() for tensor in dst]
    refit_(dst, src)
    for rows, source in zip(q_rows, src):
        assert_same_bits(qkv[rows], source.to(torch.bfloat16))
    assert_same_bits(fused[:guard_rows], before[:guard_rows])
    assert_same_bits(fused[-guard_rows:], before[-guard_rows:])
    assert [tensor.data_ptr() for tensor in dst] == pointers


def mixed_pairs(count: int, max_size: int, device: str, seed: int):
    """`count` pairs with random dtypes and log-uniform sizes from 1 to max_size elements."""
    generator = torch.Generator().manual_seed(seed)
    dst, src = [], []
    for _ in range(count):
        size = int(math.exp(torch.rand((), generator=generator).item() * math.log(max_size))) + 1
        src_dtype, dst_dtype = (FLOAT_DTYPES[int(i)] for i in torch.randint(0, 4, (2,), generator=generator))
        src.append(torch.randn(size, generator=generator, dtype=torch.float64).to(src_dtype).to(device))
        dst.append(torch.zeros(size, dtype=dst_dtype, device=device))
    return dst, src


@pytest.mark.parametrize(("count", "max_size"), [(200, 100_000), (700, 300)], ids=["200-mixed", "700-small"])
def test_many_pairs_of_mixed_sizes_and_dtypes_in_one_call(count, max_size, device):
    # 700 pairs: more than the descriptors one CUDA launch takes by value.
    dst, src = mixed_pairs(count, max_size, device, seed=count)
    pointers = [tensor.data_ptr() for tensor in dst]
    refit_(dst, src)
    for destination, source in zip(dst, src):
        assert_same_bits(destination, copied_by_torch(destination, source))
    assert [tensor.data_ptr() for tensor in dst] == pointers


def test_a_trainer_parameter_that_requires_grad_is_a_valid_src(device):
    parameter = torch.nn.Parameter(torch.randn(4, 8, device=device))
    buffer = torch.zeros(4, 8, dtype=torch.float16, device=device)
    refit_([buffer], [parameter])
    assert not buffer.requires_grad
    assert_same_bits(buffer, parameter.detach().half())


@pytest.mark.cuda
def test_runs_on_the_current_cuda_stream():
    side = torch.cuda.Stream()
    src = torch.randn(1 << 20, device="cuda")
    dst = torch.empty(1 << 20, dtype=torch.bfloat16, device="cuda")
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        src.mul_(3.0)  # queued on `side`: the refit must see it
        refit_([dst], [src])
        plan_dst = torch.empty_like(dst)
        RefitPlan([plan_dst], [src]).apply()
    side.synchronize()
    assert_same_bits(dst, src.bfloat16())
    assert_same_bits(plan_dst, src.bfloat16())


def test_empty_lists_and_zero_element_tensors(device):
    refit_([], [])
    dst = [torch.empty(0, 5, device=device), torch.zeros(3, dtype=torch.float16, device=device),
           torch.empty(0, dtype=torch.int64, device=device)]
    src = [torch.empty(0, 5, dtype=torch.float64, device=device), torch.ones(3, device=device),
           torch.empty(0, dtype=torch.int64, device=device)]
    refit_(dst, src)
    assert_same_bits(dst[1], torch.ones(3, dtype=torch.float16, device=device))
    plan = RefitPlan(dst, src)
    plan.apply()
    empty_plan = RefitPlan([], [])
    empty_plan()
    assert len(empty_plan) == 0 and empty_plan.num_bytes == 0


def test_plan_reapplies_current_src_values(device):
    dst, src = mixed_pairs(40, 20_000, device, seed=7)
    fused = torch.zeros(3 * 16, 24, dtype=torch.bfloat16, device=device)
    dst += [fused[0:16], fused[16:32], fused[32:48]]
    src += [torch.randn(16, 24, device=device) for _ in range(3)]
    plan = RefitPlan(dst, src)
    assert len(plan) == 43
    assert plan.num_bytes == sum(tensor.nbytes for tensor in dst)
    pointers = [tensor.data_ptr() for tensor in dst]
    for step in range(3):
        for tensor in src:
            tensor.copy_(torch.randn(tensor.shape, dtype=torch.float64) * (step + 1))
        plan.apply() if step % 2 == 0 else plan()
        for destination, source in zip(dst, src):
            assert_same_bits(destination, copied_by_torch(destination, source))
    assert [tensor.data_ptr() for tensor in dst] == pointers


def test_plan_refuses_a_tensor_whose_storage_moved(device):
    dst = [torch.zeros(8, device=device), torch.zeros(8, dtype=torch.bfloat16, device=device)]
    src = [torch.randn(8, device=device), torch.randn(8, device=device)]
    plan = RefitPlan(dst, src)
    src[1].data = torch.randn(8, device=device)  # the trainer re-allocated a parameter
    with pytest.raises(ValueError, match=r"refit pair 1: src storage moved since the RefitPlan was built"):
        plan.apply()
    dst[0].set_(torch.zeros(8, device=device))
    with pytest.raises(ValueError, match=r"refit pair 0: dst storage moved"):
        plan()


def test_falls_back_to_the_reference_where_no_kernel_serves_the_device(device, monkeypatch):
    monkeypatch.setattr(_dispatch, "has_kernel", lambda _device: False)
    dst, src = mixed_pairs(5, 1000, device, seed=3)
    refit_(dst, src)
    for destination, source in zip(dst, src):
        assert_same_bits(destination, copied_by_torch(destination, source))
    RefitPlan(dst, src).apply()
    buffer = torch.zeros(8, device=device)
    with pytest.raises(ValueError, match=r"refit pairs 0 and 1: dst memory overlaps"):
        refit_([buffer[0:4], buffer[2:6]], [torch.ones(4, device=device), torch.ones(4, device=device)])


# ---- errors ----

def other_device(device: str) -> str:
    return "meta" if device == "cpu" else "cpu"


@pytest.mark.parametrize("make", [refit_, RefitPlan], ids=["refit_", "RefitPlan"])
def test_errors_name_the_pair(make, device):
    def tensor(*shape, dtype=torch.float32, on=device):
        return torch.zeros(*shape, dtype=dtype, device=on)

    ok_dst, ok_src = tensor(4), tensor(4)
    with pytest.raises(ValueError, match=r"dst has 2 tensors but src has 1"):
        make([ok_dst, tensor(4)], [ok_src])
    with pytest.raises(ValueError, match=r"refit pair 1: dst shape \(4, 2\) != src shape \(8,\).*does not broadcast"):
        make([ok_dst, tensor(4, 2)], [ok_src, tensor(8)])
    with pytest.raises(ValueError, match=r"refit pair 1: dst shape \(4, 2\) != src shape \(1, 2\)"):
        make([ok_dst, tensor(4, 2)], [ok_src, tensor(1, 2)])
    with pytest.raises(ValueError, match=rf"refit pair 1: dst is on {device}.* but src is on {other_device(device)}"):
        make([ok_dst, tensor(4)], [ok_src, tensor(4, on=other_device(device))])
    with pytest.raises(ValueError, match=r"refit pair 1 is on .* but pair 0 is on .*one device"):
        make([ok_dst, tensor(4, on=other_device(device))], [ok_src, tensor(4, on=other_device(device))])
    with pytest.raises(ValueError, match=r"refit pair 1: dst is not contiguous; pass a contiguous view"):
        make([ok_dst, tensor(4, 6).t()], [ok_src, tensor(6, 4)])
    with pytest.raises(ValueError, match=r"refit pair 0: src is not contiguous"):
        make([tensor(3)], [tensor(6)[::2]])
    with pytest.raises(ValueError, match=r"refit pair 1: dst requires grad; refit writes inference buffers"):
        make([ok_dst, tensor(4).requires_grad_()], [ok_src, tensor(4)])
    with pytest.raises(ValueError, match=r"refit pair 1: cannot convert torch.int32 to torch.float32"):
        make([ok_dst, tensor(4)], [ok_src, tensor(4, dtype=torch.int32)])
    with pytest.raises(ValueError, match=r"refit pair 0: src is a lazy conjugate"):
        make([tensor(4, dtype=torch.complex64)], [tensor(4, dtype=torch.complex64).conj()])
    with pytest.raises(TypeError, match=r"refit pair 0: src must be a torch.Tensor, got list"):
        make([ok_dst], [[0.0] * 4])


@pytest.mark.parametrize("make", [refit_, RefitPlan], ids=["refit_", "RefitPlan"])
def test_overlapping_destinations_are_refused(make, device):
    buffer = torch.zeros(20, device=device)
    sources = [torch.ones(6, device=device), torch.ones(6, device=device), torch.ones(5, device=device)]
    with pytest.raises(ValueError, match=r"refit pairs 0 and 2: dst memory overlaps"):
        make([buffer[0:6], buffer[10:16], buffer[4:9]], sources)
    with pytest.raises(ValueError, match=r"refit pairs 0 and 1: dst memory overlaps"):
        make([buffer[2:8], buffer[2:8]], sources[:2])
    bf16_view = buffer.view(torch.bfloat16)  # overlap in bytes across dtypes
    with pytest.raises(ValueError, match=r"refit pairs 0 and 1: dst memory overlaps"):
        make([buffer[0:6], bf16_view[11:17]], sources[:2])
    with pytest.raises(ValueError, match=r"refit pair 1: src memory overlaps the dst of pair 0"):
        make([buffer[0:6], torch.zeros(5, device=device)], [sources[0], buffer[5:10]])
    with pytest.raises(ValueError, match=r"refit pair 0: src memory overlaps the dst of pair 1"):
        make([torch.zeros(4, device=device), buffer[8:12]], [buffer[6:10], sources[2][:4]])


def test_adjacent_destinations_are_fine(device):
    buffer = torch.zeros(20, device=device)
    sources = [torch.full((6,), 1.0, device=device), torch.full((6,), 2.0, device=device), torch.full((5,), 3.0, device=device)]
    RefitPlan([buffer[0:6], buffer[6:12], buffer[12:17]], sources).apply()
    expected = torch.cat([tensor.cpu() for tensor in sources] + [torch.zeros(3)])
    assert torch.equal(buffer.cpu(), expected)


# ---- pack_rows_: refit into a row-block packed layout (CPU) ----


def packed_by_reference(src: torch.Tensor, dtype: torch.dtype, *, block: int, pair: int) -> torch.Tensor:
    return reference.pack_rows(src, block=block, pair=pair, dtype=dtype)


@pytest.mark.parametrize("dst_dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("src_dtype", FLOAT_DTYPES, ids=str)
def test_pack_rows_is_the_reference_layout_for_every_dtype_pair(src_dtype, dst_dtype):
    """Every value class (the special values, every 16-bit pattern or random bits) through every
    conversion: the packed values are those of torch's cast (NaN payloads aside, as for refit_)."""
    values = sample_values(src_dtype, "cpu")
    cols = 2 * 37  # 37 column pairs: past the last full 8-unit tile
    rows = (values.numel() // cols) // 16 * 16
    src = values[: rows * cols].reshape(rows, cols).contiguous()
    pair = 2 if dst_dtype.itemsize <= 4 else 1
    packed = torch.empty(rows * cols, dtype=dst_dtype)
    pack_rows_([packed], [src], blocks=[16], pairs=[pair])
    assert_same_bits(packed, packed_by_reference(src, dst_dtype, block=16, pair=pair))


@pytest.mark.parametrize(
    ("rows", "cols", "block", "pair", "dtype"),
    [
        (128, 512, 64, 1, torch.float32),   # fp32 engines: AVX2 8 x 8 tiles, streamed stores
        (128, 1408, 64, 2, torch.bfloat16),  # bf16 engines: pairs of columns, 4-byte units
        (96, 300, 32, 1, torch.float32),     # a column tail past the last 8-unit tile
        (36, 40, 12, 1, torch.float32),      # a block that is not a multiple of 8 rows (scalar row tail)
        (30, 130, 10, 2, torch.float16),     # odd everything
        (16, 64, 16, 4, torch.float32),      # 16-byte units
        (16, 64, 16, 1, torch.bfloat16),     # 2-byte units
        (7, 5, 7, 1, torch.float64),         # 8-byte units, a single block
    ],
)
@pytest.mark.parametrize("src_dtype", [torch.float32, "same"], ids=["from-fp32", "same-dtype"])
def test_pack_rows_shapes_units_and_tails(rows, cols, block, pair, dtype, src_dtype):
    src_dtype = dtype if src_dtype == "same" else src_dtype
    generator = torch.Generator().manual_seed(rows * cols)
    sources = [torch.randn(rows, cols, generator=generator).to(src_dtype) for _ in range(2)]
    packed = [torch.full((rows * cols,), 7.0, dtype=dtype) for _ in range(2)]
    pack_rows_(packed, sources, blocks=[block, block], pairs=[pair, pair])
    for destination, source in zip(packed, sources):
        assert_same_bits(destination, packed_by_reference(source, dtype, block=block, pair=pair))


def test_pack_rows_writes_a_span_of_row_blocks_and_nothing_else():
    """Rows [64, 128) of a [192, 64] weight are the contiguous span [64 * 64, 128 * 64) of its
    packed memory (how a refit writes k of a fused q/k/v)."""
    whole = torch.randn(192, 64)
    packed = packed_by_reference(whole, torch.float32, block=64, pair=1)
    before = packed.clone()
    update = torch.randn(64, 64)
    pack_rows_([packed[64 * 64:128 * 64]], [update], blocks=[64], pairs=[1])
    whole[64:128] = update
    assert torch.equal(packed, packed_by_reference(whole, torch.float32, block=64, pair=1))
    assert torch.equal(packed[:64 * 64], before[:64 * 64]) and torch.equal(packed[128 * 64:], before[128 * 64:])


def test_pack_rows_plan_reapplies_and_refuses_moved_storage():
    sources = [torch.randn(64, 64), torch.randn(32, 16)]
    packed = [torch.empty(64 * 64, dtype=torch.bfloat16), torch.empty(32 * 16)]
    plan = PackRowsPlan(packed, sources, blocks=[64, 16], pairs=[2, 1])
    assert len(plan) == 2 and plan.num_bytes == 64 * 64 * 2 + 32 * 16 * 4
    for step in range(2):
        for source in sources:
            source.copy_(torch.randn(source.shape) * (step + 1))
        plan()
        assert torch.equal(packed[0], packed_by_reference(sources[0], torch.bfloat16, block=64, pair=2))
        assert torch.equal(packed[1], packed_by_reference(sources[1], torch.float32, block=16, pair=1))
    sources[1].data = torch.randn(32, 16)
    with pytest.raises(ValueError, match=r"pack_rows weight 1: src storage moved since the PackRowsPlan was built"):
        plan.apply()


def test_pack_rows_errors_name_the_weight():
    def call(packed, src, block=8, pair=1):
        pack_rows_(packed, src, blocks=[block] * len(src), pairs=[pair] * len(src))

    ok_packed, ok_src = torch.empty(64), torch.randn(8, 8)
    with pytest.raises(ValueError, match=r"pack_rows_: 1 packed, 2 src"):
        pack_rows_([ok_packed], [ok_src, ok_src], blocks=[8, 8], pairs=[1, 1])
    with pytest.raises(ValueError, match=r"weight 1: packed holds 60 elements but src \[8, 8\] has 64"):
        call([ok_packed, torch.empty(60)], [ok_src, torch.randn(8, 8)])
    with pytest.raises(ValueError, match=r"weight 0: block 3 \(1 to 128\) must divide rows 8"):
        call([ok_packed], [ok_src], block=3)
    with pytest.raises(ValueError, match=r"weight 0: block 256"):
        call([torch.empty(256 * 2)], [torch.randn(256, 2)], block=256)
    with pytest.raises(ValueError, match=r"weight 0: block 8 .* pair 3"):
        call([torch.empty(48)], [torch.randn(8, 6)], pair=3)  # 3 divides 6 but not 64
    with pytest.raises(ValueError, match=r"weight 0: src must be a contiguous \[rows, cols\] matrix"):
        call([ok_packed], [torch.randn(8, 8).t()])
    with pytest.raises(ValueError, match=r"weight 0: src must be a contiguous \[rows, cols\] matrix"):
        call([ok_packed], [torch.randn(64)])
    with pytest.raises(ValueError, match=r"weight 0: packed requires grad"):
        call([torch.empty(64, requires_grad=True)], [ok_src])
    with pytest.raises(ValueError, match=r"weight 0: a group of pair 8 torch.float32 elements exceeds 16 bytes"):
        call([torch.empty(64)], [ok_src], pair=8)
    with pytest.raises(ValueError, match=r"weight 0: packed is torch.int32; packing takes"):
        call([torch.empty(64, dtype=torch.int32)], [ok_src])
    with pytest.raises(ValueError, match=r"weight 0: packed layouts are a CPU thing"):
        call([torch.empty(64, device="meta")], [ok_src])
    buffer = torch.empty(128)
    with pytest.raises(ValueError, match=r"refit pairs 0 and 1: dst memory overlaps"):
        call([buffer[0:64], buffer[32:96]], [ok_src, torch.randn(8, 8)])
