"""Data formats: detect which one records are in, validate each record, normalize to one example type per kind.

Kinds and their formats (a record may carry extra fields; they are ignored):

| kind | format | fields |
| --- | --- | --- |
| sft | `messages` (TRL) | `messages`: [{role, content}, ...]; loss on every assistant turn |
| sft | `conversations` (NeMo-Aligner, ShareGPT) | `conversations`: [{from, value}, ...], optional `system` |
| sft | `prompt_completion` (TRL) | `prompt`, `completion`: strings, or lists of messages |
| sft | `input_output` (NeMo-Aligner) | `input`, `output`: strings |
| sft | `prompt_response` (HelpSteer) | `prompt`, `response`: strings, or lists of messages |
| sft | `text` (TRL) | `text`: a string, loss on all of it |
| preference | `preference` (TRL) | `prompt`, `chosen`, `rejected`: strings, or lists of messages |
| preference | `implicit_preference` (TRL) | `chosen`, `rejected`: conversations sharing the prompt messages |
| preference | `nemo_preference` (NeMo-Aligner) | `prompt`, `chosen_response`, `rejected_response`: strings |
| attributes | `regression` (NeMo-Aligner) | `text`, `label`: [k numbers], -100 where unknown |
| attributes | `helpsteer` (HelpSteer) | `prompt`, `response`, one number column per attribute (missing: -100) |
| unpaired | `unpaired` (TRL, for KTO) | `prompt`, `completion`, `label` (true: desirable) |
| prompt | `prompt` (TRL prompt-only) | `prompt`: a string or a list of messages |

Preference records may also carry `chosen_reward`, `rejected_reward` and `margin` numbers.

Every example holds either plain strings or lists of messages, never a mix: plain text is
tokenized as BOS + prompt + completion + EOS, messages through the tokenizer's chat template.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, Sequence

from stema.data.errors import DataError
from stema.data.io import Record

Kind = Literal["sft", "preference", "attributes", "unpaired", "prompt"]
Message = dict[str, Any]  # {"role": ..., "content": ...}, plus any keys the chat template reads
TextOrMessages = str | list[Message]

ROLES = ("system", "developer", "user", "assistant", "tool")
HELPSTEER_ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
MISSING_LABEL = -100.0
_FROM_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant", "system": "system"}


@dataclass(frozen=True)
class SFTExample:
    """A supervised example: `prompt` (plain text, or the messages before the first trained turn) and `completion`
    (plain text, or messages starting with an assistant turn; every assistant turn in it is trained)."""

    prompt: TextOrMessages
    completion: TextOrMessages
    location: str


@dataclass(frozen=True)
class PreferenceExample:
    """A preference pair: one prompt, a chosen and a rejected response (strings, or lists of assistant messages)."""

    prompt: TextOrMessages
    chosen: TextOrMessages
    rejected: TextOrMessages
    location: str
    chosen_reward: float | None = None
    rejected_reward: float | None = None
    margin: float | None = None


@dataclass(frozen=True)
class AttributeExample:
    """A response scored on k attributes; `labels[i]` is -100 where attribute i is unknown.

    A pre-formatted `text` record becomes `prompt=""`, `response=text`.
    """

    prompt: TextOrMessages
    response: TextOrMessages
    labels: list[float]
    location: str


@dataclass(frozen=True)
class UnpairedExample:
    """A single completion judged desirable (`label=True`) or not, for KTO."""

    prompt: TextOrMessages
    completion: TextOrMessages
    label: bool
    location: str


@dataclass(frozen=True)
class PromptExample:
    """A prompt to generate from (PPO, rejection sampling, evaluation)."""

    prompt: TextOrMessages
    location: str


Example = SFTExample | PreferenceExample | AttributeExample | UnpairedExample | PromptExample


@dataclass(frozen=True)
class Format:
    """A registered data format: the fields that identify it and the function that reads one record.

    `attribute_columns`: records also hold one column per name in data.attributes (at least one present).
    """

    name: str
    kind: Kind
    fields: tuple[str, ...]
    parse: Callable[[Mapping[str, Any], str, Sequence[str]], Example]
    attribute_columns: bool = False

    def missing(self, fields: Mapping[str, Any], attributes: Sequence[str]) -> list[str]:
        """The identifying fields absent (or null) in `fields`."""
        absent = [name for name in self.fields if fields.get(name) is None]
        if self.attribute_columns and all(fields.get(name) is None for name in attributes):
            absent.append(" or ".join(attributes) or "(no attribute names given in data.attributes)")
        return absent

    def describe(self, attributes: Sequence[str]) -> str:
        extra = f" + attribute columns ({', '.join(attributes)})" if self.attribute_columns else ""
        return f"{self.name} ({', '.join(self.fields)}{extra})"


FORMATS: dict[str, Format] = {}


def register_format(name: str, *, kind: Kind, fields: tuple[str, ...], attribute_columns: bool = False):
    """Register `parse(fields, location, attributes) -> Example` as format `name`; detection tries formats of a
    kind in registration order, so a format whose fields include another's is registered first."""

    def register(parse):
        FORMATS[name] = Format(name, kind, fields, parse, attribute_columns)
        return parse

    return register


