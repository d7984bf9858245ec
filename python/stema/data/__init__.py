"""Training data: read files, detect and validate formats, tokenize, pack and collate; the built-in task.

    examples, report = load_sft_data(cfg.data, tokenizer)   # every record validated before any is tokenized
    print(report.summary())
    batch = collate_sft(examples[:8], tokenizer.pad_token_id)

Errors for bad input are `DataError`, whose message starts with where (`train.jsonl:12:`) and names the field.
"""

from stema.data.collate import collate_attributes, collate_pairs, collate_prompts, collate_sft, collate_unpaired
from stema.data.dataset import (
    load_attribute_data,
    load_preference_data,
    load_prompts,
    load_sft_data,
    load_unpaired_data,
    read_examples,
)
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
from stema.data.packing import PackedRow, collate_packed, pack_sft, packed_attention_for
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
    "load_attribute_data",
    "load_preference_data",
    "load_prompts",
    "load_sft_data",
    "load_unpaired_data",
    "pack_sft",
    "packed_attention_for",
    "parse_records",
    "read_examples",
    "read_records",
    "tokenize_attributes",
    "tokenize_preference",
    "tokenize_prompt",
    "tokenize_sft",
    "tokenize_unpaired",
]
