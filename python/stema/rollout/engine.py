"""The generation engine: batched sampling with a static KV cache over the engine's own weights.

    engine = GenerationEngine.from_hf(policy, max_batch=8, max_total_len=256)
    refitter = EngineRefitter(engine, policy)            # once
    batch = engine.generate(prompts, SamplingParams(temperature=0.7, top_p=0.9, seed=0), tokenizer=tok)
    tensors = batch.padded()                               # input_ids, masks, positions, log-probs
    ... optimizer step on `policy` ...
    refitter.refit()                                       # in place, no allocation

Batching, continuous (the default): the cache has `max_batch` slots, each holding one sequence from
column 0 (its rotary position is its column). The first `max_batch` prompts are prefilled into the
slots (right-padded, one forward); at every step each slot advances one token at its own column.
When a sequence finishes (EOS, stop string or max_new_tokens), the next waiting prompt is prefilled
into its slot at once, so the batch stays full while prompts wait; once none wait, finished slots
leave and the active ones move to the front (`StaticKVCache.compact`, in place). Prompts admitted
together that are equal (a GRPO group's samples) are prefilled once, and the other slots get a copy
of that slot's cache (`StaticKVCache.copy_slots`).

Batching, static (`continuous_batching=False`): the prompts of one batch of `max_batch` are
LEFT-padded to the longest (their last tokens share a cache column), and each token gets its rotary
position within its own sequence (padding excluded), as in transformers' generate; finished
sequences leave the batch by compaction, and the next batch starts when the whole batch is done.

Both give the same tokens: every prompt samples from a random stream of its own
(`stema.rollout.sampling`), so neither the batch nor the slot a prompt lands in changes its sample;
the arithmetic differs only in the order of floating-point sums (padding, batch shapes).

Weights: the engine holds its own copy in a fused layout (`stema.rollout.decoder.DecoderWeights`),
which refit writes in place. On the CPU (fp32, bf16) the decoder multiplies with oneDNN-prepacked
copies of the linear weights (`prepack`, default on where `can_prepack`; `stema.rollout.packed`):
about 1.6x faster decoding at small batches. Where oneDNN's layout is one `stema_kernels.pack_rows_`
writes (learned when the engine is built), refits write the packed buffers directly and the plain
linear buffers are released; otherwise the engine keeps both and repacks after every refit
(`weights_written`, which every refitter calls; it is part of the refit time).

Log-probs: see `stema.rollout.sampling` (full temperature-scaled policy; truncation not applied).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .architecture import DecoderSpec, check_sequence_length, decoder_spec_from_hf, unwrap_hf_model
from .decoder import Decoder, DecoderWeights, RotaryTable, StaticKVCache
from .packed import LINEAR_NAMES, PackedLinears, can_prepack
from .sampling import (
    SamplingParams,
    StopStringMatcher,
    prompt_generators,
    sample_next_tokens,
    sampled_token_logprobs,
)

__all__ = ["GenerationEngine", "PaddedRollout", "Rollout", "RolloutBatch", "SamplingParams"]


@dataclass(frozen=True)
class Rollout:
    """One generated sequence.

    Attributes:
        prompt_token_ids: the prompt, unpadded.
        token_ids: the generated tokens (an EOS or stop-string token that ended it included).
        logprobs: [len(token_ids)] fp32 CPU sampling log-probs (see `stema.rollout.sampling`).
        finish_reason: "eos", "stop" (a stop string) or "length" (max_new_tokens).
        text: the decoded response (special tokens skipped) when a tokenizer was given, else None.
    """

    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: torch.Tensor
    finish_reason: str
    text: str | None = None


@dataclass(frozen=True)
class PaddedRollout:
    """A batch of prompt + response sequences as trainer-ready tensors, all [B, P + R].

    Prompts are left-padded to P = the longest prompt, responses right-padded to R = the longest
    response, so every response starts at column P. Pass `input_ids`, `attention_mask` and
    `position_ids` to the Hugging Face model (position_ids are needed: with left padding the
    default arange positions would be wrong); logits[:, t - 1] predict input_ids[:, t].

    Attributes:
        input_ids: int64 token ids, `pad_token_id` at padding.
        attention_mask: int64, 1 at prompt and response tokens.
        position_ids: int64 position of each token within its own sequence (0 at padding).
        response_mask: bool, True at generated tokens.
        sampling_logprobs: fp32 engine log-prob of each generated token at its column, 0 elsewhere.
        prompt_width: P.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    response_mask: torch.Tensor
    sampling_logprobs: torch.Tensor
    prompt_width: int


