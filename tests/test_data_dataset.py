"""Loading a DataConfig: every record is validated before any is tokenized, and what is kept or dropped is reported."""

import json

import pytest

from stema.config import DataConfig
from stema.data import DataError, load_attribute_data, load_preference_data, load_sft_data, load_unpaired_data
from stema.models import tiny


class CountingTokenizer:
    """The tiny tokenizer, counting how often it is asked to tokenize."""

    def __init__(self):
        self.inner = tiny.build_tokenizer()
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)

    def apply_chat_template(self, *args, **kwargs):
        self.calls += 1
        return self.inner.apply_chat_template(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def jsonl(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_sft_data_is_tokenized_and_reported(tmp_path):
    rows = [{"prompt": "Q", "completion": "A" * n} for n in (1, 2, 30)]
    config = DataConfig(train=jsonl(tmp_path, rows), max_length=16, truncation="drop", completion_only_loss=False)
    examples, report = load_sft_data(config, tiny.build_tokenizer())
    assert [len(example.input_ids) for example in examples] == [4, 5]
    assert examples[0].labels == examples[0].input_ids  # completion_only_loss=False
    assert examples[0].location.endswith("d.jsonl:1")
    assert report.summary() == f"train data ({tmp_path}/d.jsonl): 3 examples, 2 kept; 1 dropped as longer than max_length=16; longest 33 tokens"
    no_eval, eval_report = load_sft_data(config, tiny.build_tokenizer(), split="eval")  # data.eval unset
    assert no_eval == [] and eval_report.total == 0


def test_a_bad_record_anywhere_stops_loading_before_any_tokenization(tmp_path):
    rows = [{"prompt": "Q", "completion": "A"}] * 50 + [{"prompt": "Q", "completion": ""}]
    tokenizer = CountingTokenizer()
    with pytest.raises(DataError, match=r"d\.jsonl:51: field 'completion' is empty"):
        load_sft_data(DataConfig(train=jsonl(tmp_path, rows)), tokenizer)
    assert tokenizer.calls == 0
    load_sft_data(DataConfig(train=jsonl(tmp_path, rows[:50])), tokenizer)
    assert tokenizer.calls > 0  # the counter does see tokenization


def test_nothing_left_and_no_training_data_are_errors(tmp_path):
    config = DataConfig(train=jsonl(tmp_path, [{"text": "x" * 40}]), max_length=8)
    with pytest.raises(DataError, match=r"d\.jsonl: no examples left: train data .* 1 dropped as longer than max_length=8"):
        load_sft_data(config, tiny.build_tokenizer())
    with pytest.raises(DataError, match="data.train: no training data given"):
        load_sft_data(DataConfig(), tiny.build_tokenizer())


def test_explicit_format_from_the_config(tmp_path):
    rows = [{"prompt": "Q", "completion": "A", "label": True}]
    with pytest.raises(DataError, match=r"data.format: 'unpaired' is a format for unpaired data, but sft data is read here"):
        load_sft_data(DataConfig(train=jsonl(tmp_path, rows), format="unpaired"), tiny.build_tokenizer())
    (example,), _ = load_unpaired_data(DataConfig(train=jsonl(tmp_path, rows), format="unpaired"), tiny.build_tokenizer())
    assert example.label is True


def test_records_must_agree_on_attribute_count_and_optional_pair_scores(tmp_path):
    rows = [{"text": "a", "label": [1, 2]}, {"text": "b", "label": [1, 2, 3]}]
    with pytest.raises(DataError, match=r"d\.jsonl:2: field 'label': 3 attribute values, but the first record \(.*d\.jsonl:1\) has 2"):
        load_attribute_data(DataConfig(train=jsonl(tmp_path, rows)), tiny.build_tokenizer())
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b", "margin": 1.0}, {"prompt": "p", "chosen": "a", "rejected": "b"}]
    with pytest.raises(DataError, match=r"d\.jsonl:2: field 'margin' is missing here but given in the first record"):
        load_preference_data(DataConfig(train=jsonl(tmp_path, rows)), tiny.build_tokenizer())


def test_helpsteer_columns_follow_data_attributes(tmp_path):
    rows = [{"prompt": "p", "response": "r", "quality": 3, "safety": None}]
    config = DataConfig(train=jsonl(tmp_path, rows), attributes=["safety", "quality"])
    (example,), _ = load_attribute_data(config, tiny.build_tokenizer())
    assert example.labels == [-100.0, 3.0]
