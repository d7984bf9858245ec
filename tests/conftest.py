"""Shared fixtures: the devices a kernel test runs on, and the `cuda` marker's skip reason."""

from __future__ import annotations

import pytest
import torch

import stema_kernels
from stema_kernels import _dispatch


def cuda_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device visible to torch (CUDA kernel tests run on the GPU machine)"
    if not _dispatch._C.has_cuda:
        return "stema_kernels._C was built without CUDA kernels (nvcc not found or STEMA_CUDA=OFF)"
    return None


def pytest_collection_modifyitems(config, items):
    reason = cuda_skip_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Runs a test once on the CPU and once on CUDA (the CUDA run skips where no GPU is lent)."""
    return request.param


@pytest.fixture(scope="session")
def build_info() -> dict:
    return stema_kernels.build_info()


@pytest.fixture(scope="session")
def llama_path(tmp_path_factory):
    """A tiny random Llama folder (`stema.models.families`: hidden size 32, 2 layers), saved once for
    the session; tests read it and never write into it."""
    from stema.models.families import save_family_model

    return save_family_model(tmp_path_factory.mktemp("models") / "llama", "llama")