def formats_of(kind: Kind) -> list[Format]:
    return [item for item in FORMATS.values() if item.kind == kind]


def detect_format(fields: Mapping[str, Any], *, kind: Kind, location: str, attributes: Sequence[str] = HELPSTEER_ATTRIBUTES) -> Format:
    """The first `kind` format whose identifying fields the record has; DataError listing fields and formats otherwise."""
    for candidate in formats_of(kind):
        if not candidate.missing(fields, attributes):
            return candidate
    known = "; ".join(item.describe(attributes) for item in formats_of(kind))
    raise DataError(f"{location}: cannot tell the {kind} data format from the fields {sorted(fields)}; known {kind} formats: {known}")


def resolve_format(name: str, *, kind: Kind) -> Format:
    """The format called `name`, checked to be one for `kind` data."""
    names = ", ".join(item.name for item in formats_of(kind))
    if name not in FORMATS:
        raise DataError(f"data.format: unknown format {name!r}; {kind} formats are: auto, {names}")
    if FORMATS[name].kind != kind:
        raise DataError(f"data.format: {name!r} is a format for {FORMATS[name].kind} data, but {kind} data is read here; {kind} formats are: auto, {names}")
    return FORMATS[name]


def parse_records(
    records: Sequence[Record], *, kind: Kind, format: str = "auto", attributes: Sequence[str] = HELPSTEER_ATTRIBUTES
) -> list[Example]:
    """Validate and normalize every record; the first bad one raises DataError naming its location and field.

    With `format="auto"` the format is detected from the first record and every later record must match it.
    """
    if not records:
        return []
    if format == "auto":
        chosen = detect_format(records[0].fields, kind=kind, location=records[0].location, attributes=attributes)
        origin = f" detected from the first record ({records[0].location})"
    else:
        chosen = resolve_format(format, kind=kind)
        origin = " given by data.format"
    examples = []
    for record in records:
        absent = chosen.missing(record.fields, attributes)
        if absent:
            raise DataError(
                f"{record.location}: field '{absent[0]}' is missing, so the record does not match the "
                f"'{chosen.name}' format{origin} (fields here: {', '.join(sorted(record.fields))})"
            )
        examples.append(chosen.parse(record.fields, record.location, attributes))
    return examples


# ---------------------------------------------------------------------------------------------
# Field validation
# ---------------------------------------------------------------------------------------------


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def _string(fields: Mapping[str, Any], name: str, location: str, *, allow_empty: bool) -> str:
    value = fields.get(name)
    if not isinstance(value, str):
        raise DataError(f"{location}: field '{name}': expected a string, got {_describe(value)}")
    if not allow_empty and not value.strip():
        raise DataError(f"{location}: field '{name}' is empty")
    return value


def _number(fields: Mapping[str, Any], name: str, location: str) -> float | None:
    """An optional number field; null or absent is None."""
    value = fields.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{location}: field '{name}': expected a finite number, got {_describe(value)}")
    return float(value)


