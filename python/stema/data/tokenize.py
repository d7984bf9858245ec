"""Tokenize examples with a Hugging Face tokenizer, mark which tokens are trained, and fit them to max_length.

How a (prompt, completion) becomes tokens:

- Plain strings: `[BOS] + tokens(prompt) + tokens(completion) + [EOS]`, each part tokenized without special
  tokens. BOS is added when the tokenizer has one distinct from EOS and the prompt does not already start with it
  (Llama, Mistral, Gemma and the tiny tokenizer have one; Qwen2 has none; GPT-2's is its EOS). EOS is appended
  unless the completion already ends with it, as TRL does. Prompt and completion are tokenized separately (as
  TRL's DPOTrainer does; TRL's SFTTrainer tokenizes them jointly and takes the common prefix), so the trained
  context is exactly the prompt tokens the model sees when generating from that prompt.
- Messages: through `tokenizer.apply_chat_template`. Each assistant turn of the completion is trained: its span
  runs from the end of the rendering of the messages before it (with the generation prompt) to the end of the
  rendering that includes it. Every partial rendering must be a prefix of the full rendering's tokens; a
  template for which that fails (it rewrites earlier turns) is an error naming the example, since the
  boundary would otherwise be guessed.

Over-long examples follow `truncation`: 'error' raises, 'drop' skips, 'truncate' cuts the end of the completion
(never the prompt; an example whose prompt alone fills max_length is dropped). A `LengthReport` counts each case.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from stema.data.errors import DataError
from stema.data.formats import (
    AttributeExample,
    PreferenceExample,
    PromptExample,
    SFTExample,
    TextOrMessages,
    UnpairedExample,
)

IGNORE_INDEX = -100
Truncation = Literal["error", "drop", "truncate"]


@dataclass
class LengthReport:
    """Counts of how a data split fit into max_length; `summary()` is the line the trainer prints."""

    name: str
    max_length: int
    kept: int = 0
    truncated: int = 0
    dropped: int = 0
    dropped_long_prompt: int = 0
    identical_pairs: int = 0  # preference pairs dropped because chosen equals rejected (after any truncation)
    longest: int = 0

    @property
    def total(self) -> int:
        return self.kept + self.dropped + self.identical_pairs

    def summary(self) -> str:
        truncated = f" ({self.truncated} truncated to {self.max_length} tokens)" if self.truncated else ""
        long_prompts = f", {self.dropped_long_prompt} of them because the prompt alone reaches max_length" if self.dropped_long_prompt else ""
        dropped = f"; {self.dropped} dropped as longer than max_length={self.max_length}{long_prompts}" if self.dropped else ""
        identical = f"; {self.identical_pairs} pairs dropped as their chosen and rejected are the same" if self.identical_pairs else ""
        return f"{self.name}: {self.total} examples, {self.kept} kept{truncated}{dropped}{identical}; longest {self.longest} tokens"

    def fit(self, length: int, prompt_length: int, *, truncation: Truncation, location: str) -> int | None:
        """Record one example of `length` tokens (`prompt_length` of them prompt); its kept length, None to drop."""
        self.longest = max(self.longest, length)
        if length <= self.max_length:
            self.kept += 1
            return length
        if truncation == "error":
            raise DataError(
                f"{location}: {length} tokens (prompt {prompt_length}) is longer than data.max_length={self.max_length}; "
                "set data.truncation to 'drop' or 'truncate', or raise data.max_length"
            )
        if truncation == "truncate" and prompt_length < self.max_length:
            self.kept += 1
            self.truncated += 1
            return self.max_length
        self.dropped += 1
        if prompt_length >= self.max_length:
            self.dropped_long_prompt += 1
        return None


@dataclass(frozen=True)
class TokenizedSFT:
    """One training sequence; `labels` is `input_ids` with -100 on untrained tokens."""

    input_ids: list[int]
    labels: list[int]
    location: str = ""


@dataclass(frozen=True)
class TokenizedPair:
    """A tokenized preference pair. `chosen_ids`/`rejected_ids` are the full sequences (prompt + response + EOS)
    starting with the shared `prompt_ids`; their labels are -100 on the prompt."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    chosen_labels: list[int]
    rejected_labels: list[int]
    location: str = ""
    chosen_reward: float | None = None
    rejected_reward: float | None = None
    margin: float | None = None


@dataclass(frozen=True)
class TokenizedAttributes:
    """A scored sequence for a regression reward model: `labels[i]` per attribute, -100 where unknown."""

    input_ids: list[int]
    labels: list[float]
    location: str = ""


