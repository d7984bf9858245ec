"""From `DataConfig` to tokenized examples: read, detect the format, validate every record, then tokenize.

All records are validated before any is tokenized, so bad input stops a run before training starts. Each
loader returns the tokenized examples and a `LengthReport` whose `summary()` the trainer prints. A split
without data (`data.eval` unset) gives an empty list. `data.train: builtin` (and `data.eval: builtin`) read
the built-in arithmetic task (`stema.data.builtin`): `builtin_size` training and `builtin_eval_size` held-out
examples. Packing is a separate step: `stema.data.packing.pack_sft(examples, max_length=...)`.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

from stema.data.builtin import builtin_records
from stema.data.errors import DataError
from stema.data.formats import AttributeExample, Example, Kind, PreferenceExample, parse_records
from stema.data.io import Record, read_records
from stema.data.tokenize import (
    LengthReport,
    TokenizedAttributes,
    TokenizedPair,
    TokenizedPrompt,
    TokenizedSFT,
    TokenizedUnpaired,
    tokenize_attributes,
    tokenize_preference,
    tokenize_prompt,
    tokenize_sft,
    tokenize_unpaired,
)

Split = Literal["train", "eval"]


def _source(data_cfg: Any, split: Split) -> str | None:
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    source = data_cfg.train if split == "train" else data_cfg.eval
    if split == "train" and not source:
        raise DataError("data.train: no training data given (a .jsonl/.json/.parquet file, a save_to_disk folder, or 'builtin')")
    return source or None


def read_examples(data_cfg: Any, *, kind: Kind, split: Split = "train") -> list[Example]:
    """Every record of the split, validated and normalized (DataError at the first bad one); [] when none is given."""
    source = _source(data_cfg, split)
    if source is None:
        return []
    records: list[Record]
    if source == "builtin":
        heldout = split == "eval"
        size = data_cfg.builtin_eval_size if heldout else data_cfg.builtin_size
        records = builtin_records(kind, n=size, heldout=heldout)
    else:
        records = read_records(source)
    examples = parse_records(records, kind=kind, format=data_cfg.format, attributes=data_cfg.attributes)
    _check_consistent(examples)
    return examples


def _check_consistent(examples: list[Example]) -> None:
    """Fields that must agree across records: attribute counts, and which optional pair scores are given."""
    if not examples:
        return
    first = examples[0]
    for example in examples[1:]:
        if isinstance(example, AttributeExample) and len(example.labels) != len(first.labels):
            raise DataError(
                f"{example.location}: field 'label': {len(example.labels)} attribute values, but the first record "
                f"({first.location}) has {len(first.labels)}"
            )
        if isinstance(example, PreferenceExample):
            for name in ("chosen_reward", "rejected_reward", "margin"):
                if (getattr(example, name) is None) != (getattr(first, name) is None):
                    here, there = ("missing", "given") if getattr(example, name) is None else ("given", "missing")
                    raise DataError(
                        f"{example.location}: field '{name}' is {here} here but {there} in the first record "
                        f"({first.location}); give it in all records or none"
                    )


def _load(data_cfg: Any, tokenizer: Any, *, kind: Kind, split: Split, tokenize: Callable[..., Any], **options: Any) -> tuple[list, LengthReport]:
    examples = read_examples(data_cfg, kind=kind, split=split)
    report = LengthReport(f"{split} data ({_source(data_cfg, split)})", options.pop("max_length", data_cfg.max_length))
    truncation = options.pop("truncation", data_cfg.truncation)
    tokenized = []
    for example in examples:
        item = tokenize(example, tokenizer, max_length=report.max_length, truncation=truncation, report=report, **options)
        if item is not None:
            tokenized.append(item)
    if examples and not tokenized:
        raise DataError(f"{_source(data_cfg, split)}: no examples left: {report.summary()}")
    return tokenized, report


def load_sft_data(data_cfg: Any, tokenizer: Any, split: Split = "train") -> tuple[list[TokenizedSFT], LengthReport]:
    """SFT examples of `data_cfg`'s split, tokenized (labels follow `data_cfg.completion_only_loss`)."""
    return _load(data_cfg, tokenizer, kind="sft", split=split, tokenize=tokenize_sft, completion_only_loss=data_cfg.completion_only_loss)


def load_preference_data(data_cfg: Any, tokenizer: Any, split: Split = "train") -> tuple[list[TokenizedPair], LengthReport]:
    """Preference pairs of the split, tokenized."""
    return _load(data_cfg, tokenizer, kind="preference", split=split, tokenize=tokenize_preference)


def load_attribute_data(data_cfg: Any, tokenizer: Any, split: Split = "train") -> tuple[list[TokenizedAttributes], LengthReport]:
    """Attribute-scored responses of the split (`data_cfg.attributes` names HelpSteer-style columns), tokenized."""
    return _load(data_cfg, tokenizer, kind="attributes", split=split, tokenize=tokenize_attributes)


def load_unpaired_data(data_cfg: Any, tokenizer: Any, split: Split = "train") -> tuple[list[TokenizedUnpaired], LengthReport]:
    """KTO examples (prompt, completion, label) of the split, tokenized."""
    return _load(data_cfg, tokenizer, kind="unpaired", split=split, tokenize=tokenize_unpaired)


def load_prompts(
    data_cfg: Any, tokenizer: Any, split: Split = "train", *, max_length: int | None = None
) -> tuple[list[TokenizedPrompt], LengthReport]:
    """Prompts of the split for generation; prompts longer than `max_length` (default data.max_length) are
    dropped (or an error, with truncation 'error'), never cut."""
    options = {} if max_length is None else {"max_length": max_length}
    return _load(data_cfg, tokenizer, kind="prompt", split=split, tokenize=tokenize_prompt, **options)
