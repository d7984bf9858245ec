"""Generation through transformers' own `generate`, for model families `GenerationEngine` does not
implement (GPT-2, Gemma, Phi-3, ...): slower (transformers' dynamic cache, no fused weights, finished
sequences stay in the batch), with the engine's interface and output.

    generator = HFGenerator(model, max_batch=8)
    batch = generator.generate(prompts, SamplingParams(temperature=0.7, top_p=0.9, seed=0), tokenizer=tok)
    ... optimizer step on `model` ...
    generator.refitter(model).refit()      # nothing to copy: it generates with the live model

What it keeps from the engine (`stema.rollout.engine`, `stema.rollout.sampling`):
- Batching: at most `max_batch` prompts per `generate` call of transformers, LEFT-padded, with an
  attention mask (transformers derives each token's position from it).
- Sampling: only the `SamplingParams`. The checkpoint's `generation_config` (its own top_k,
  repetition penalty, ...) is set aside for the call, as the engine ignores it; temperature, then
  top-k, then top-p (transformers' order, which the engine follows); temperature 0 is greedy.
- Seeding: transformers samples from torch's global generator, so each call seeds it with
  `params.seed` inside `torch.random.fork_rng` (the caller's RNG state is left as it was): same seed,
  prompts, order and weights give the same samples. They are not the engine's samples for that seed.
- End of a sequence: an EOS token (`params.eos_token_ids`, else the model's) -> "eos"; a stop string
  -> "stop" (transformers generates on while other rows run; the response is cut after the token
  that completed the stop string); `max_new_tokens` -> "length".
- Log-probs: log softmax(logits / T)[token] over the full vocabulary (T = 1 when greedy), as the
  engine reports them, from the raw logits transformers computes at each step.

Importing this module does not import transformers.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

import stema_kernels

from .architecture import unwrap_hf_model
from .engine import Rollout, RolloutBatch, checked_prompts, special_token_ids
from .sampling import SamplingParams, StopStringMatcher

__all__ = ["HFGenerator"]


class _SampledTokenLogprobs:
    """A transformers logits processor that records the log-prob of each sampled token and leaves
    the scores as they are.

    Called at step s with input_ids [B, P + s] and that step's raw logits [B, V]; the token sampled
    from step s - 1's logits is input_ids[:, -1], so only one step's logits are held at a time.
    `finish(sequences)` adds the last step's token. Placed before transformers' temperature/top-k/
    top-p warpers (custom processors run first), it sees the model's logits unchanged.
    """

    def __init__(self, *, prompt_width: int, temperature: float):
        self.prompt_width = prompt_width
        self.temperature = temperature
        self.previous_logits: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []  # per step: [B] fp32

    def _record(self, sampled: torch.Tensor) -> None:
        self.steps.append(stema_kernels.token_logprobs(self.previous_logits, sampled, temperature=self.temperature))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] > self.prompt_width:
            self._record(input_ids[:, -1])
        self.previous_logits = scores.detach().clone()
        return scores

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """[B, R] fp32 CPU log-probs of the R = len(steps) + 1 generated columns of sequences [B, P + R]."""
        self._record(sequences[:, -1])
        return torch.stack(self.steps, dim=1).float().cpu()


@contextlib.contextmanager
def _neutral_generation_config(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, `model.generation_config` is transformers' plain default, so that
    `generate` fills the fields STEMA does not set (repetition penalty, min_p, ...) with neutral
    values instead of the checkpoint's."""
    from transformers import GenerationConfig

    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


