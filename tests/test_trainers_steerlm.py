"""SteerLM: the attribute template, the built-in attribute task, Spearman's correlation, and
`stema rm` (regression) -> `stema annotate` -> `stema steerlm` -> `stema generate --attributes`
end to end through the CLI on a very small tiny model."""

import json

import pytest

from stema.cli import main
from stema.config import ConfigError, DataConfig
from stema.data import DataError, builtin_attributes, encode_prompt
from stema.data.steerlm import condition_prompt, format_attributes, load_steered_sft_data, parse_attributes
from stema.evaluation import spearman
from stema.models.tiny import TinyModelSpec, build_tokenizer, save_tiny_model

QUIET = ["trainer.progress_bar=false", "trainer.tensorboard=false"]
SMALL_BATCH = ["trainer.global_batch_size=8", "trainer.micro_batch_size=4", "data.max_length=96"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    spec = TinyModelSpec(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny", spec)


def test_attribute_string_round_trips_and_bad_strings_name_the_field():
    values = parse_attributes("quality:4, verbosity:2", min_value=0, max_value=4)
    assert values == {"quality": 4, "verbosity": 2}
    assert format_attributes(values) == "quality:4,verbosity:2"
    assert parse_attributes("verbosity:2.6", min_value=0, max_value=4) == {"verbosity": 3}
    for bad, message in (("verbosity=2", "name:value"), ("verbosity:7", "outside"), ("a:1,a:2", "twice")):
        with pytest.raises(ConfigError, match=rf"generate.attributes: .*{message}"):
            parse_attributes(bad, min_value=0, max_value=4)


def test_template_appends_the_line_to_the_last_user_message_or_the_text():
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "What is 1+1?"}]
    conditioned = condition_prompt(messages, "verbosity:2")
    assert conditioned[2]["content"] == "What is 1+1?\nattributes: verbosity:2"
    assert conditioned[:2] == messages[:2] and messages[2]["content"] == "What is 1+1?"  # the input is not changed
    assert condition_prompt("Q", "a:1") == "Q\nattributes: a:1"
    assert condition_prompt([{"role": "system", "content": "s"}], "a:1")[-1] == {"role": "user", "content": "attributes: a:1"}


def test_builtin_attribute_task_levels_get_strictly_longer():
    for value in (0, 7, 85, 198):
        words = [builtin_attributes.measure_verbosity(builtin_attributes.answer_text(value, level)) for level in range(5)]
        assert words == sorted(set(words)), words
        assert all(builtin_attributes.final_number(builtin_attributes.answer_text(value, level)) == value for level in range(5))
    records = builtin_attributes.attribute_records(200)
    assert {record["verbosity"] for record in records} == {0.0, 1.0, 2.0, 3.0, 4.0}
    wrong = [record for record in records if record["correctness"] == 0.0]
    assert 20 < len(wrong) < 80
    for record in records[:50]:
        right = builtin_attributes.is_correct(record["prompt"], record["response"][0]["content"])
        assert right == (record["correctness"] == 4.0)


def test_spearman_matches_scipy_on_ties_and_perfect_orders():
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(0.8207826816681233)  # scipy.stats.spearmanr
    assert spearman([0, 0, 1, 1, 2], [1, 1, 3, 3, 9]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) == 0.0


def test_training_prompts_are_the_generation_prompts():
    tokenizer = build_tokenizer()
    config = DataConfig(train="builtin", builtin_size=6, attributes=["verbosity"], max_length=128)
    examples, report = load_steered_sft_data(config, tokenizer, "train", min_value=0, max_value=4)
    records = builtin_attributes.sft_records(6)
    assert report.kept == 6
    for example, record in zip(examples, records):
        prompt = condition_prompt(record["prompt"], f"verbosity:{int(record['verbosity'])}")
        prompt_ids = encode_prompt(prompt, tokenizer)
        assert example.input_ids[: len(prompt_ids)] == prompt_ids
        assert all(label == -100 for label in example.labels[: len(prompt_ids)])


