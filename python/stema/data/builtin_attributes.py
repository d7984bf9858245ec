"""The built-in attribute task (SteerLM): answers to the built-in arithmetic questions written at a
verbosity level, right or wrong, and scored on two HelpSteer-style attributes.

Attributes (`ATTRIBUTES`, in label order), on HelpSteer's 0..4 scale:

- `correctness`: 4 when the answer's number is right, 0 when it is a plausible mistake
  (`stema.data.builtin.wrong_answer`); a quarter of the answers are wrong.
- `verbosity`: the level the answer is written at, each level strictly more words than the one
  below and none needing more than the answer itself (`answer_text`), for 37+48 (asked '73+84';
  the number is written as the task writes it, least-significant digit first):

      0  580
      1  It is 580.
      2  The answer is 580.
      3  So I think the answer is 580.
      4  After working it out carefully, I think the answer is 580.

  The measured verbosity of any text is its word count (`measure_verbosity`), so the Spearman
  correlation between requested and measured verbosity over held-out prompts says how well a
  steered model follows the requested level.

Records (questions drawn from the training or held-out split of the arithmetic task, conversational):

    attribute_records(n):  HelpSteer format, {"prompt", "response", "correctness", "verbosity"}
                           (what `stema rm` with reward.loss=regression reads)
    sft_records(n):        the same with "completion" in place of "response" (`stema steerlm`
                           reads the attribute columns beside any SFT format)
    unlabelled_records(n): {"prompt", "completion"} of mixed verbosity and correctness, the data
                           `stema annotate` labels
    write_files(folder):   labelled.jsonl and pool.jsonl, for the commands above
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

from stema.data.builtin import _question, _sample, _user, answer, read_number, written, wrong_answer

ATTRIBUTES = ("correctness", "verbosity")
VERBOSITY_LEVELS = 5
WRONG_FRACTION = 0.25
_NUMBER = re.compile(r"\d+")


VERBOSITY_TEMPLATES = ("{}", "It is {}.", "The answer is {}.", "So I think the answer is {}.", "After working it out carefully, I think the answer is {}.")


def answer_text(value: int, verbosity: int) -> str:
    """`value` as an answer written at `verbosity` (0..4); see the module docstring."""
    if not 0 <= verbosity < VERBOSITY_LEVELS:
        raise ValueError(f"verbosity must be in 0..{VERBOSITY_LEVELS - 1}, got {verbosity}")
    return VERBOSITY_TEMPLATES[verbosity].format(written(value))


def measure_verbosity(text: str) -> int:
    """The measured verbosity of a response: its number of whitespace-separated words."""
    return len(text.split())


def final_number(text: str) -> int | None:
    """The number the last run of digits in `text` writes, least-significant digit first (the answer
    at every verbosity level), None when there is none."""
    numbers = _NUMBER.findall(text)
    return read_number(numbers[-1]) if numbers else None


def _records(n: int, seed: int, *, heldout: bool, response_field: str, labelled: bool) -> list[dict[str, Any]]:
    rng = random.Random(f"attributes-{seed}-{response_field}-{labelled}")
    records = []
    for question in _sample(n, seed, heldout):
        correct = rng.random() >= WRONG_FRACTION
        verbosity = rng.randrange(VERBOSITY_LEVELS)
        value = answer(question) if correct else wrong_answer(question, rng)
        record = {"prompt": _user(question), response_field: [{"role": "assistant", "content": answer_text(value, verbosity)}]}
        if labelled:
            record.update(correctness=4.0 if correct else 0.0, verbosity=float(verbosity))
        records.append(record)
    return records


def attribute_records(n: int, seed: int = 0, *, heldout: bool = False) -> list[dict[str, Any]]:
    """`n` labelled responses in HelpSteer format (prompt, response, correctness, verbosity)."""
    return _records(n, seed, heldout=heldout, response_field="response", labelled=True)


def sft_records(n: int, seed: int = 0, *, heldout: bool = False) -> list[dict[str, Any]]:
    """`n` labelled responses as SFT records (prompt, completion, correctness, verbosity)."""
    return _records(n, seed, heldout=heldout, response_field="completion", labelled=True)


def unlabelled_records(n: int, seed: int = 0, *, heldout: bool = False) -> list[dict[str, Any]]:
    """`n` prompt/completion records of mixed verbosity and correctness, without labels."""
    return _records(n, seed, heldout=heldout, response_field="completion", labelled=False)


def is_correct(prompt: list[dict[str, str]], completion: str) -> bool:
    """Whether the last number of `completion` answers the question in `prompt` (at any verbosity)."""
    return final_number(completion) == answer(_question(prompt))


def write_files(folder: str | Path, *, size: int = 2000, seed: int = 0) -> dict[str, Path]:
    """Write `labelled.jsonl` (attribute_records) and `pool.jsonl` (unlabelled_records, other
    questions' draws) with `size` records each into `folder`; name -> path."""
    from stema.data.io import write_jsonl_atomic

    folder = Path(folder)
    return {
        "labelled": write_jsonl_atomic(folder / "labelled.jsonl", attribute_records(size, seed)),
        "pool": write_jsonl_atomic(folder / "pool.jsonl", unlabelled_records(size, seed + 1)),
    }