@dataclass
class RolloutBatch:
    """Generated sequences in prompt order, and their padded tensor form (`padded()`)."""

    sequences: list[Rollout]
    pad_token_id: int

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def token_ids(self) -> list[list[int]]:
        return [sequence.token_ids for sequence in self.sequences]

    @property
    def finish_reasons(self) -> list[str]:
        return [sequence.finish_reason for sequence in self.sequences]

    def padded(self, *, device: torch.device | str | None = None) -> PaddedRollout:
        """The `PaddedRollout` of these sequences, on `device` (default CPU)."""
        prompt_width = max(len(sequence.prompt_token_ids) for sequence in self.sequences)
        response_width = max(len(sequence.token_ids) for sequence in self.sequences)
        shape = (len(self.sequences), prompt_width + response_width)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.int64)
        attention_mask = torch.zeros(shape, dtype=torch.int64)
        response_mask = torch.zeros(shape, dtype=torch.bool)
        logprobs = torch.zeros(shape, dtype=torch.float32)
        for row, sequence in enumerate(self.sequences):
            prompt_start = prompt_width - len(sequence.prompt_token_ids)
            response_end = prompt_width + len(sequence.token_ids)
            input_ids[row, prompt_start:prompt_width] = torch.tensor(sequence.prompt_token_ids)
            input_ids[row, prompt_width:response_end] = torch.tensor(sequence.token_ids, dtype=torch.int64)
            attention_mask[row, prompt_start:response_end] = 1
            response_mask[row, prompt_width:response_end] = True
            logprobs[row, prompt_width:response_end] = sequence.logprobs
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        return PaddedRollout(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            position_ids=position_ids.to(device),
            response_mask=response_mask.to(device),
            sampling_logprobs=logprobs.to(device),
            prompt_width=prompt_width,
        )


def _default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _token_id_list(value) -> list[int]:
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(item) for item in value]


def special_token_ids(model: torch.nn.Module) -> tuple[tuple[int, ...], int]:
    """(EOS ids, pad id) from the model's generation config, then its config; pad falls back to
    the first EOS id, then 0."""
    generation_config = getattr(model, "generation_config", None)
    eos = _token_id_list(getattr(generation_config, "eos_token_id", None)) or _token_id_list(
        getattr(model.config, "eos_token_id", None))
    pad = getattr(generation_config, "pad_token_id", None)
    if pad is None:
        pad = getattr(model.config, "pad_token_id", None)
    if pad is None:
        pad = eos[0] if eos else 0
    return tuple(eos), int(pad)