def test_attribute_model_annotate_steerlm_and_steered_generation(tmp_path, small_model, capsys):
    labelled = write_jsonl(tmp_path / "labelled.jsonl", builtin_attributes.attribute_records(16))
    pool = write_jsonl(tmp_path / "pool.jsonl", builtin_attributes.unlabelled_records(12, seed=1))
    names = "data.attributes=[correctness,verbosity]"
    assert main(["rm", f"model.path={small_model}", f"data.train={labelled}", names, "reward.loss=regression",
                 "reward.num_attributes=2", "trainer.max_steps=2", f"trainer.output_dir={tmp_path / 'rm'}", *SMALL_BATCH, *QUIET]) == 0

    annotated = tmp_path / "annotated.jsonl"
    assert main(["annotate", f"model.path={tmp_path / 'rm' / 'hf'}", f"data.train={pool}", names, f"annotate.output={annotated}"]) == 0
    rows = [json.loads(line) for line in annotated.read_text().splitlines()]
    assert len(rows) == 12 and not list(tmp_path.glob(".annotated.jsonl.*"))
    source = [json.loads(line) for line in pool.read_text().splitlines()]
    for row, original in zip(rows, source):
        assert row["prompt"] == original["prompt"] and row["completion"] == original["completion"]
        assert isinstance(row["correctness"], float) and isinstance(row["verbosity"], float)
    # HelpSteer's layout (`prompt`, `response`) is read as it is and gets the same predictions.
    helpsteer = write_jsonl(tmp_path / "helpsteer.jsonl", [{"prompt": r["prompt"], "response": r["completion"]} for r in source])
    assert main(["annotate", f"model.path={tmp_path / 'rm' / 'hf'}", f"data.train={helpsteer}", names,
                 f"annotate.output={tmp_path / 'helpsteer_annotated.jsonl'}"]) == 0
    assert [json.loads(line) for line in (tmp_path / "helpsteer_annotated.jsonl").read_text().splitlines()] == rows

    assert main(["steerlm", f"model.path={small_model}", f"data.train={annotated}", "data.attributes=[verbosity]",
                 "trainer.max_steps=2", f"trainer.output_dir={tmp_path / 'steer'}", *SMALL_BATCH, *QUIET]) == 0
    generations = tmp_path / "generations.jsonl"
    assert main(["generate", "--attributes", "verbosity:2", f"model.path={tmp_path / 'steer' / 'hf'}", "data.train=builtin",
                 "data.builtin_size=3", "sampling.temperature=0", "sampling.max_new_tokens=8", f"generate.output={generations}"]) == 0
    rows = [json.loads(line) for line in generations.read_text().splitlines()]
    assert len(rows) == 3
    assert all(row["prompt"][-1]["content"].endswith("\nattributes: verbosity:2") for row in rows)
    assert all(row["finish_reason"] in ("eos", "length") and isinstance(row["completion"], str) for row in rows)

    # One attribute name for a two-output model is an error that names the field.
    assert main(["annotate", f"model.path={tmp_path / 'rm' / 'hf'}", f"data.train={pool}", "data.attributes=[verbosity]",
                 f"annotate.output={tmp_path / 'x.jsonl'}"]) == 2
    assert "data.attributes: 1 names" in capsys.readouterr().err
    assert main(["annotate", f"model.path={small_model}", f"data.train={pool}", names, f"annotate.output={tmp_path / 'y.jsonl'}"]) == 2
    assert "is not an attribute model" in capsys.readouterr().err


def test_steerlm_on_builtin_data_and_unannotated_data_is_an_error(tmp_path, small_model, capsys):
    assert main(["steerlm", f"model.path={small_model}", "data.train=builtin", "data.builtin_size=16", "data.attributes=[correctness,verbosity]",
                 "trainer.max_steps=1", "trainer.export_hf=false", f"trainer.output_dir={tmp_path / 'run'}", *SMALL_BATCH, "data.max_length=128", *QUIET]) == 0
    plain = write_jsonl(tmp_path / "plain.jsonl", builtin_attributes.unlabelled_records(4))
    with pytest.raises(DataError, match=r"plain.jsonl:1: no attribute column .* `stema annotate`"):
        load_steered_sft_data(DataConfig(train=str(plain), attributes=["verbosity"]), build_tokenizer(), "train", min_value=0, max_value=4)