class HFGenerator:
    """Generates with a transformers causal LM's own `generate`; see the module docstring.

    Args:
        model: the causal LM (or its peft wrapper) as the caller trains it; the generator holds it,
            not a copy.
        max_batch: most prompts per call of transformers' `generate`.
    """

    def __init__(self, model: torch.nn.Module, *, max_batch: int):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model
        self.max_batch = max_batch
        self.eos_token_ids, self.pad_token_id = special_token_ids(unwrap_hf_model(model))

    @property
    def model_type(self) -> str:
        return str(getattr(unwrap_hf_model(self.model).config, "model_type", None))

    def refitter(self, model: torch.nn.Module, *, world=None, bucket_bytes: int = 0) -> _FollowModel:
        """What `refit()`s this generator to `model`'s current weights: it generates with `model`
        itself from then on (the trained, placed model), so nothing is copied (`world` and
        `bucket_bytes` do not matter: the generator runs in one process)."""
        return _FollowModel(self, model)

    @torch.no_grad()
    def generate(self, prompt_token_lists: list[list[int]], params: SamplingParams, *, tokenizer=None) -> RolloutBatch:
        """A response to each prompt (lists of token ids), in prompt order; see the module docstring.
        `tokenizer` is needed for `params.stop_strings` and fills `Rollout.text`."""
        from stema.models.loading import eval_mode

        prompts = self._checked_prompts(prompt_token_lists, params)
        eos_token_ids = self.eos_token_ids if params.eos_token_ids is None else params.eos_token_ids
        stop_matcher = StopStringMatcher(params.stop_strings, tokenizer)
        sequences: list[Rollout] = []
        devices = [self._device()] if self._device().type == "cuda" else []
        neutral_config = _neutral_generation_config(unwrap_hf_model(self.model))
        with torch.random.fork_rng(devices=devices), eval_mode(self.model), neutral_config:
            if params.seed is None:
                torch.seed()  # a fresh random seed, as the engine's generator takes one
            else:
                torch.manual_seed(params.seed)
            for start in range(0, len(prompts), self.max_batch):
                chunk = prompts[start : start + self.max_batch]
                responses, logprobs = self._generate_chunk(chunk, params, eos_token_ids)
                for prompt, response, row_logprobs in zip(chunk, responses, logprobs):
                    sequences.append(cut_response(prompt, response, row_logprobs, eos=frozenset(eos_token_ids),
                                            stop_matcher=stop_matcher, tokenizer=tokenizer))
        return RolloutBatch(sequences, self.pad_token_id)

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _generate_chunk(self, prompts: list[list[int]], params: SamplingParams,
                        eos_token_ids: tuple[int, ...]) -> tuple[list[list[int]], torch.Tensor]:
        """(generated tokens of each prompt, transformers' padding after an EOS included, [n, R]
        log-probs) for at most max_batch prompts."""
        from transformers import GenerationConfig, LogitsProcessorList

        width = max(map(len, prompts))
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.int64)
        attention_mask = torch.zeros(len(prompts), width, dtype=torch.int64)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt):] = torch.tensor(prompt)
            attention_mask[row, width - len(prompt):] = 1
        sampling = {} if params.greedy else dict(temperature=float(params.temperature), top_k=params.top_k,
                                                 top_p=float(params.top_p))
        config = GenerationConfig(
            do_sample=not params.greedy, max_new_tokens=params.max_new_tokens, eos_token_id=list(eos_token_ids) or None,
            pad_token_id=self.pad_token_id, **sampling,
        )
        recorder = _SampledTokenLogprobs(prompt_width=width, temperature=params.logprob_temperature)
        device = self._device()
        output = self.model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                     generation_config=config, logits_processor=LogitsProcessorList([recorder]))
        generated = output[:, width:]  # [n, R], R <= max_new_tokens
        return generated.tolist(), recorder.finish(output)

    def _checked_prompts(self, prompt_token_lists, params: SamplingParams) -> list[list[int]]:
        model = unwrap_hf_model(self.model)
        return checked_prompts(prompt_token_lists, params, vocab_size=model.get_input_embeddings().weight.shape[0],
                               max_total_len=getattr(model.config, "max_position_embeddings", None),
                               limit=f"the {self.model_type} model's max_position_embeddings")


def cut_response(prompt: list[int], generated: list[int], logprobs: torch.Tensor, *, eos: frozenset[int],
           stop_matcher: StopStringMatcher, tokenizer) -> Rollout:
    """The `Rollout` of one row of transformers' output: its tokens up to the first EOS, the token
    that completes a stop string, or max_new_tokens, whichever comes first (the engine's rule)."""
    response: list[int] = []
    reason = "length"
    for token in generated:
        response.append(token)
        if token in eos:
            reason = "eos"
            break
        if stop_matcher and stop_matcher.matches(response):
            reason = "stop"
            break
    return Rollout(
        prompt_token_ids=prompt,
        token_ids=response,
        logprobs=logprobs[:len(response)].clone(),
        finish_reason=reason,
        text=None if tokenizer is None else tokenizer.decode(response, skip_special_tokens=True),
    )


class _FollowModel:
    """The refitter of an `HFGenerator`: `refit()` makes it generate with `model` (no copy)."""

    def __init__(self, generator: HFGenerator, model: torch.nn.Module):
        self.generator = generator
        self.model = model

    def refit(self) -> None:
        self.generator.model = self.model
