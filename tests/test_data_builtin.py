"""The built-in arithmetic task: deterministic, held-out prompts disjoint from training, correct answers and rewards."""

import json
import random
import re

import pytest

from stema.config import DataConfig
from stema.data import DataError, builtin, load_preference_data, load_prompts, load_sft_data
from stema.models import tiny


def solve(question: str) -> int:
    """The answer computed independently of the module: parse 'A+B' (digits least-significant first) and add."""
    left, right = re.fullmatch(r"(\d\d)\+(\d\d)", question).groups()
    return int(left[::-1]) + int(right[::-1])


def read(answer: str) -> int:
    """The number a 3-digit least-significant-first answer stands for ('580' -> 85)."""
    assert re.fullmatch(r"\d\d\d", answer), answer
    return int(answer[::-1])


def test_records_are_deterministic_per_seed_and_distinct_questions():
    assert builtin.sft_records(50, seed=3) == builtin.sft_records(50, seed=3)
    assert builtin.sft_records(50, seed=3) != builtin.sft_records(50, seed=4)
    assert builtin.preference_records(20, seed=1) == builtin.preference_records(20, seed=1)
    questions = [record["prompt"][0]["content"] for record in builtin.sft_records(500, seed=0)]
    assert len(set(questions)) == 500


def test_heldout_prompts_are_disjoint_from_every_training_question():
    training = {builtin.question_text(question) for question in builtin.questions(heldout=False)}
    heldout = {builtin.question_text(question) for question in builtin.questions(heldout=True)}
    assert not training & heldout
    assert 0.08 < len(heldout) / (len(training) + len(heldout)) < 0.12
    assert len(training) + len(heldout) == 100 * 100  # every A+B with A, B in 0..99
    prompts = builtin.heldout_prompts(300, seed=7)
    assert all(prompt[0]["content"] in heldout for prompt in prompts)
    with pytest.raises(DataError, match="has .* held-out questions; asked for 100000"):
        builtin.heldout_prompts(100_000)


def test_answers_and_rewards_are_correct():
    for record in builtin.sft_records(300, seed=2):
        question, completion = record["prompt"][0]["content"], record["completion"][0]["content"]
        assert read(completion) == solve(question)
        assert builtin.reward(record["prompt"], completion) == 1.0
    prompt = [{"role": "user", "content": "73+84"}]  # 37+48 = 85
    texts = ("580", " 580\n", "85", "085", "58", "581", "580 581", "eighty-five", "", "580x")
    assert [builtin.reward(prompt, text) for text in texts] == [1, 1, 0, 0, 0, 0, 0, 0, 0, 0]
    assert builtin.reward("25+84", "001") == 1.0 and builtin.reward("25+84", "100") == 0.0  # 52+48 = 100
    assert builtin.reward("70+35", "060") == 1.0  # 7+53 = 60
    assert builtin.extract_answer(" 580 ") == 85 and builtin.extract_answer("-12") is None
    assert builtin.digit_reward(prompt, "580") == 1.0 and builtin.digit_reward(prompt, "581") == 0.5 * 2 / 3
    assert builtin.digit_reward(prompt, "085") == 0.5 / 3 and builtin.digit_reward(prompt, "x") == 0.0  # only the tens agree
    with pytest.raises(ValueError, match="not a built-in task question"):
        builtin.reward("Tell me a joke", "580")


def test_rejected_answers_are_plausible_mistakes():
    records = builtin.preference_records(400, seed=5)
    mistakes = []
    for record in records:
        question = record["prompt"][0]["content"]
        chosen, rejected = read(record["chosen"][0]["content"]), read(record["rejected"][0]["content"])
        assert chosen == solve(question) and rejected != chosen and rejected >= 0
        assert builtin.reward(record["prompt"], record["rejected"][0]["content"]) == 0.0
        assert (record["chosen_reward"], record["rejected_reward"]) == (1.0, 0.0)
        mistakes.append(abs(rejected - chosen))
    assert {1, 10} <= set(mistakes) and any(gap not in (1, 10) for gap in mistakes)  # digit slips and carry slips
    rng = random.Random(0)
    assert {builtin.wrong_answer((37, 48), rng) for _ in range(100)} == {75, 84, 86, 95}  # 75: the carry forgotten


def test_builtin_resolves_from_data_config_and_matches_the_written_files(tmp_path):
    tokenizer = tiny.build_tokenizer()
    config = DataConfig(train="builtin", eval="builtin", builtin_size=40, builtin_eval_size=10)
    train, report = load_sft_data(config, tokenizer)
    heldout, _ = load_sft_data(config, tokenizer, split="eval")
    assert (len(train), len(heldout), report.kept) == (40, 10, 40)
    assert re.fullmatch(r"<s><\|user\|>\d\d\+\d\d<\|end\|><\|assistant\|>\d\d\d<\|end\|>", tokenizer.decode(train[0].input_ids))
    written = builtin.write_builtin(tmp_path, train_size=40, eval_size=10)
    assert sorted(written) == ["preference_eval", "preference_train", "prompts_eval", "prompts_train", "sft_eval", "sft_train"]
    from_files, _ = load_sft_data(DataConfig(train=str(written["sft_train"]), eval=str(written["sft_eval"])), tokenizer)
    assert [item.input_ids for item in from_files] == [item.input_ids for item in train]
    first = json.loads(written["preference_train"].read_text().splitlines()[0])
    assert first == builtin.preference_records(40)[0]
    pairs, _ = load_preference_data(config, tokenizer)
    prompts, _ = load_prompts(config, tokenizer, split="eval")
    assert len(pairs) == 40 and pairs[0].chosen_reward == 1.0 and len(prompts) == 10
    with pytest.raises(DataError, match="the built-in task has no attributes data"):
        builtin.builtin_records("attributes", n=1)
