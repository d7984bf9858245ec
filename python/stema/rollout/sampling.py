"""Sampling parameters, the next-token sampler and stop-string matching.

The sampler draws from softmax(logits / T) restricted by top-k and then top-p (the order of
transformers' logits processors); temperature 0 is greedy (argmax, first index on ties).

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
        seed: seed of the sampling generator (same seed, prompts and weights: same samples);
            None: a fresh random seed per call.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    eos_token_ids: tuple[int, ...] | None = None
    stop_strings: tuple[str, ...] = field(default=())
    seed: int | None = None

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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def for_block(self, first: int) -> "SamplingParams":
        """These params for a batch whose lowest prompt index is `first`: seed `seed + first` (None
        stays None), so a batch samples the same whichever worker or rank generates it."""
        return self if self.seed is None else dataclasses.replace(self, seed=self.seed + first)

    @property
    def logprob_temperature(self) -> float:
        """The temperature of the reported log-probs: T, or 1 for greedy decoding."""
        return float(self.temperature) if self.temperature > 0 else 1.0


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A torch.Generator on `device` seeded with `seed` (a fresh random seed when None)."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


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


def sample_next_tokens(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """Next tokens [n] int64 for logits [n, V] (any float dtype)."""
    if params.greedy:
        return logits.argmax(dim=-1)
    scaled = logits.to(torch.float32) / params.temperature
    probs = truncate_logits(scaled, top_k=params.top_k, top_p=params.top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


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