class GenerationEngine:
    """Inference copy of a Llama-family decoder with a static KV cache; see the module docstring.

    Build it with `from_hf`. `weights` (a `DecoderWeights`) and `cache` (a `StaticKVCache`) are
    allocated once; `generate` and `forward` never reallocate them, and `EngineRefitter` writes
    new weights into them in place.
    """

    def __init__(self, spec: DecoderSpec, *, dtype: torch.dtype, device: torch.device, max_batch: int,
                 max_total_len: int, eos_token_ids: tuple[int, ...], pad_token_id: int, continuous_batching: bool = True,
                 prepack: bool | None = None):
        if max_batch < 1 or max_total_len < 2:
            raise ValueError(f"max_batch must be >= 1 and max_total_len >= 2, got {max_batch} and {max_total_len}")
        self.spec = spec
        self.dtype = dtype
        self.device = torch.device(device)
        self.eos_token_ids = eos_token_ids
        self.pad_token_id = pad_token_id
        self.continuous_batching = continuous_batching
        self.weights = DecoderWeights.allocate(spec, dtype=dtype, device=self.device)
        self.cache = StaticKVCache.allocate(spec, max_batch=max_batch, max_total_len=max_total_len, dtype=dtype,
                                            device=self.device)
        rotary = RotaryTable.build(spec.inv_freq, max_positions=max_total_len, dtype=dtype, device=self.device)
        if prepack is None:
            prepack = can_prepack(device=self.device, dtype=dtype)
        elif prepack and not can_prepack(device=self.device, dtype=dtype):
            raise ValueError(f"GenerationEngine: prepack=True needs a CPU engine in float32 (or bfloat16 where oneDNN has "
                             f"bf16 kernels for the CPU) and torch with oneDNN; this one is {dtype} on {self.device}")
        packed = PackedLinears(self.weights, spec, batch_hint=max_batch) if prepack else None
        if packed is not None and packed.in_place:
            # The packed buffers are the linear weights now; refits write them (PackedRows).
            for name in LINEAR_NAMES:
                setattr(self.weights, f"{name}_weight", None)
            self.weights.lm_head = None
            if spec.tied_embeddings:  # tokens are looked up in the packed lm_head
                self.weights.embed = None
        self.decoder = Decoder(spec, self.weights, self.cache, rotary, packed=packed)

    @classmethod
    def from_hf(cls, model: torch.nn.Module, *, dtype: torch.dtype | None = None, max_batch: int,
                max_total_len: int, device: torch.device | str | None = None,
                continuous_batching: bool = True, prepack: bool | None = None) -> GenerationEngine:
        """An engine holding a copy of `model`'s current weights (a peft LoRA model: the merged
        effective weights), in `dtype` (default fp32 on CPU, bf16 on CUDA), on the model's device
        (`device`, when given, must be that device), batching continuously or statically (module
        docstring), its linear weights prepacked or not (`prepack`, module docstring; None: where
        `can_prepack`). Raises UnsupportedModelError for a model outside the Llama family."""
        from .refit import EngineRefitter

        spec = decoder_spec_from_hf(model)
        check_sequence_length(model, max_total_len=max_total_len)
        model_device = next(model.parameters()).device
        device = model_device if device is None else torch.device(device)
        if device != model_device:
            raise ValueError(
                f"GenerationEngine.from_hf: the model is on {model_device} but device={device}; the engine is "
                "filled and refitted by in-place copies within one device, so move the model there first"
            )
        eos_token_ids, pad_token_id = special_token_ids(unwrap_hf_model(model))
        engine = cls(spec, dtype=dtype or _default_dtype(device), device=device, max_batch=max_batch,
                     max_total_len=max_total_len, eos_token_ids=eos_token_ids, pad_token_id=pad_token_id,
                     continuous_batching=continuous_batching, prepack=prepack)
        EngineRefitter(engine, model).refit()
        return engine

    @property
    def max_batch(self) -> int:
        return self.cache.max_batch

    @property
    def max_total_len(self) -> int:
        return self.cache.max_total_len

    def refitter(self, model: torch.nn.Module, *, world=None, bucket_bytes: int = 256 << 20):
        """The `Refitter` that copies `model`'s weights into this engine in place
        (`stema.rollout.bucketed.engine_refitter`: from the shards when `world` has several ranks)."""
        from .bucketed import engine_refitter

        return engine_refitter(self, model, world=world, bucket_bytes=bucket_bytes)

    def bucket_receiver(self, model: torch.nn.Module):
        """What copies weights sent bucket by bucket from a trainer in another process into this
        engine (`stema.rollout.remote.EngineSlots`); `model` is the model it was built from."""
        from .remote import EngineSlots

        return EngineSlots(self, model)

    @property
    def prepacked(self) -> bool:
        """Whether the decoder multiplies with prepacked copies of the linear weights."""
        return self.decoder.packed is not None

    def weights_written(self) -> None:
        """Every writer of `weights` calls this after writing (the refitters do): repacks the
        prepacked copies from the plain buffers (a no-op without prepacking, and for an engine
        whose refits write the packed buffers themselves, `PackedLinears.in_place`)."""
        if self.decoder.packed is not None:
            self.decoder.packed.refresh()

    def buffers(self) -> dict[str, torch.Tensor]:
        """Every buffer the engine allocated at construction (weights, KV cache, key mask)."""
        packed = self.decoder.packed.buffers() if self.decoder.packed is not None else {}
        return {**self.weights.buffers(), **packed, "kv_cache": self.cache.tensor, "key_valid": self.cache.key_valid}

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] (engine dtype) of input_ids [B, T] with an optional attention_mask
        [B, T] (0 at padding, left or right); positions count the unmasked tokens, as in
        `PaddedRollout.position_ids`. Uses (and overwrites) the KV cache."""
        batch, length = input_ids.shape
        self._check_fits(batch, length)
        input_ids = input_ids.to(self.device)
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.to(
            self.device).bool()
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
        self.cache.key_valid[:batch, :length] = valid
        hidden = self.decoder.hidden_states(input_ids, positions, start=0)
        return self.decoder.logits(hidden)

    @torch.no_grad()
    def generate(self, prompt_token_lists: list[list[int]], params: SamplingParams, *,
                 tokenizer=None) -> RolloutBatch:
        """Generate a response to each prompt (lists of token ids); see the module docstring.

        `tokenizer` is needed for `params.stop_strings` and fills `Rollout.text`. Deterministic for
        a given `params.seed`, prompts (and their order) and weights.
        """
        prompts = self._checked_prompts(prompt_token_lists, params)
        eos_token_ids = self.eos_token_ids if params.eos_token_ids is None else params.eos_token_ids
        stop_matcher = StopStringMatcher(params.stop_strings, tokenizer)
        generators = prompt_generators(params.seed, params.stream_indices(len(prompts)), self.device)
        if self.continuous_batching:
            run = _ContinuousGeneration(self, prompts, params, eos_token_ids=eos_token_ids, stop_matcher=stop_matcher,
                                        generators=generators).run()
            return RolloutBatch(run.sequences(tokenizer), self.pad_token_id)
        sequences: list[Rollout] = []
        for start in range(0, len(prompts), self.max_batch):
            stop = start + self.max_batch
            run = _StaticBatchGeneration(self, prompts[start:stop], params, eos_token_ids=eos_token_ids,
                                         stop_matcher=stop_matcher, generators=generators[start:stop]).run()
            sequences.extend(run.sequences(tokenizer))
        return RolloutBatch(sequences, self.pad_token_id)

    def _check_fits(self, batch: int, length: int) -> None:
        if batch > self.max_batch:
            raise ValueError(f"batch of {batch} sequences exceeds the engine's max_batch ({self.max_batch})")
        if length > self.max_total_len:
            raise ValueError(f"{length} tokens exceed the engine's max_total_len ({self.max_total_len})")

    def _checked_prompts(self, prompt_token_lists, params: SamplingParams) -> list[list[int]]:
        return checked_prompts(prompt_token_lists, params, vocab_size=self.spec.vocab_size, max_total_len=self.max_total_len,
                               limit="the engine's max_total_len")


def checked_prompts(prompt_token_lists, params: SamplingParams, *, vocab_size: int, max_total_len: int | None,
                    limit: str) -> list[list[int]]:
    """The prompts as lists of ints; ValueError for no prompts, an empty prompt, a token id outside
    [0, vocab_size), or the longest prompt plus max_new_tokens above `max_total_len` (`limit`
    names it in the message; None: no limit)."""
    prompts = [[int(token) for token in prompt] for prompt in prompt_token_lists]
    if not prompts:
        raise ValueError("generate: no prompts")
    for index, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"generate: prompt {index} is empty (a prompt needs at least one token)")
        if min(prompt) < 0 or max(prompt) >= vocab_size:
            raise ValueError(f"generate: prompt {index} has a token id outside [0, {vocab_size})")
    longest = max(map(len, prompts))
    if max_total_len is not None and longest + params.max_new_tokens > max_total_len:
        raise ValueError(
            f"generate: the longest prompt ({longest} tokens) + max_new_tokens ({params.max_new_tokens}) "
            f"exceeds {limit} ({max_total_len})"
        )
    return prompts


class _Generation:
    """What both batching modes record: each prompt's response, finish reason and log-probs.
    `prompts[row]` samples from `generators[row]`; a subclass's `run()` generates."""

    def __init__(self, engine: GenerationEngine, prompts: list[list[int]], params: SamplingParams, *,
                 eos_token_ids: tuple[int, ...], stop_matcher: StopStringMatcher, generators: list[torch.Generator]):
        self.engine, self.prompts, self.params = engine, prompts, params
        self.eos = frozenset(eos_token_ids)
        self.stop_matcher = stop_matcher
        self.generators = generators
        self.responses: list[list[int]] = [[] for _ in prompts]
        self.finish_reasons: list[str | None] = [None] * len(prompts)
        self.logprobs = torch.zeros(len(prompts), params.max_new_tokens, dtype=torch.float32, device=engine.device)

    def _sample(self, logits: torch.Tensor, rows: list[int]) -> list[int]:
        """Samples the next token of the sequences `rows` (slot s holds rows[s]) from logits [n, V],
        records their log-probs, appends the tokens; returns the slots whose sequences go on."""
        device = self.engine.device
        tokens = sample_next_tokens(logits, self.params, [self.generators[row] for row in rows])  # [n]
        steps = torch.tensor([len(self.responses[row]) for row in rows], device=device)
        self.logprobs[torch.tensor(rows, device=device), steps] = sampled_token_logprobs(logits, tokens, self.params)
        return self._record(rows, tokens.tolist())

    def _record(self, rows: list[int], tokens: list[int]) -> list[int]:
        """Appends each slot's new token; returns the slots whose sequences go on."""
        keep = []
        for slot, (row, token) in enumerate(zip(rows, tokens)):
            response = self.responses[row]
            response.append(token)
            if token in self.eos:
                self.finish_reasons[row] = "eos"
            elif self.stop_matcher and self.stop_matcher.matches(response):
                self.finish_reasons[row] = "stop"
            elif len(response) == self.params.max_new_tokens:
                self.finish_reasons[row] = "length"
            else:
                keep.append(slot)
        return keep

    def sequences(self, tokenizer) -> list[Rollout]:
        logprobs = self.logprobs.cpu()
        return [
            Rollout(
                prompt_token_ids=prompt,
                token_ids=response,
                logprobs=logprobs[row, :len(response)].clone(),
                finish_reason=reason,
                text=None if tokenizer is None else tokenizer.decode(response, skip_special_tokens=True),
            )
            for row, (prompt, response, reason) in enumerate(zip(self.prompts, self.responses, self.finish_reasons))
        ]


