"""Fused token log-probs / entropy / KL against `reference` (values and autograd gradients).

logprob = z[y] - logsumexp(z), entropy = logsumexp(z) - sum_v softmax(z)_v z_v, z = logits / T;
kl = k1 | k2 | k3 of logprob - ref_logprob. Gradients are compared with autograd through the
reference under the same random upstream gradients on every output. The fp32 reference has its own
rounding error (entropy = lse - sum p z cancels), so a float64 oracle holds the kernel to tighter
bounds than the reference comparison can.
"""

from __future__ import annotations

import math

import pytest
import torch

from stema_kernels import logprob_kl, reference, token_logprobs
from stema_kernels.logprobs import _as_rows

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Resolution of each dtype (one ulp at 1): gradients are written in the logits' dtype.
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def make_inputs(shape, vocab, *, dtype, device, scale=2.0, seed=0, label_dtype=torch.int64):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, vocab, generator=generator) * scale).to(dtype)
    labels = torch.randint(0, vocab, tuple(shape), generator=generator).to(label_dtype)
    return logits.to(device), labels.to(device)


def upstream_like(tensor, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(tensor.shape, generator=generator).to(tensor.device)


def outputs_and_grad(fn, logits, *args, **kwargs):
    """Runs fn on a fresh leaf copy of logits; returns (outputs, d(sum_i upstream_i * out_i)/dlogits)."""
    leaf = logits.detach().clone().requires_grad_(True)
    outputs = fn(leaf, *args, **kwargs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    loss = sum((out * upstream_like(out, seed=100 + i)).sum() for i, out in enumerate(outputs))
    loss.backward()
    return [out.detach() for out in outputs], leaf.grad


def float64_oracle(logits, labels, *, temperature=1.0, ignore_index=-100):
    """Independent float64 logprobs and entropy (ignored positions 0)."""
    z = logits.double() / temperature
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0).long()
    lse = torch.logsumexp(z, -1)
    logprobs = z.gather(-1, safe.unsqueeze(-1)).squeeze(-1) - lse
    probs = torch.softmax(z, -1)
    entropy = lse - (probs * torch.where(torch.isfinite(z), z, 0.0)).sum(-1)
    zero = torch.zeros_like(lse)
    return torch.where(valid, logprobs, zero), torch.where(valid, entropy, zero)


def assert_grads_close(actual, expected, dtype, *, atol=2e-5):
    assert actual.dtype == expected.dtype == dtype
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual.float(), expected.float(), rtol=GRAD_RTOL[dtype], atol=atol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape,vocab", [((4,), 1), ((2, 3), 7), ((5,), 1000), ((2,), 32003), ((3, 1), 257)], ids=str
)
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_token_logprobs_and_entropy_match_reference(device, dtype, shape, vocab, temperature):
    logits, labels = make_inputs(shape, vocab, dtype=dtype, device=device)
    (logprobs, entropy), grad = outputs_and_grad(
        token_logprobs, logits, labels, temperature=temperature, return_entropy=True)
    (ref_logprobs, ref_entropy), ref_grad = outputs_and_grad(
        reference.token_logprobs, logits, labels, temperature=temperature, return_entropy=True)

    assert logprobs.dtype == entropy.dtype == torch.float32
    assert logprobs.shape == entropy.shape == labels.shape
    torch.testing.assert_close(logprobs, ref_logprobs, rtol=1e-5, atol=1e-5)
    # The reference's entropy (lse - sum p z in fp32) is off by up to ~1e-4 for V = 32003.
    torch.testing.assert_close(entropy, ref_entropy, rtol=1e-5, atol=2e-4)
    assert_grads_close(grad, ref_grad, dtype, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_logprobs_alone_and_their_gradient_match_reference(device, dtype):
    logits, labels = make_inputs((3, 5), 1000, dtype=dtype, device=device, seed=1)
    (logprobs,), grad = outputs_and_grad(token_logprobs, logits, labels)
    (ref_logprobs,), ref_grad = outputs_and_grad(reference.token_logprobs, logits, labels)
    torch.testing.assert_close(logprobs, ref_logprobs, rtol=1e-5, atol=1e-5)
    assert_grads_close(grad, ref_grad, dtype)


def test_fp32_results_are_close_to_a_float64_oracle(device):
    logits, labels = make_inputs((4,), 32003, dtype=torch.float32, device=device, scale=3.0, seed=2)
    logprobs, entropy = token_logprobs(logits, labels, temperature=0.7, return_entropy=True)
    oracle_logprobs, oracle_entropy = float64_oracle(logits, labels, temperature=0.7)
    torch.testing.assert_close(logprobs.double(), oracle_logprobs, rtol=1e-6, atol=5e-6)
    torch.testing.assert_close(entropy.double(), oracle_entropy, rtol=1e-6, atol=5e-6)


def test_int32_labels_give_the_same_results(device):
    logits, labels = make_inputs((2, 4), 33, dtype=torch.float32, device=device, seed=3)
    labels[0, 1] = -100
    expected, expected_grad = outputs_and_grad(token_logprobs, logits, labels, return_entropy=True)
    actual, actual_grad = outputs_and_grad(token_logprobs, logits, labels.int(), return_entropy=True)
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(actual_grad, expected_grad, rtol=0, atol=0)


def test_single_time_step_and_empty_batches(device):
    logits, labels = make_inputs((3, 1), 50, dtype=torch.float32, device=device, seed=4)
    (logprobs,), grad = outputs_and_grad(token_logprobs, logits, labels)
    (ref_logprobs,), ref_grad = outputs_and_grad(reference.token_logprobs, logits, labels)
    assert logprobs.shape == (3, 1)
    torch.testing.assert_close(logprobs, ref_logprobs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)

    for shape in [(0,), (2, 0)]:
        empty_logits, empty_labels = make_inputs(shape, 11, dtype=torch.bfloat16, device=device)
        (logprobs, entropy), grad = outputs_and_grad(token_logprobs, empty_logits, empty_labels,
                                                     return_entropy=True)
        assert logprobs.shape == entropy.shape == shape
        assert grad.shape == empty_logits.shape and grad.dtype == torch.bfloat16
        (lp, kl), kl_grad = outputs_and_grad(logprob_kl, empty_logits, empty_labels,
                                             torch.zeros(shape, device=device))
        assert lp.shape == kl.shape == shape and kl_grad.shape == empty_logits.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_logits(device, dtype):
    logits, labels = make_inputs((6,), 999, dtype=dtype, device=device, scale=1e4, seed=5)
    labels[0] = logits[0].float().argmax()  # one position near logprob 0, the rest hugely negative
    (logprobs, entropy), grad = outputs_and_grad(token_logprobs, logits, labels, return_entropy=True)
    (ref_logprobs, ref_entropy), ref_grad = outputs_and_grad(
        reference.token_logprobs, logits, labels, return_entropy=True)
    torch.testing.assert_close(logprobs, ref_logprobs, rtol=1e-5, atol=1e-5)
    oracle_logprobs, oracle_entropy = float64_oracle(logits, labels)
    torch.testing.assert_close(logprobs.double(), oracle_logprobs, rtol=1e-6, atol=1e-5)
    # At |z| ~ 1e4 an fp32 ulp is ~1e-3: the reference's lse - sum p z carries that error.
    torch.testing.assert_close(entropy, ref_entropy, rtol=0, atol=5e-3)
    torch.testing.assert_close(entropy.double(), oracle_entropy, rtol=0, atol=1e-5)
    assert_grads_close(grad, ref_grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [300, 5000])  # on CUDA: a warp per row, a block per row
def test_minus_infinity_logits(device, dtype, vocab):
    logits, labels = make_inputs((4,), vocab, dtype=dtype, device=device, seed=6)
    masked = torch.zeros(4, vocab, dtype=torch.bool)
    masked[:, ::3] = True  # every third token masked, so whole 16-value lanes are never all masked
    masked[1, :] = True
    masked[1, 7] = False  # a row with a single finite entry
    masked[2, :200] = True  # a leading masked stretch longer than any block's first loads
    labels = torch.tensor([1, 7, 250, 0], device=device)  # label of row 3 is masked: logprob -inf
    logits = logits.masked_fill(masked.to(device), float("-inf"))

    (logprobs, entropy), grad = outputs_and_grad(token_logprobs, logits, labels, return_entropy=True)
    (ref_logprobs, ref_entropy), ref_grad = outputs_and_grad(
        reference.token_logprobs, logits, labels, return_entropy=True)
    assert logprobs[3] == float("-inf") and ref_logprobs[3] == float("-inf")
    assert logprobs[1] == 0.0 and entropy[1] == 0.0
    assert torch.isfinite(entropy).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(logprobs, ref_logprobs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, ref_entropy, rtol=1e-5, atol=1e-5)
    assert (grad[masked.to(device) & (torch.arange(vocab, device=device) != labels[:, None])] == 0).all()
    assert_grads_close(grad, ref_grad, dtype)


@pytest.mark.parametrize("ignore_index", [-100, -1, 5])
def test_ignored_positions_give_zero_and_no_gradient(device, ignore_index):
    logits, labels = make_inputs((3, 4), 40, dtype=torch.float32, device=device, seed=7)
    labels[labels == ignore_index] = 6
    labels[0, 0] = labels[2, 3] = labels[1, :] = ignore_index
    logits[1, 2] = float("nan")  # an ignored row is never read
    ignored = labels == ignore_index

    (logprobs, entropy), grad = outputs_and_grad(
        token_logprobs, logits, labels, ignore_index=ignore_index, return_entropy=True)
    assert (logprobs[ignored] == 0).all() and (entropy[ignored] == 0).all()
    assert (grad[ignored] == 0).all()
    assert torch.isfinite(grad).all()

    clean = logits.nan_to_num(0.0)
    (ref_logprobs, ref_entropy), ref_grad = outputs_and_grad(
        reference.token_logprobs, clean, labels, ignore_index=ignore_index, return_entropy=True)
    torch.testing.assert_close(logprobs, ref_logprobs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, ref_entropy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_row_strided_logits_are_read_in_place(device, dtype):
    big, labels = make_inputs((6,), 1001, dtype=dtype, device=device, seed=8)
    sequences, _ = make_inputs((2, 5), 129, dtype=dtype, device=device, seed=9)
    sequence_labels = torch.randint(0, 128, (2, 4), device=device)
    views = [
        (big[:, :-1], labels.clamp(max=999)),  # vocab slice: row stride 1001
        (big[::2], labels[::2]),  # every other row
        (sequences[:, :-1, :-1], sequence_labels),  # [B, T+1, V+1] -> [B, T, V]: two strides
    ]
    for view, view_labels in views:
        rows, _ = _as_rows(view)
        assert rows is view, "a view with a contiguous vocab dim and <= 2 leading strides needs no copy"
        (logprobs, entropy), grad = outputs_and_grad(token_logprobs, view, view_labels, return_entropy=True)
        (ref_logprobs, ref_entropy), ref_grad = outputs_and_grad(
            reference.token_logprobs, view, view_labels, return_entropy=True)
        torch.testing.assert_close(logprobs, ref_logprobs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(entropy, ref_entropy, rtol=1e-5, atol=1e-5)
        assert_grads_close(grad, ref_grad, dtype)


def test_non_contiguous_vocab_dim_is_copied_and_correct(device):
    logits, labels = make_inputs((30,), 20, dtype=torch.float32, device=device, seed=10)
    transposed = logits.t()  # [20, 30] with vocab stride 20
    transposed_labels = labels[:20]
    (logprobs,), grad = outputs_and_grad(token_logprobs, transposed, transposed_labels)
    (ref_logprobs,), ref_grad = outputs_and_grad(reference.token_logprobs, transposed, transposed_labels)
    torch.testing.assert_close(logprobs, ref_logprobs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)


def test_forward_saves_the_logits_themselves_and_only_row_statistics(device):
    logits, labels = make_inputs((8,), 500, dtype=torch.bfloat16, device=device, seed=11)
    logits.requires_grad_(True)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        token_logprobs(logits, labels, return_entropy=True)
    large = [tensor for tensor in saved if tensor.numel() > labels.numel()]
    assert len(large) == 1 and large[0].data_ptr() == logits.data_ptr() and large[0].dtype == torch.bfloat16


@pytest.mark.parametrize("kl", ["k1", "k2", "k3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_logprob_kl_matches_reference(device, kl, dtype):
    logits, labels = make_inputs((3, 4), 517, dtype=dtype, device=device, seed=12)
    labels[1, 1] = -100
    generator = torch.Generator().manual_seed(13)
    ref_logprobs = (-torch.rand(3, 4, generator=generator) * 8).to(device)
    (logprobs, kl_values), grad = outputs_and_grad(
        logprob_kl, logits, labels, ref_logprobs, kl=kl, temperature=0.7)
    (expected_logprobs, expected_kl), expected_grad = outputs_and_grad(
        reference.logprob_kl, logits, labels, ref_logprobs, kl=kl, temperature=0.7)
    torch.testing.assert_close(logprobs, expected_logprobs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl_values, expected_kl, rtol=1e-5, atol=1e-5)
    assert kl_values[1, 1] == 0 and (grad[1, 1] == 0).all()
    assert_grads_close(grad, expected_grad, dtype, atol=1e-4)


def test_logprob_kl_gives_ref_logprobs_no_gradient_and_takes_any_float_dtype(device):
    logits, labels = make_inputs((5,), 64, dtype=torch.float32, device=device, seed=14)
    logits.requires_grad_(True)
    ref_logprobs = torch.full((5,), -3.0, device=device, dtype=torch.bfloat16, requires_grad=True)
    logprobs, kl_values = logprob_kl(logits, labels, ref_logprobs, kl="k2")
    expected_logprobs, expected_kl = reference.logprob_kl(logits, labels, ref_logprobs, kl="k2")
    torch.testing.assert_close(kl_values, expected_kl, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logprobs, expected_logprobs, rtol=1e-5, atol=1e-5)
    (logprobs + kl_values).sum().backward()
    assert ref_logprobs.grad is None and logits.grad is not None


def test_invalid_arguments_raise(device):
    logits, labels = make_inputs((2, 3), 10, dtype=torch.float32, device=device)
    with pytest.raises(ValueError, match="labels: shape"):
        token_logprobs(logits, labels[:, :2])
    with pytest.raises(ValueError, match="logits: dtype torch.float64"):
        token_logprobs(logits.double(), labels)
    with pytest.raises(ValueError, match="logits: dtype torch.int64"):
        token_logprobs(labels.unsqueeze(-1), labels)
    with pytest.raises(ValueError, match="labels: dtype torch.float32"):
        token_logprobs(logits, labels.float())
    with pytest.raises(ValueError, match="V > 0"):
        token_logprobs(logits[..., :0], labels)
    with pytest.raises(TypeError, match="logits: expected a torch.Tensor"):
        token_logprobs(logits.tolist(), labels)
    for temperature in [0.0, -1.0, math.nan, math.inf]:
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            token_logprobs(logits, labels, temperature=temperature)
    ref_logprobs = torch.zeros(2, 3, device=device)
    with pytest.raises(ValueError, match=r"kl must be one of \('k1', 'k2', 'k3'\), got 'k4'"):
        logprob_kl(logits, labels, ref_logprobs, kl="k4")
    with pytest.raises(ValueError, match="ref_logprobs: shape"):
        logprob_kl(logits, labels, ref_logprobs[0])
    with pytest.raises(ValueError, match="ref_logprobs: expected a floating-point tensor"):
        logprob_kl(logits, labels, labels)


@pytest.mark.parametrize("bad_label", [10, -5])
def test_out_of_range_label_raises_on_cpu(bad_label):
    logits, labels = make_inputs((2, 3), 10, dtype=torch.float32, device="cpu")
    labels[1, 2] = bad_label
    with pytest.raises(ValueError, match=rf"label {bad_label} at position 5 is outside \[0, 10\)"):
        token_logprobs(logits, labels)
    with pytest.raises(ValueError, match="is outside"):
        logprob_kl(logits, labels, torch.zeros(2, 3))


@pytest.mark.cuda
def test_out_of_range_label_gives_nan_on_cuda():
    logits, labels = make_inputs((2, 3), 10, dtype=torch.float32, device="cuda")
    labels[1, 2] = 10
    (logprobs, entropy), grad = outputs_and_grad(token_logprobs, logits, labels, return_entropy=True)
    assert torch.isnan(logprobs[1, 2]) and torch.isnan(entropy[1, 2]) and torch.isnan(grad[1, 2]).all()
    assert torch.isfinite(logprobs[0]).all() and torch.isfinite(grad[0]).all()


def test_devices_without_a_kernel_use_the_reference():
    logits = torch.empty(2, 3, 10, device="meta")
    labels = torch.empty(2, 3, dtype=torch.int64, device="meta")
    logprobs, entropy = token_logprobs(logits, labels, return_entropy=True)
    assert logprobs.device.type == "meta" and logprobs.shape == (2, 3) and entropy.shape == (2, 3)