@dataclass(frozen=True)
class TokenizedUnpaired:
    """A KTO sequence (labels -100 on the prompt) and whether the completion is desirable."""

    input_ids: list[int]
    labels: list[int]
    label: bool
    location: str = ""


@dataclass(frozen=True)
class TokenizedPrompt:
    """A prompt ready for generation (ends with the generation prompt for messages) and the prompt it came from."""

    input_ids: list[int]
    prompt: TextOrMessages
    location: str = ""


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def encode_prompt(prompt: TextOrMessages, tokenizer: Any, *, location: str = "prompt") -> list[int]:
    """The token ids a completion is generated after: BOS + prompt, or the chat rendering with the generation prompt."""
    if isinstance(prompt, str):
        ids = _plain_ids(prompt, tokenizer)
        bos = tokenizer.bos_token_id
        if bos is not None and bos != tokenizer.eos_token_id and ids[:1] != [bos]:
            ids = [bos] + ids
        return ids
    return _chat_ids(prompt, tokenizer, add_generation_prompt=True, location=location)


def encode_completion(
    prompt: TextOrMessages, completion: TextOrMessages, tokenizer: Any, *, location: str
) -> tuple[list[int], list[bool], int]:
    """(ids, trained, prompt_length) of prompt + completion; `trained[i]` marks completion tokens (assistant turns)."""
    if isinstance(prompt, str):
        prompt_ids = encode_prompt(prompt, tokenizer, location=location)
        completion_ids = _plain_ids(completion, tokenizer)
        if tokenizer.eos_token_id is None:
            raise DataError(f"{location}: the tokenizer has no eos_token, which plain-text completions need to end with")
        if completion_ids[-1:] != [tokenizer.eos_token_id]:
            completion_ids.append(tokenizer.eos_token_id)
        return prompt_ids + completion_ids, [False] * len(prompt_ids) + [True] * len(completion_ids), len(prompt_ids)

    conversation = prompt + completion
    ids = _chat_ids(conversation, tokenizer, add_generation_prompt=False, location=location)
    trained = [False] * len(ids)
    for index in range(len(prompt), len(conversation)):
        if conversation[index]["role"] == "assistant":
            start = _prefix_length(conversation[:index], ids, tokenizer, add_generation_prompt=True, location=location)
            end = _prefix_length(conversation[: index + 1], ids, tokenizer, add_generation_prompt=False, location=location)
            trained[start:end] = [True] * (end - start)
    prompt_length = trained.index(True) if True in trained else len(ids)
    return ids, trained, prompt_length


def _plain_ids(text: str, tokenizer: Any) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _chat_ids(messages: list, tokenizer: Any, *, add_generation_prompt: bool, location: str) -> list[int]:
    from jinja2 import TemplateError

    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{location}: the data is conversational (lists of messages) but the tokenizer has no chat template")
    try:
        # transformers 5 returns a BatchEncoding for tokenize=True; return_dict=True asks for it on 4.x too.
        encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt)
    except TemplateError as error:
        raise DataError(f"{location}: the tokenizer's chat template failed on this conversation: {error}") from None
    return list(encoded["input_ids"])


def _prefix_length(messages: list, full_ids: list[int], tokenizer: Any, *, add_generation_prompt: bool, location: str) -> int:
    """Length of the rendering of `messages`, checked to be a prefix of the full conversation's `full_ids`."""
    ids = _chat_ids(messages, tokenizer, add_generation_prompt=add_generation_prompt, location=location)
    if full_ids[: len(ids)] != ids:
        differ = next((i for i, (a, b) in enumerate(zip(ids, full_ids)) if a != b), min(len(ids), len(full_ids)))
        raise DataError(
            f"{location}: the chat template is not prefix-stable: the first {len(messages)} message(s) render to tokens "
            f"that are not a prefix of the whole conversation's (they differ at token {differ}: "
            f"{tokenizer.decode(ids[differ:differ + 12])!r} vs {tokenizer.decode(full_ids[differ:differ + 12])!r}), "
            "so where the prompt ends is unknown"
        )
    return len(ids)


def _labels(ids: list[int], trained: list[bool]) -> list[int]:
    return [token if is_trained else IGNORE_INDEX for token, is_trained in zip(ids, trained)]


# ---------------------------------------------------------------------------------------------
# Per-kind tokenization
# ---------------------------------------------------------------------------------------------