class _StaticBatchGeneration(_Generation):
    """One static batch of at most max_batch prompts (module docstring).

    Slot i of the cache holds the sequence `rows[i]` (an index into the prompts); finished
    sequences leave and the remaining slots are compacted to the front.
    """

    def _prefill(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Runs the left-padded prompts; returns (last-token logits [n, V], next positions [n],
        prompt width P)."""
        engine, prompts = self.engine, self.prompts
        width = max(map(len, prompts))
        input_ids = torch.full((len(prompts), width), engine.pad_token_id, dtype=torch.int64)
        valid = torch.zeros(len(prompts), width, dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt):] = torch.tensor(prompt)
            valid[row, width - len(prompt):] = True
        input_ids, valid = input_ids.to(engine.device), valid.to(engine.device)
        key_valid = engine.cache.key_valid
        key_valid[:len(prompts), :width] = valid
        key_valid[:len(prompts), width:width + self.params.max_new_tokens] = True
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
        hidden = engine.decoder.hidden_states(input_ids, positions, start=0)
        next_positions = valid.sum(-1)  # [n] = prompt lengths
        return engine.decoder.logits(hidden[:, -1]), next_positions, width

    def run(self) -> _StaticBatchGeneration:
        logits, positions, width = self._prefill()
        rows = list(range(len(self.prompts)))  # rows[slot]: the prompt in cache slot `slot`
        for step in range(self.params.max_new_tokens):
            keep = self._sample(logits, rows)
            if not keep:
                return self
            tokens = torch.tensor([self.responses[rows[slot]][-1] for slot in keep], device=self.engine.device)
            if len(keep) < len(rows):
                positions = positions[torch.tensor(keep, device=self.engine.device)]
                rows = [rows[slot] for slot in keep]
                self.engine.cache.compact(keep, columns=width + step)
            hidden = self.engine.decoder.hidden_states(tokens[:, None], positions[:, None], start=width + step)
            logits = self.engine.decoder.logits(hidden[:, 0])
            positions = positions + 1
        return self


class _ContinuousGeneration(_Generation):
    """All prompts through the cache's slots, a finished sequence's slot refilled with the next
    waiting prompt (module docstring).

    Per active slot s: `rows[s]` (the prompt it holds), `columns[s]` (the cache column its next
    input token goes to) and `inputs[s]` (that token). A prompt enters with all but its last token
    prefilled (`Decoder.prefill_hidden_states`); its last token is its first decode input, so every
    step decodes exactly one token per slot (`Decoder.decode_hidden_states`).
    """

    def run(self) -> _ContinuousGeneration:
        self.waiting = list(range(len(self.prompts)))[::-1]  # popped from the end: prompt order
        self.rows: list[int] = []
        self.columns: list[int] = []
        self.inputs: list[int] = []
        self._admit(list(range(min(self.engine.max_batch, len(self.prompts)))))
        decoder, device = self.engine.decoder, self.engine.device
        while self.rows:
            hidden = decoder.decode_hidden_states(torch.tensor(self.inputs, device=device),
                                                  torch.tensor(self.columns, device=device))
            keep = set(self._sample(decoder.logits(hidden), self.rows))
            finished = [slot for slot in range(len(self.rows)) if slot not in keep]
            for slot in keep:
                self.inputs[slot] = self.responses[self.rows[slot]][-1]
                self.columns[slot] += 1
            refill = finished[:len(self.waiting)]
            self._admit(refill)
            leaving = finished[len(refill):]
            if leaving:
                self._compact(sorted(keep | set(refill)))
        return self

    def _admit(self, slots: list[int]) -> None:
        """Puts the next waiting prompts into `slots` (new slots at the end or freed ones),
        prefilling all but their last tokens in one forward. A prompt admitted more than once (a
        GRPO group's samples) is prefilled once, and its other slots get a copy of its cache."""
        if not slots:
            return
        device = self.engine.device
        rows = [self.waiting.pop() for _ in slots]
        for slot, row in zip(slots, rows):
            prompt = self.prompts[row]
            if slot == len(self.rows):
                self.rows.append(row)
                self.columns.append(0)
                self.inputs.append(0)
            self.rows[slot], self.columns[slot], self.inputs[slot] = row, len(prompt) - 1, prompt[-1]
        width = max(len(self.prompts[row]) - 1 for row in rows)
        if width == 0:  # one-token prompts: nothing to prefill
            self.engine.cache.key_valid[torch.tensor(slots, device=device)] = False
            return
        first_slot: dict[tuple[int, ...], int] = {}  # each distinct prompt head: the slot prefilled with it
        copies = []  # (source slot, target slot)
        for slot, row in zip(slots, rows):
            head = tuple(self.prompts[row][:-1])
            if head in first_slot:
                copies.append((first_slot[head], slot))
            else:
                first_slot[head] = slot
        input_ids = torch.full((len(first_slot), width), self.engine.pad_token_id, dtype=torch.int64)
        valid = torch.zeros(len(first_slot), width, dtype=torch.bool)
        for index, head in enumerate(first_slot):
            input_ids[index, :len(head)] = torch.tensor(head, dtype=torch.int64)
            valid[index, :len(head)] = True
        self.engine.decoder.prefill_hidden_states(input_ids.to(device), valid.to(device),
                                                  torch.tensor(list(first_slot.values()), device=device))
        if copies:
            sources, targets = (torch.tensor(side, device=device) for side in zip(*copies))
            self.engine.cache.copy_slots(sources, targets, columns=width)

    def _compact(self, keep: list[int]) -> None:
        """Moves the slots `keep` (increasing) to the front, dropping the others."""
        columns = max(self.columns[slot] for slot in keep) if keep else 0
        if keep and columns:
            self.engine.cache.compact(keep, columns=columns)
        self.rows = [self.rows[slot] for slot in keep]
        self.columns = [self.columns[slot] for slot in keep]
        self.inputs = [self.inputs[slot] for slot in keep]
