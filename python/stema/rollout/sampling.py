"""Sampling parameters, the next-token sampler and stop-string matching.

The sampler draws from softmax(logits / T) restricted by top-k and then top-p (the order of
transformers' logits processors); temperature 0 is greedy (argmax, first index on ties).

Seeding: every prompt samples from a random stream of its own. Prompt i of a `generate` call draws
from a generator seeded with `seed + index`, index = `prompt_indices[i]` (its place in the whole
list it was taken from; default i), one draw per generated token (`prompt_generators`). So a
prompt's sample depends only on the seed, its index and the weights, never on which batch or cache
slot it lands in: static and continuous batching, any `max_batch`, a block of prompts generated
with `for_block(first)` (seed + first) and any subset with `for_items(indices)` all sample the same
tokens as one call over the whole list. Equal prompts at different indices (a GRPO group) get different
streams. With `seed` None a fresh random base seed is drawn once per call.

The log-prob reported for each sampled token is log softmax(logits / T)[token] over the FULL
vocabulary: the top-k/top-p truncation is not reflected. PPO's importance ratio compares the
trainer's recomputed log-prob with this one, and the trainer recomputes the full temperature-scaled
policy (it has no truncation), so the engine reports the same quantity; a truncated-and-renormalized
log-prob would be larger by log(1 / kept mass) and bias the ratio. Greedy decoding reports the
log-prob at temperature 1.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

import stema_kernels


def _as_tuple(value, name: str, kind: type) -> tuple:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"SamplingParams.{name}: expected a sequence of {kind.__name__}, got {value!r}")
    items = tuple(value)
    if not all(isinstance(item, kind) and not isinstance(item, bool) for item in items):
        raise TypeError(f"SamplingParams.{name}: every item must be a {kind.__name__}, got {items!r}")
    return items


@dataclass(frozen=True)
class SamplingParams:
    """How `GenerationEngine.generate` samples.

    Attributes:
        temperature: softmax temperature T > 0, or 0 for greedy decoding.
        top_p: nucleus sampling: keep the most likely tokens whose mass reaches top_p (1: off).
        top_k: keep the k most likely tokens (0: off).
        max_new_tokens: most tokens generated per sequence (>= 1).
        eos_token_ids: tokens that end a sequence (kept as its last token); None: the model's
            EOS tokens from its generation config; (): none.
        stop_strings: a sequence ends once its decoded response contains one of these (the tokens
            up to and including the one that completes it are kept); needs a tokenizer.
        seed: base seed of the sampling streams (prompt i of a call: seed + its index; same seed,
            prompts and weights: same samples); None: a fresh random base seed per call.
        prompt_indices: each prompt's index in the whole list (one per prompt of the call); None:
            0, 1, ... (module docstring).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    eos_token_ids: tuple[int, ...] | None = None
    stop_strings: tuple[str, ...] = field(default=())
    seed: int | None = None
    prompt_indices: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise ValueError(f"SamplingParams.temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be an int >= 0 (0: off), got {self.top_k!r}")
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if self.eos_token_ids is not None:
            object.__setattr__(self, "eos_token_ids", _as_tuple(self.eos_token_ids, "eos_token_ids", int))
        stop_strings = _as_tuple(self.stop_strings, "stop_strings", str)
        if any(not text for text in stop_strings):
            raise ValueError("SamplingParams.stop_strings: stop strings must not be empty")
        object.__setattr__(self, "stop_strings", stop_strings)
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"SamplingParams.seed must be an int or None, got {self.seed!r}")
        if self.prompt_indices is not None:
            indices = _as_tuple(self.prompt_indices, "prompt_indices", int)
            if any(index < 0 for index in indices):
                raise ValueError(f"SamplingParams.prompt_indices must be >= 0, got {indices!r}")
            object.__setattr__(self, "prompt_indices", indices)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def for_block(self, first: int) -> "SamplingParams":
        """These params for a batch whose lowest prompt index is `first`: seed `seed + first` (None
        stays None), so a batch samples the same whichever worker or rank generates it."""
        return self if self.seed is None else dataclasses.replace(self, seed=self.seed + first)

    def for_items(self, indices) -> "SamplingParams":
        """These params for a batch of the prompts at `indices` of the whole list: each samples
        from the stream it has in the whole list."""
        return dataclasses.replace(self, prompt_indices=tuple(int(index) for index in indices))

    def stream_indices(self, count: int) -> tuple[int, ...]:
        """The stream index of each of `count` prompts (ValueError when `prompt_indices` has
        another length)."""
        if self.prompt_indices is None:
            return tuple(range(count))
        if len(self.prompt_indices) != count:
            raise ValueError(f"SamplingParams.prompt_indices has {len(self.prompt_indices)} entries for {count} prompts")
        return self.prompt_indices

    @property
    def logprob_temperature(self) -> float:
        """The temperature of the reported log-probs: T, or 1 for greedy decoding."""
        return float(self.temperature) if self.temperature > 0 else 1.0


