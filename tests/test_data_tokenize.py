"""Tokenization on the tiny character tokenizer: exact prompt masks, multi-turn masks, BOS/EOS, truncation and its report."""

import pytest

from stema.data import DataError, LengthReport, encode_prompt, tokenize_attributes, tokenize_preference, tokenize_prompt, tokenize_sft
from stema.data.formats import AttributeExample, PreferenceExample, PromptExample, SFTExample
from stema.models import tiny

SYSTEM = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "What is 2+2?"}
ANSWER = {"role": "assistant", "content": "4"}
USER_2 = {"role": "user", "content": "And 3+3?"}
ANSWER_2 = {"role": "assistant", "content": "6"}


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.build_tokenizer()


def trained_spans(tokenizer, labels):
    """The decoded runs of consecutive trained (label != -100) tokens."""
    spans, current = [], []
    for label in labels + [-100]:
        if label == -100:
            if current:
                spans.append(tokenizer.decode(current))
            current = []
        else:
            current.append(label)
    return spans


def test_plain_prompt_completion_is_bos_prompt_completion_eos_with_the_prompt_masked(tokenizer):
    tokenized = tokenize_sft(SFTExample("What is 2+2?", "4", "d.jsonl:1"), tokenizer, max_length=64)
    assert tokenizer.decode(tokenized.input_ids) == "<s>What is 2+2?4<|end|>"
    prompt_length = 1 + len("What is 2+2?")  # BOS, then one token per character
    assert tokenized.labels[:prompt_length] == [-100] * prompt_length
    assert trained_spans(tokenizer, tokenized.labels) == ["4<|end|>"]
    assert tokenized.input_ids[: len(encode_prompt("What is 2+2?", tokenizer))] == encode_prompt("What is 2+2?", tokenizer)


def test_chat_prompt_completion_masks_exactly_the_assistant_turn(tokenizer):
    tokenized = tokenize_sft(SFTExample([SYSTEM, USER], [ANSWER], "d.jsonl:1"), tokenizer, max_length=64)
    assert tokenizer.decode(tokenized.input_ids) == tokenizer.apply_chat_template([SYSTEM, USER, ANSWER], tokenize=False)
    assert trained_spans(tokenizer, tokenized.labels) == ["4<|end|>"]
    prompt_ids = encode_prompt([SYSTEM, USER], tokenizer)
    assert tokenizer.decode(prompt_ids) == "<s><|system|>Be brief.<|end|><|user|>What is 2+2?<|end|><|assistant|>"
    assert tokenized.labels[: len(prompt_ids)] == [-100] * len(prompt_ids)
    assert tokenized.labels[len(prompt_ids)] != -100


def test_multi_turn_trains_every_assistant_turn_and_nothing_else(tokenizer):
    example = SFTExample([USER], [ANSWER, USER_2, ANSWER_2], "d.jsonl:1")
    tokenized = tokenize_sft(example, tokenizer, max_length=128)
    assert trained_spans(tokenizer, tokenized.labels) == ["4<|end|>", "6<|end|>"]
    everything = tokenize_sft(example, tokenizer, max_length=128, completion_only_loss=False)
    assert everything.labels == everything.input_ids == tokenized.input_ids


def test_text_trains_on_all_of_it(tokenizer):
    tokenized = tokenize_sft(SFTExample("", "2+2=4", "d.jsonl:1"), tokenizer, max_length=64)
    assert tokenizer.decode(tokenized.input_ids) == "<s>2+2=4<|end|>"
    assert trained_spans(tokenizer, tokenized.labels) == ["2+2=4<|end|>"]


def test_bos_and_eos_are_not_doubled_and_bos_is_skipped_when_it_is_the_eos():
    tokenizer = tiny.build_tokenizer()
    tokenized = tokenize_sft(SFTExample("<s>Q", "A<|end|>", "d.jsonl:1"), tokenizer, max_length=64)
    assert tokenizer.decode(tokenized.input_ids) == "<s>QA<|end|>"
    tokenizer.bos_token = tokenizer.eos_token  # as GPT-2's tokenizer: its BOS is its end-of-text token
    assert tokenizer.decode(encode_prompt("Q", tokenizer)) == "Q"


def test_template_that_is_not_prefix_stable_is_an_error_naming_the_example():
    tokenizer = tiny.build_tokenizer()
    # The generation prompt adds a newline that the rendered assistant turn does not have.
    tokenizer.chat_template = tiny.CHAT_TEMPLATE.replace("{% if add_generation_prompt %}<|assistant|>", "{% if add_generation_prompt %}<|assistant|>\n")
    with pytest.raises(DataError, match=r"d\.jsonl:7: the chat template is not prefix-stable: the first 1 message\(s\) render .* differ at token \d+: '\\n' vs '4<\|end\|>'"):
        tokenize_sft(SFTExample([USER], [ANSWER], "d.jsonl:7"), tokenizer, max_length=64)


