"""SteerLM's attribute-conditioned prompts: the one template, and SFT data conditioned with it.

The template. Attribute values are integers (rounded and clamped to the configured range); the
attribute string lists them as `name:value` joined by commas, in `data.attributes` order
(`correctness:4,verbosity:2`), and goes on a new last line of the prompt after `attributes: `:

    plain prompt "What is 37+48?"   ->  "What is 37+48?\\nattributes: correctness:4,verbosity:2"
    messages [..., {"role": "user", "content": "What is 37+48?"}]
                                    ->  the same line appended to the LAST user message's content

(a conversation with no user message gets one holding only the line). Training (`stema steerlm`)
and generation (`stema generate --attributes ...`) both go through `condition_prompt`, so the
model sees at inference exactly the prompts it was trained on. The line sits inside the user turn
rather than in a system message because not every chat template accepts a system role.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

from stema.config import ConfigError
from stema.data.errors import DataError
from stema.data.formats import MISSING_LABEL, SFTExample, TextOrMessages, parse_records
from stema.data.io import Record, read_records
from stema.data.tokenize import LengthReport, TokenizedSFT, tokenize_sft

ATTRIBUTE_LINE = "attributes: "
_PAIR = re.compile(r"\s*([A-Za-z_][\w-]*)\s*:\s*(-?\d+(?:\.\d+)?)\s*")


def clamp_value(value: float, *, min_value: int, max_value: int) -> int:
    """An attribute value rounded to the nearest integer and clamped to [min_value, max_value]."""
    return int(min(max_value, max(min_value, math.floor(value + 0.5))))


def format_attributes(values: Mapping[str, int]) -> str:
    """{"correctness": 4, "verbosity": 2} -> "correctness:4,verbosity:2" (in the mapping's order)."""
    return ",".join(f"{name}:{int(value)}" for name, value in values.items())


def parse_attributes(text: str, *, min_value: int, max_value: int, field: str = "generate.attributes") -> dict[str, int]:
    """"quality:4,verbosity:2" -> {"quality": 4, "verbosity": 2}; ConfigError naming `field` when
    a part is not `name:number`, a name repeats, or a value is outside [min_value, max_value]."""
    values: dict[str, int] = {}
    for part in text.split(","):
        match = _PAIR.fullmatch(part)
        if match is None:
            raise ConfigError(f"{field}: expected name:value pairs joined by commas (e.g. 'quality:4,verbosity:2'), got {part!r} in {text!r}")
        name, value = match.group(1), float(match.group(2))
        if name in values:
            raise ConfigError(f"{field}: attribute {name!r} is given twice in {text!r}")
        if not min_value <= value <= max_value:
            raise ConfigError(f"{field}: {name}={match.group(2)} is outside [{min_value}, {max_value}] (steer.min_value, steer.max_value)")
        values[name] = clamp_value(value, min_value=min_value, max_value=max_value)
    return values


def condition_prompt(prompt: TextOrMessages, attribute_string: str) -> TextOrMessages:
    """`prompt` with the attribute line of the template added (see the module docstring)."""
    line = ATTRIBUTE_LINE + attribute_string
    if isinstance(prompt, str):
        return f"{prompt}\n{line}" if prompt else line
    users = [index for index, message in enumerate(prompt) if message["role"] == "user"]
    if not users:
        return [*prompt, {"role": "user", "content": line}]
    conditioned = [dict(message) for message in prompt]
    conditioned[users[-1]]["content"] = f"{conditioned[users[-1]]['content']}\n{line}"
    return conditioned


def record_attributes(fields: Mapping[str, Any], names: Sequence[str], location: str, *, min_value: int, max_value: int) -> dict[str, int]:
    """The record's attribute columns `names` as integers in range; absent, null or -100 columns are left out."""
    values = {}
    for name in names:
        value = fields.get(name)
        if value is None or value == MISSING_LABEL:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise DataError(f"{location}: field '{name}': expected a number (an attribute value), got {value!r}")
        values[name] = clamp_value(value, min_value=min_value, max_value=max_value)
    return values


def _records(data_cfg: Any, split: str) -> list[Record]:
    from stema.data import builtin_attributes

    source = data_cfg.train if split == "train" else data_cfg.eval
    if not source:
        if split == "train":
            raise DataError("data.train: no training data given (annotated SFT records with attribute columns, or 'builtin')")
        return []
    if source != "builtin":
        return read_records(source)
    heldout = split == "eval"
    size = data_cfg.builtin_eval_size if heldout else data_cfg.builtin_size
    where = "builtin-attributes-heldout" if heldout else "builtin-attributes"
    return [Record(fields, f"{where}:item {index}") for index, fields in enumerate(builtin_attributes.sft_records(size, heldout=heldout))]


def load_steered_sft_data(
    data_cfg: Any, tokenizer: Any, split: str = "train", *, min_value: int, max_value: int
) -> tuple[list[TokenizedSFT], LengthReport]:
    """SFT examples of the split whose prompts carry their own attribute string (read from the
    `data_cfg.attributes` columns), tokenized like `stema sft`'s. A record needs at least one
    attribute column."""
    records = _records(data_cfg, split)
    report = LengthReport(f"{split} data ({data_cfg.train if split == 'train' else data_cfg.eval})", data_cfg.max_length)
    examples = parse_records(records, kind="sft", format=data_cfg.format, attributes=data_cfg.attributes)
    tokenized = []
    for record, example in zip(records, examples):
        values = record_attributes(record.fields, data_cfg.attributes, record.location, min_value=min_value, max_value=max_value)
        if not values:
            raise DataError(
                f"{record.location}: no attribute column ({', '.join(data_cfg.attributes)}; data.attributes) has a value; "
                "label the data with `stema annotate` first"
            )
        conditioned = SFTExample(condition_prompt(example.prompt, format_attributes(values)), example.completion, example.location)
        item = tokenize_sft(
            conditioned, tokenizer, max_length=data_cfg.max_length, completion_only_loss=data_cfg.completion_only_loss,
            truncation=data_cfg.truncation, report=report,
        )
        if item is not None:
            tokenized.append(item)
    if records and not tokenized:
        raise DataError(f"{split} data: no examples left: {report.summary()}")
    return tokenized, report