def _messages(value: Any, name: str, location: str) -> list[Message]:
    """A list of {role, content} messages with known roles and string contents (null-valued keys dropped)."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{location}: field '{name}': expected a non-empty list of messages, got {_describe(value)}")
    messages = []
    for index, message in enumerate(value):
        where = f"{location}: field '{name}[{index}]'"
        if not isinstance(message, dict):
            raise DataError(f"{where}: expected a message {{role, content}}, got {_describe(message)}")
        message = {key: item for key, item in message.items() if item is not None}
        if message.get("role") not in ROLES:
            raise DataError(f"{where}: role must be one of {', '.join(ROLES)}, got {_describe(message.get('role'))}")
        if not isinstance(message.get("content"), str):
            raise DataError(f"{where}: content must be a string, got {_describe(message.get('content'))}")
        messages.append(message)
    return messages


def _text_or_messages(fields: Mapping[str, Any], name: str, location: str, *, allow_empty: bool) -> TextOrMessages:
    value = fields.get(name)
    if isinstance(value, list):
        return _messages(value, name, location)
    if isinstance(value, str):
        return _string(fields, name, location, allow_empty=allow_empty)
    raise DataError(f"{location}: field '{name}': expected a string or a list of messages, got {_describe(value)}")


def _response(fields: Mapping[str, Any], name: str, location: str, prompt: TextOrMessages) -> TextOrMessages:
    """A completion/response: plain when the prompt is plain, else messages starting with a non-empty assistant turn."""
    value = _text_or_messages(fields, name, location, allow_empty=False)
    if isinstance(prompt, str) != isinstance(value, str):
        kinds = ("a string", "a list of messages") if isinstance(prompt, str) else ("a list of messages", "a string")
        raise DataError(f"{location}: field '{name}': the prompt is {kinds[0]} but '{name}' is {kinds[1]}; use both strings or both message lists")
    if isinstance(value, list):
        _check_assistant_turns(value, name, location)
    return value


def _check_assistant_turns(messages: list[Message], name: str, location: str, *, offset: int = 0) -> None:
    """`messages` (the field's items from `offset` on) start with an assistant turn and have no empty assistant turn."""
    if messages[0]["role"] != "assistant":
        raise DataError(f"{location}: field '{name}': must start with an assistant message, got role {messages[0]['role']!r}")
    for index, message in enumerate(messages, start=offset):
        if message["role"] == "assistant" and not message["content"].strip():
            raise DataError(f"{location}: field '{name}[{index}]': the assistant message is empty")


def _split_at_first_assistant(messages: list[Message], name: str, location: str) -> tuple[list[Message], list[Message]]:
    for index, message in enumerate(messages):
        if message["role"] == "assistant":
            _check_assistant_turns(messages[index:], name, location, offset=index)
            return messages[:index], messages[index:]
    raise DataError(f"{location}: field '{name}': no assistant message to train on")


# ---------------------------------------------------------------------------------------------
# SFT formats
# ---------------------------------------------------------------------------------------------


@register_format("messages", kind="sft", fields=("messages",))
def _sft_messages(fields, location, attributes):
    prompt, completion = _split_at_first_assistant(_messages(fields["messages"], "messages", location), "messages", location)
    return SFTExample(prompt, completion, location)


@register_format("conversations", kind="sft", fields=("conversations",))
def _sft_conversations(fields, location, attributes):
    turns = fields["conversations"]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{location}: field 'conversations': expected a non-empty list of {{from, value}} turns, got {_describe(turns)}")
    messages = []
    for index, turn in enumerate(turns):
        where = f"{location}: field 'conversations[{index}]'"
        if not isinstance(turn, dict):
            raise DataError(f"{where}: expected a turn {{from, value}}, got {_describe(turn)}")
        speaker = turn.get("from")
        role = _FROM_ROLES.get(speaker.lower()) if isinstance(speaker, str) else None
        if role is None:
            raise DataError(f"{where}: 'from' must be one of User/Assistant/System (or human/gpt), got {_describe(speaker)}")
        if not isinstance(turn.get("value"), str):
            raise DataError(f"{where}: 'value' must be a string, got {_describe(turn.get('value'))}")
        messages.append({"role": role, "content": turn["value"]})
    prompt, completion = _split_at_first_assistant(messages, "conversations", location)
    # NeMo-Aligner records carry "system": "" when there is no system prompt.
    if fields.get("system") is not None and _string(fields, "system", location, allow_empty=True):
        prompt = [{"role": "system", "content": fields["system"]}] + prompt
    return SFTExample(prompt, completion, location)


@register_format("prompt_completion", kind="sft", fields=("prompt", "completion"))
def _sft_prompt_completion(fields, location, attributes):
    prompt = _text_or_messages(fields, "prompt", location, allow_empty=True)
    return SFTExample(prompt, _response(fields, "completion", location, prompt), location)


@register_format("input_output", kind="sft", fields=("input", "output"))
def _sft_input_output(fields, location, attributes):
    prompt = _string(fields, "input", location, allow_empty=True)
    return SFTExample(prompt, _string(fields, "output", location, allow_empty=False), location)


@register_format("prompt_response", kind="sft", fields=("prompt", "response"))
def _sft_prompt_response(fields, location, attributes):
    prompt = _text_or_messages(fields, "prompt", location, allow_empty=True)
    return SFTExample(prompt, _response(fields, "response", location, prompt), location)


@register_format("text", kind="sft", fields=("text",))
def _sft_text(fields, location, attributes):
    return SFTExample("", _string(fields, "text", location, allow_empty=False), location)


# ---------------------------------------------------------------------------------------------
# Preference formats
# ---------------------------------------------------------------------------------------------


def _scores(fields, location) -> dict[str, float | None]:
    return {name: _number(fields, name, location) for name in ("chosen_reward", "rejected_reward", "margin")}


@register_format("preference", kind="preference", fields=("prompt", "chosen", "rejected"))
def _preference(fields, location, attributes):
    prompt = _text_or_messages(fields, "prompt", location, allow_empty=True)
    chosen = _response(fields, "chosen", location, prompt)
    rejected = _response(fields, "rejected", location, prompt)
    return PreferenceExample(prompt, chosen, rejected, location, **_scores(fields, location))


@register_format("implicit_preference", kind="preference", fields=("chosen", "rejected"))
def _implicit_preference(fields, location, attributes):
    chosen = _messages(fields["chosen"], "chosen", location)
    rejected = _messages(fields["rejected"], "rejected", location)
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise DataError(f"{location}: field 'chosen': 'chosen' and 'rejected' share no prompt messages (implicit-prompt preference format)")
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if len(messages) == shared:
            raise DataError(f"{location}: field '{name}': no messages after the prompt it shares with the other response")
        _check_assistant_turns(messages[shared:], name, location, offset=shared)
    return PreferenceExample(chosen[:shared], chosen[shared:], rejected[shared:], location, **_scores(fields, location))


@register_format("nemo_preference", kind="preference", fields=("prompt", "chosen_response", "rejected_response"))
def _nemo_preference(fields, location, attributes):
    prompt = _string(fields, "prompt", location, allow_empty=True)
    chosen = _string(fields, "chosen_response", location, allow_empty=False)
    rejected = _string(fields, "rejected_response", location, allow_empty=False)
    return PreferenceExample(prompt, chosen, rejected, location, **_scores(fields, location))


# ---------------------------------------------------------------------------------------------
# Attribute (regression reward model) formats
# ---------------------------------------------------------------------------------------------


@register_format("regression", kind="attributes", fields=("text", "label"))
def _regression(fields, location, attributes):
    text = _string(fields, "text", location, allow_empty=False)
    labels = fields["label"]
    if not isinstance(labels, list) or not labels:
        raise DataError(f"{location}: field 'label': expected a non-empty list of numbers (-100 where unknown), got {_describe(labels)}")
    values = [_number({"label": item}, "label", location) for item in labels]
    return AttributeExample("", text, values, location)


@register_format("helpsteer", kind="attributes", fields=("prompt", "response"), attribute_columns=True)
def _helpsteer(fields, location, attributes):
    prompt = _text_or_messages(fields, "prompt", location, allow_empty=True)
    response = _response(fields, "response", location, prompt)
    labels = [_number(fields, name, location) for name in attributes]
    return AttributeExample(prompt, response, [MISSING_LABEL if value is None else value for value in labels], location)


# ---------------------------------------------------------------------------------------------
# Unpaired (KTO) and prompt-only formats
# ---------------------------------------------------------------------------------------------


@register_format("unpaired", kind="unpaired", fields=("prompt", "completion", "label"))
def _unpaired(fields, location, attributes):
    prompt = _text_or_messages(fields, "prompt", location, allow_empty=True)
    completion = _response(fields, "completion", location, prompt)
    if not isinstance(fields["label"], bool):
        raise DataError(f"{location}: field 'label': expected true or false, got {_describe(fields['label'])}")
    return UnpairedExample(prompt, completion, fields["label"], location)


@register_format("prompt", kind="prompt", fields=("prompt",))
def _prompt(fields, location, attributes):
    return PromptExample(_text_or_messages(fields, "prompt", location, allow_empty=False), location)