def step_seed(seed: int, step: int) -> int:
    """The base seed of a training step's sampling streams (prompt i samples from base + i): a
    62-bit hash of (seed, step). Consecutive bases (seed + step) would give prompt i of step k + 1
    the stream of prompt i + 1 of step k, so every step would replay the previous one's random
    draws shifted by a prompt (with a near-uniform policy: the same samples); hashed bases keep the
    steps' stream ranges apart."""
    import numpy

    return int(numpy.random.SeedSequence([seed, step]).generate_state(1, dtype=numpy.uint64)[0] >> 2)


def prompt_generators(seed: int | None, indices, device: torch.device) -> list[torch.Generator]:
    """One torch.Generator on `device` per prompt, seeded with `seed + index` for each of the
    prompts' stream `indices` (`seed` None: a fresh random base seed drawn here). See the module
    docstring."""
    if seed is None:
        seed = torch.Generator().seed() % 2**62  # nondeterministic; the global RNG is left alone
    return [torch.Generator(device=device).manual_seed(seed + index) for index in indices]


def truncate_logits(scaled_logits: torch.Tensor, *, top_k: int, top_p: float) -> torch.Tensor:
    """scaled_logits [n, V] (fp32, already divided by T) with tokens outside top-k, then outside
    the top-p nucleus, set to -inf. The most likely token always stays."""
    if top_k and top_k < scaled_logits.shape[-1]:
        kth_largest = scaled_logits.topk(top_k, dim=-1).values[:, -1:]  # [n, 1]
        scaled_logits = scaled_logits.masked_fill(scaled_logits < kth_largest, -math.inf)
    if top_p < 1:
        sorted_logits, order = scaled_logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # [n, V] mass of more likely tokens
        drop_sorted = mass_before >= top_p  # the first token has mass_before 0 and stays
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        scaled_logits = scaled_logits.masked_fill(drop, -math.inf)
    return scaled_logits


def sample_next_tokens(logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator]) -> torch.Tensor:
    """Next tokens [n] int64 for logits [n, V] (any float dtype); row r draws from generators[r]
    (the stream of the prompt in that row), one draw each."""
    if params.greedy:
        # max(dim).indices: the first maximal index, as argmax, and about 2x faster than argmax on bf16 CPU logits.
        return logits.max(dim=-1).indices
    scaled = logits.to(torch.float32) / params.temperature
    probs = truncate_logits(scaled, top_k=params.top_k, top_p=params.top_p).softmax(dim=-1)  # [n, V]
    return torch.cat([torch.multinomial(probs[row:row + 1], 1, generator=generator)[0]
                      for row, generator in enumerate(generators)])


def sampled_token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """log softmax(logits / T)[token] [n] fp32 over the full vocabulary (see the module
    docstring), through the fused kernel; logits [n, V], tokens [n]."""
    return stema_kernels.token_logprobs(logits, tokens, temperature=params.logprob_temperature)


class StopStringMatcher:
    """Tells whether a response's decoded text contains one of the stop strings.

    Checked after every new token, so a match is always one the newest token completed: only the
    response's last `window` tokens are decoded (a constant cost per token instead of decoding the
    whole response each time). A stop string of n characters takes at most 4n tokens (a UTF-8
    character is at most 4 bytes, and no token is shorter than a byte); the window adds
    `_WINDOW_MARGIN` tokens before them, so that a character split across tokens, or a leading
    space a tokenizer drops from the first token it decodes, sits outside the match."""

    _WINDOW_MARGIN = 8

    def __init__(self, stop_strings: tuple[str, ...], tokenizer) -> None:
        if stop_strings and tokenizer is None:
            raise ValueError("SamplingParams.stop_strings need a tokenizer: pass generate(..., tokenizer=...)")
        self.stop_strings = stop_strings
        self.tokenizer = tokenizer
        self.window = 4 * max((len(stop) for stop in stop_strings), default=0) + self._WINDOW_MARGIN

    def __bool__(self) -> bool:
        return bool(self.stop_strings)

    def matches(self, response_token_ids: list[int]) -> bool:
        """Whether the decoded response contains a stop string, given that it did not before its
        newest token."""
        text = self.tokenizer.decode(response_token_ids[-self.window:])
        return any(stop in text for stop in self.stop_strings)
