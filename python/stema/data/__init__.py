"""Training data: read files, detect and validate formats, tokenize, pack and collate; the built-in task.

    examples = parse_records(read_records("train.jsonl"), kind="sft")   # every record validated
    tokenized = [tokenize_sft(example, tokenizer, max_length=512) for example in examples]

Errors for bad input are `DataError`, whose message starts with where (`train.jsonl:12:`) and names the field.
"""

from stema.data.collate import collate_attributes, collate_pairs, collate_prompts, collate_sft, collate_unpaired
from stema.data.errors import DataError
from stema.data.formats import (
    AttributeExample,
    PreferenceExample,
    PromptExample,
    SFTExample,
    UnpairedExample,
    detect_format,
    parse_records,
)
from stema.data.io import Record, read_records
from stema.data.packing import PackedRow, collate_packed, pack_sft
from stema.data.tokenize import (
    LengthReport,
    TokenizedAttributes,
    TokenizedPair,
    TokenizedPrompt,
    TokenizedSFT,
    TokenizedUnpaired,
    encode_prompt,
    tokenize_attributes,
    tokenize_preference,
    tokenize_prompt,
    tokenize_sft,
    tokenize_unpaired,
)

__all__ = [
    "AttributeExample",
    "DataError",
    "LengthReport",
    "PackedRow",
    "PreferenceExample",
    "PromptExample",
    "Record",
    "SFTExample",
    "TokenizedAttributes",
    "TokenizedPair",
    "TokenizedPrompt",
    "TokenizedSFT",
    "TokenizedUnpaired",
    "UnpairedExample",
    "collate_attributes",
    "collate_packed",
    "collate_pairs",
    "collate_prompts",
    "collate_sft",
    "collate_unpaired",
    "detect_format",
    "encode_prompt",
    "pack_sft",
    "parse_records",
    "read_records",
    "tokenize_attributes",
    "tokenize_preference",
    "tokenize_prompt",
    "tokenize_sft",
    "tokenize_unpaired",
]