def tokenize_sft(
    example: SFTExample,
    tokenizer: Any,
    *,
    max_length: int,
    completion_only_loss: bool = True,
    truncation: Truncation = "drop",
    report: LengthReport | None = None,
) -> TokenizedSFT | None:
    """Tokenize one SFT example; labels are -100 outside the completion's (assistant) tokens when
    `completion_only_loss`, else on no token. None when the example is dropped as too long."""
    report = report or LengthReport("sft", max_length)
    ids, trained, prompt_length = encode_completion(example.prompt, example.completion, tokenizer, location=example.location)
    kept = report.fit(len(ids), prompt_length, truncation=truncation, location=example.location)
    if kept is None:
        return None
    labels = _labels(ids, trained) if completion_only_loss else list(ids)
    return TokenizedSFT(ids[:kept], labels[:kept], example.location)


def tokenize_preference(
    example: PreferenceExample,
    tokenizer: Any,
    *,
    max_length: int,
    truncation: Truncation = "drop",
    report: LengthReport | None = None,
) -> TokenizedPair | None:
    """Tokenize a preference pair; a pair is over-long when either side is, and 'truncate' cuts each
    side's end. A pair whose chosen and rejected tokens are the same (after any truncation) teaches
    nothing: it is dropped and counted in the report."""
    report = report or LengthReport("preference", max_length)
    chosen_ids, chosen_trained, prompt_length = encode_completion(example.prompt, example.chosen, tokenizer, location=example.location)
    rejected_ids, rejected_trained, _ = encode_completion(example.prompt, example.rejected, tokenizer, location=example.location)
    kept = report.fit(max(len(chosen_ids), len(rejected_ids)), prompt_length, truncation=truncation, location=example.location)
    if kept is None:
        return None
    if chosen_ids[:kept] == rejected_ids[:kept]:
        report.kept -= 1
        report.truncated -= int(kept < max(len(chosen_ids), len(rejected_ids)))
        report.identical_pairs += 1
        return None
    return TokenizedPair(
        prompt_ids=chosen_ids[:prompt_length],
        chosen_ids=chosen_ids[:kept],
        rejected_ids=rejected_ids[:kept],
        chosen_labels=_labels(chosen_ids, chosen_trained)[:kept],
        rejected_labels=_labels(rejected_ids, rejected_trained)[:kept],
        location=example.location,
        chosen_reward=example.chosen_reward,
        rejected_reward=example.rejected_reward,
        margin=example.margin,
    )


def tokenize_attributes(
    example: AttributeExample,
    tokenizer: Any,
    *,
    max_length: int,
    truncation: Truncation = "drop",
    report: LengthReport | None = None,
) -> TokenizedAttributes | None:
    """Tokenize prompt + response (or a pre-formatted text) for a regression reward model read at the last token."""
    report = report or LengthReport("attributes", max_length)
    ids, _, prompt_length = encode_completion(example.prompt, example.response, tokenizer, location=example.location)
    kept = report.fit(len(ids), prompt_length, truncation=truncation, location=example.location)
    if kept is None:
        return None
    return TokenizedAttributes(ids[:kept], list(example.labels), example.location)


def tokenize_unpaired(
    example: UnpairedExample,
    tokenizer: Any,
    *,
    max_length: int,
    truncation: Truncation = "drop",
    report: LengthReport | None = None,
) -> TokenizedUnpaired | None:
    """Tokenize a KTO example like an SFT one (completion-only labels) and keep its desirability label."""
    report = report or LengthReport("unpaired", max_length)
    ids, trained, prompt_length = encode_completion(example.prompt, example.completion, tokenizer, location=example.location)
    kept = report.fit(len(ids), prompt_length, truncation=truncation, location=example.location)
    if kept is None:
        return None
    return TokenizedUnpaired(ids[:kept], _labels(ids, trained)[:kept], example.label, example.location)


def tokenize_prompt(
    example: PromptExample,
    tokenizer: Any,
    *,
    max_length: int,
    truncation: Truncation = "drop",
    report: LengthReport | None = None,
) -> TokenizedPrompt | None:
    """Tokenize a prompt for generation; an over-long prompt is never cut ('truncate' drops it like 'drop')."""
    report = report or LengthReport("prompts", max_length)
    ids = encode_prompt(example.prompt, tokenizer, location=example.location)
    if report.fit(len(ids), len(ids), truncation=truncation, location=example.location) is None:
        return None
    return TokenizedPrompt(ids, example.prompt, example.location)
