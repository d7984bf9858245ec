"""Every format, stored every way, is detected and normalized; every bad record is an error naming where and which field."""

import json

import pytest
from test_data_io import STORAGES, write

from stema.data import DataError, parse_records, read_records
from stema.data.formats import AttributeExample, PreferenceExample, PromptExample, SFTExample, UnpairedExample

USER = {"role": "user", "content": "What is 2+2?"}
ANSWER = {"role": "assistant", "content": "4"}
WRONG = {"role": "assistant", "content": "5"}

# (kind, format detected, record, the example it becomes without its location)
CASES = [
    ("sft", "messages", {"messages": [{"role": "system", "content": "Be brief."}, USER, ANSWER, USER, WRONG]},
     SFTExample([{"role": "system", "content": "Be brief."}, USER], [ANSWER, USER, WRONG], "")),
    ("sft", "conversations",
     {"system": "Be brief.", "conversations": [{"from": "User", "value": "What is 2+2?"}, {"from": "Assistant", "value": "4"}], "mask": "User"},
     SFTExample([{"role": "system", "content": "Be brief."}, USER], [ANSWER], "")),
    ("sft", "conversations", {"system": "", "conversations": [{"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "4"}]},
     SFTExample([USER], [ANSWER], "")),
    ("sft", "prompt_completion", {"prompt": "2+2=", "completion": "4"}, SFTExample("2+2=", "4", "")),
    ("sft", "prompt_completion", {"prompt": [USER], "completion": [ANSWER]}, SFTExample([USER], [ANSWER], "")),
    ("sft", "input_output", {"input": "2+2=", "output": "4"}, SFTExample("2+2=", "4", "")),
    ("sft", "prompt_response", {"prompt": "2+2=", "response": "4", "helpfulness": 3}, SFTExample("2+2=", "4", "")),
    ("sft", "text", {"text": "2+2=4"}, SFTExample("", "2+2=4", "")),
    ("preference", "preference", {"prompt": "2+2=", "chosen": "4", "rejected": "5", "margin": 2},
     PreferenceExample("2+2=", "4", "5", "", margin=2.0)),
    ("preference", "preference", {"prompt": [USER], "chosen": [ANSWER], "rejected": [WRONG], "chosen_reward": 1, "rejected_reward": 0},
     PreferenceExample([USER], [ANSWER], [WRONG], "", chosen_reward=1.0, rejected_reward=0.0)),
    ("preference", "implicit_preference", {"chosen": [USER, ANSWER], "rejected": [USER, WRONG]},
     PreferenceExample([USER], [ANSWER], [WRONG], "")),
    ("preference", "nemo_preference", {"prompt": "2+2=", "chosen_response": "4", "rejected_response": "5"},
     PreferenceExample("2+2=", "4", "5", "")),
    ("attributes", "regression", {"text": "2+2=4", "label": [4, -100, 3.5]}, AttributeExample("", "2+2=4", [4.0, -100.0, 3.5], "")),
    ("attributes", "helpsteer", {"prompt": "2+2=", "response": "4", "helpfulness": 4, "correctness": 3, "coherence": 4, "verbosity": 1},
     AttributeExample("2+2=", "4", [4.0, 3.0, 4.0, -100.0, 1.0], "")),
    ("unpaired", "unpaired", {"prompt": [USER], "completion": [WRONG], "label": False}, UnpairedExample([USER], [WRONG], False, "")),
    ("prompt", "prompt", {"prompt": [USER]}, PromptExample([USER], "")),
]


def without_location(example):
    return type(example)(**{**example.__dict__, "location": ""})


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("kind, name, record, expected", CASES, ids=[f"{case[1]}-{i}" for i, case in enumerate(CASES)])
def test_format_is_detected_and_normalized_from_every_storage(tmp_path, storage, kind, name, record, expected):
    records = read_records(write(tmp_path, [record, record], storage))
    examples = parse_records(records, kind=kind)
    assert [without_location(example) for example in examples] == [expected, expected]
    assert examples[1].location == records[1].location
    assert [without_location(example) for example in parse_records(records, kind=kind, format=name)] == [expected, expected]


def parse_jsonl(tmp_path, rows, kind, **options):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return parse_records(read_records(path), kind=kind, **options)


# (kind, a good record for line 1, the bad record on line 2, the error it must give)
BAD = [
    ("sft", {"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": 3}, r"d\.jsonl:2: field 'completion': expected a string or a list of messages, got int 3"),
    ("sft", {"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": "  "}, r"d\.jsonl:2: field 'completion' is empty"),
    ("sft", {"prompt": "a", "completion": "b"}, {"prompt": "a"}, r"d\.jsonl:2: field 'completion' is missing, so the record does not match the 'prompt_completion' format detected from the first record \(.*d\.jsonl:1\)"),
    ("sft", {"prompt": "a", "completion": "b"}, {"prompt": [USER], "completion": "4"}, r"d\.jsonl:2: field 'completion': the prompt is a list of messages but 'completion' is a string"),
    ("sft", {"prompt": "a", "completion": "b"}, {"prompt": [USER], "completion": [USER]}, r"d\.jsonl:2: field 'completion': must start with an assistant message, got role 'user'"),
    ("sft", {"messages": [USER, ANSWER]}, {"messages": [USER]}, r"d\.jsonl:2: field 'messages': no assistant message to train on"),
    ("sft", {"messages": [USER, ANSWER]}, {"messages": [USER, {"role": "assistant", "content": ""}]}, r"d\.jsonl:2: field 'messages\[1\]': the assistant message is empty"),
    ("sft", {"messages": [USER, ANSWER]}, {"messages": [{"role": "bot", "content": "x"}]}, r"d\.jsonl:2: field 'messages\[0\]': role must be one of .*, got str 'bot'"),
    ("sft", {"messages": [USER, ANSWER]}, {"messages": [{"role": "user", "content": 7}]}, r"d\.jsonl:2: field 'messages\[0\]': content must be a string, got int 7"),
    ("sft", {"messages": [USER, ANSWER]}, {"messages": "hi"}, r"d\.jsonl:2: field 'messages': expected a non-empty list of messages"),
    ("sft", {"conversations": [{"from": "User", "value": "a"}, {"from": "Assistant", "value": "b"}]},
     {"conversations": [{"from": "Robot", "value": "a"}]}, r"d\.jsonl:2: field 'conversations\[0\]': 'from' must be one of"),
    ("sft", {"conversations": [{"from": "User", "value": "a"}, {"from": "Assistant", "value": "b"}]},
     {"system": "s", "conversations": [{"from": "User", "value": "a"}, {"from": "Assistant", "value": " "}]}, r"d\.jsonl:2: field 'conversations\[1\]': the assistant message is empty"),
    ("sft", {"text": "a"}, {"text": None}, r"d\.jsonl:2: field 'text' is missing"),
    ("preference", {"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": ""}, r"d\.jsonl:2: field 'rejected' is empty"),
    ("preference", {"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}, r"d\.jsonl:2: field 'margin': expected a finite number, got str 'big'"),
    ("preference", {"chosen": [USER, ANSWER], "rejected": [USER, WRONG]}, {"chosen": [USER, ANSWER], "rejected": [USER, ANSWER]}, r"d\.jsonl:2: field 'chosen': no messages after the prompt"),
    ("preference", {"prompt": "p", "chosen_response": "a", "rejected_response": "b"}, {"prompt": "p", "chosen_response": ["a"], "rejected_response": "b"}, r"d\.jsonl:2: field 'chosen_response': expected a string, got list"),
    ("attributes", {"text": "t", "label": [1.0]}, {"text": "t", "label": [1.0, "x"]}, r"d\.jsonl:2: field 'label': expected a finite number, got str 'x'"),
    ("attributes", {"prompt": "p", "response": "r", "helpfulness": 3}, {"prompt": "p", "response": "r", "helpfulness": True}, r"d\.jsonl:2: field 'helpfulness': expected a finite number, got bool True"),
    ("unpaired", {"prompt": "p", "completion": "c", "label": True}, {"prompt": "p", "completion": "c", "label": 1}, r"d\.jsonl:2: field 'label': expected true or false, got int 1"),
]


@pytest.mark.parametrize("kind, good, bad, message", BAD, ids=[f"{case[0]}-{i}" for i, case in enumerate(BAD)])
def test_bad_record_is_an_error_naming_file_line_and_field(tmp_path, kind, good, bad, message):
    parse_jsonl(tmp_path, [good], kind)  # the good record alone is fine
    with pytest.raises(DataError, match=message):
        parse_jsonl(tmp_path, [good, bad], kind)


def test_undetectable_format_lists_the_fields_seen_and_the_known_formats(tmp_path):
    with pytest.raises(DataError, match=r"d\.jsonl:1: cannot tell the sft data format from the fields \['answer', 'question'\]; known sft formats: messages \(messages\); conversations .*; text \(text\)"):
        parse_jsonl(tmp_path, [{"question": "q", "answer": "a"}], "sft")
    with pytest.raises(DataError, match=r"known attributes formats: regression \(text, label\); helpsteer \(prompt, response \+ attribute columns \(a, b\)\)"):
        parse_jsonl(tmp_path, [{"prompt": "p", "response": "r", "helpfulness": 2}], "attributes", attributes=["a", "b"])


def test_explicit_format_must_exist_and_fit_the_kind(tmp_path):
    with pytest.raises(DataError, match=r"data.format: unknown format 'chatml'; sft formats are: auto, messages, conversations, prompt_completion, input_output, prompt_response, text"):
        parse_jsonl(tmp_path, [{"text": "a"}], "sft", format="chatml")
    with pytest.raises(DataError, match=r"data.format: 'messages' is a format for sft data, but preference data is read here"):
        parse_jsonl(tmp_path, [{"text": "a"}], "preference", format="messages")
    with pytest.raises(DataError, match=r"d\.jsonl:1: field 'input' is missing, so the record does not match the 'input_output' format given by data.format"):
        parse_jsonl(tmp_path, [{"text": "a"}], "sft", format="input_output")


def test_first_matching_format_wins_and_extra_fields_are_ignored(tmp_path):
    (example,) = parse_jsonl(tmp_path, [{"messages": [USER, ANSWER], "text": "ignored", "id": 7}], "sft")
    assert example.completion == [ANSWER]
    (pair,) = parse_jsonl(tmp_path, [{"prompt": [USER], "chosen": [ANSWER], "rejected": [WRONG]}], "preference")
    assert pair.prompt == [USER]  # explicit prompt, not the implicit-prompt format
