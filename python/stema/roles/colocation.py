"""Colocated placement: the rollout engines live in the actor's processes and share its devices,
so their generation memory (the static KV cache) is held only while they generate.

    release_kv_cache(engines)          # after building them: training gets the memory
    with kv_cache_held(engines):       # allocated (zeroed) for the generation, released after
        pool.generate(...)

The cache tensor object stays the same (its storage is resized to 0 bytes and back), so the
engine and its decoder keep their references; the weight buffers, which refit writes in place,
are never touched. A cache that comes back is zeroed, as a fresh engine's is. Generators without a
static cache (`HFGenerator`: transformers allocates its cache per call) are passed over.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch


def kv_cache_bytes(engine) -> int:
    """Bytes the engine's KV cache holds now (0 while released)."""
    return engine.cache.tensor.untyped_storage().nbytes()


def _cache_capacity(engine) -> int:
    tensor = engine.cache.tensor
    return tensor.numel() * tensor.element_size()


def _with_cache(engines: Sequence) -> list:
    return [engine for engine in engines if hasattr(engine, "cache")]


def release_kv_cache(engines: Sequence) -> None:
    """Free each engine's KV cache memory (to the allocator; on CUDA to the caching allocator)."""
    for engine in _with_cache(engines):
        engine.cache.tensor.untyped_storage().resize_(0)


@contextlib.contextmanager
def kv_cache_held(engines: Sequence) -> Iterator[None]:
    """Each engine's KV cache allocated and zeroed inside the block, released when it ends."""
    engines = _with_cache(engines)
    try:
        for engine in engines:
            engine.cache.tensor.untyped_storage().resize_(_cache_capacity(engine))
            engine.cache.tensor.zero_()
        yield
    finally:
        release_kv_cache(engines)
        if any(engine.device.type == "cuda" for engine in engines):
            torch.cuda.empty_cache()