def test_conversational_data_needs_a_chat_template():
    tokenizer = tiny.build_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(DataError, match=r"d\.jsonl:3: the data is conversational .* the tokenizer has no chat template"):
        tokenize_sft(SFTExample([USER], [ANSWER], "d.jsonl:3"), tokenizer, max_length=64)


def test_truncation_modes_and_the_report(tokenizer):
    prompt, completion = "Q" * 10, "A" * 20  # 1 + 10 prompt tokens, 21 completion tokens: 32 in all
    long_example = SFTExample(prompt, completion, "d.jsonl:4")
    long_prompt = SFTExample("Q" * 20, "A", "d.jsonl:5")  # 23 tokens, 21 of them prompt
    short = SFTExample("Q", "A", "d.jsonl:6")

    with pytest.raises(DataError, match=r"d\.jsonl:4: 32 tokens \(prompt 11\) is longer than data.max_length=16; set data.truncation"):
        tokenize_sft(long_example, tokenizer, max_length=16, truncation="error")

    report = LengthReport("train data", 16)
    kept = [tokenize_sft(item, tokenizer, max_length=16, truncation="drop", report=report) for item in (long_example, long_prompt, short)]
    assert kept[0] is None and kept[1] is None and kept[2] is not None
    assert (report.kept, report.dropped, report.dropped_long_prompt, report.truncated, report.longest) == (1, 2, 1, 0, 32)

    report = LengthReport("train data", 16)
    kept = [tokenize_sft(item, tokenizer, max_length=16, truncation="truncate", report=report) for item in (long_example, long_prompt, short)]
    assert kept[1] is None  # the prompt alone does not fit: never cut the prompt
    assert tokenizer.decode(kept[0].input_ids) == "<s>" + prompt + "A" * 5
    assert trained_spans(tokenizer, kept[0].labels) == ["A" * 5]
    assert report.summary() == (
        "train data: 3 examples, 2 kept (1 truncated to 16 tokens); 1 dropped as longer than max_length=16, "
        "1 of them because the prompt alone reaches max_length; longest 32 tokens"
    )


def test_preference_pair_shares_the_prompt_and_masks_it(tokenizer):
    example = PreferenceExample([USER], [ANSWER], [{"role": "assistant", "content": "five"}], "d.jsonl:1", chosen_reward=1.0, rejected_reward=0.0)
    pair = tokenize_preference(example, tokenizer, max_length=64)
    assert pair.prompt_ids == encode_prompt([USER], tokenizer)
    assert pair.chosen_ids[: len(pair.prompt_ids)] == pair.rejected_ids[: len(pair.prompt_ids)] == pair.prompt_ids
    assert trained_spans(tokenizer, pair.chosen_labels) == ["4<|end|>"]
    assert trained_spans(tokenizer, pair.rejected_labels) == ["five<|end|>"]
    assert (pair.chosen_reward, pair.rejected_reward, pair.margin) == (1.0, 0.0, None)

    plain = tokenize_preference(PreferenceExample("Q", "yes", "no", "d.jsonl:2"), tokenizer, max_length=64)
    assert tokenizer.decode(plain.chosen_ids) == "<s>Qyes<|end|>" and tokenizer.decode(plain.rejected_ids) == "<s>Qno<|end|>"
    report = LengthReport("pairs", 4)
    cut = tokenize_preference(PreferenceExample("Q", "yes", "no", "d.jsonl:2"), tokenizer, max_length=4, truncation="truncate", report=report)
    assert tokenizer.decode(cut.chosen_ids) == "<s>Qye" and tokenizer.decode(cut.rejected_ids) == "<s>Qno"
    assert (report.kept, report.truncated, report.longest) == (1, 1, 6)


def test_attribute_and_prompt_examples(tokenizer):
    scored = tokenize_attributes(AttributeExample("", "2+2=4", [4.0, -100.0], "d.jsonl:1"), tokenizer, max_length=64)
    assert tokenizer.decode(scored.input_ids) == "<s>2+2=4<|end|>" and scored.labels == [4.0, -100.0]
    report = LengthReport("prompts", 8)
    assert tokenize_prompt(PromptExample("Q" * 20, "d.jsonl:1"), tokenizer, max_length=8, truncation="truncate", report=report) is None
    assert (report.dropped, report.dropped_long_prompt) == (1, 1)
    prompt = tokenize_prompt(PromptExample([USER], "d.jsonl:2"), tokenizer, max_length=64)
    assert tokenizer.decode(prompt.input_ids).endswith("<|assistant|>") and prompt.prompt == [USER]
