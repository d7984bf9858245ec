"""Bad input, as a suite: every reader and every command given malformed lines, wrong types, empty
fields, bytes that are not UTF-8, over-long rows, missing or wrong paths, bad YAML, unknown keys,
out-of-range settings and incomplete model folders. Each stops with exit code 2 and one line that
names the file, the line and the field (the byte offset for encoding errors), before any model is
loaded (`no_model_loads` turns a model load into a test failure), and leaves the output folder as
it was (absent). The readers are also held to this on generated input (hypothesis)."""

import json
import shutil
from pathlib import Path

import pytest
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stema.cli import main
from stema.config import ConfigError, DataConfig, SFTConfig, load_config
from stema.data import DataError, load_preference_data, load_sft_data, parse_records, read_records
from stema.models import loading
from stema.models.tiny import TinyModelSpec, save_tiny_model

SMALL = ["trainer.global_batch_size=2", "trainer.micro_batch_size=2", "trainer.max_steps=1", "trainer.progress_bar=false",
         "trainer.tensorboard=false"]
GOOD_LINE = {"prompt": "1+1=", "completion": "2"}

# command -> (a valid record of the data it reads, extra settings it needs)
COMMANDS = {
    "sft": (GOOD_LINE, []),
    "steerlm": ({**GOOD_LINE, "helpfulness": 3, "correctness": 3, "coherence": 3, "complexity": 1, "verbosity": 1}, []),
    "spin": (GOOD_LINE, []),
    "rm": ({"prompt": "1+1=", "chosen": "2", "rejected": "3"}, []),
    "dpo": ({"prompt": "1+1=", "chosen": "2", "rejected": "3"}, []),
    "kto": ({"prompt": "1+1=", "completion": "2", "label": True}, []),
    "ppo": ({"prompt": "1+1="}, ["reward.function=builtin"]),
    "grpo": ({"prompt": "1+1="}, ["reward.function=builtin"]),
    "rs": ({"prompt": "1+1="}, ["reward.function=builtin"]),
}
OUTPUT_COMMANDS = {"annotate": ("annotate.output", GOOD_LINE), "generate": ("generate.output", {"prompt": "1+1="})}


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    spec = TinyModelSpec(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny", spec)


@pytest.fixture(autouse=True)
def no_model_loads(monkeypatch):
    """Any model load fails the test: every refusal here must come before one."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(loading, "_from_pretrained", refuse)
    for auto_class in (transformers.AutoModelForCausalLM, transformers.AutoModelForSequenceClassification):
        monkeypatch.setattr(auto_class, "from_pretrained", refuse)


def refused(argv, capsys) -> str:
    """Run the CLI in this process; it must exit 2 with one error line (returned); no traceback."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith(f"stema {argv[0]}:")]
    assert len(errors) == 1, err
    return errors[0]


def write_lines(path: Path, *lines: bytes) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def as_bytes(record) -> bytes:
    return json.dumps(record).encode()


def run_argv(command, tmp_path, tiny_path, data, *extra):
    extra_settings = COMMANDS[command][1] if command in COMMANDS else []
    return [command, f"model.path={tiny_path}", f"data.train={data}", f"trainer.output_dir={tmp_path / 'out'}", *SMALL,
            *extra_settings, *extra]


# -- every command: the data is refused before a model loads, the output folder stays absent ------


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_bytes_that_are_not_utf8_name_file_line_and_byte_offset(command, tmp_path, tiny_path, capsys):
    good = as_bytes(COMMANDS[command][0])
    data = write_lines(tmp_path / "train.jsonl", good, b'{"prompt": "caf\xe9"}', good)
    offset = len(good) + 1 + len(b'{"prompt": "caf')
    line = refused(run_argv(command, tmp_path, tiny_path, data), capsys)
    assert f"{data}:2: not UTF-8: byte 0xe9 at byte offset {offset}" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_record_of_the_wrong_type_names_file_line_and_field(command, tmp_path, tiny_path, capsys):
    record = dict(COMMANDS[command][0])
    record["prompt"] = 7
    data = write_lines(tmp_path / "train.jsonl", as_bytes(COMMANDS[command][0]), as_bytes(record))
    line = refused(run_argv(command, tmp_path, tiny_path, data), capsys)
    assert f"{data}:2: field 'prompt'" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", sorted(OUTPUT_COMMANDS))
def test_commands_that_write_one_file_refuse_bad_data_before_loading_the_model(command, tmp_path, tiny_path, capsys):
    key, record = OUTPUT_COMMANDS[command]
    data = write_lines(tmp_path / "train.jsonl", as_bytes(record), b"{not json")
    output = tmp_path / "out" / "written.jsonl"
    line = refused([command, f"model.path={tiny_path}", f"data.train={data}", f"{key}={output}"], capsys)
    assert f"{data}:2: invalid JSON" in line
    assert not output.parent.exists()


@pytest.mark.parametrize(
    "content, expected",
    [
        (b'{"prompt": "1+1=", "completion": "2"}\n{"prompt": "1+1=", "completion": ', ":2: invalid JSON"),
        (b'{"prompt": "1+1=", "completion": "2"}\n["a list"]', ":2: expected a JSON object"),
        (b'{"prompt": "1+1=", "completion": "2"}\n{"prompt": "1+1=", "completion": ""}', ":2: field 'completion' is empty"),
        (b'{"prompt": "1+1=", "completion": "2"}\n{"prompt": "1+1="}', ":2: field 'completion' is missing"),
        (b"", "no records (the file is empty)"),
        (b"[" * 100_000, ":1: invalid JSON"),
    ],
    ids=["truncated-line", "not-an-object", "empty-field", "missing-field", "empty-file", "nested-too-deeply"],
)
def test_malformed_sft_data_is_refused_with_its_place(content, expected, tmp_path, tiny_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_bytes(content)
    assert expected in refused(run_argv("sft", tmp_path, tiny_path, data), capsys)
    assert not (tmp_path / "out").exists()


def test_missing_and_wrong_data_paths(tmp_path, tiny_path, capsys):
    missing = tmp_path / "nope.jsonl"
    assert f"{missing}: no such file or folder" in refused(run_argv("sft", tmp_path, tiny_path, missing), capsys)
    wrong = tmp_path / "train.csv"
    wrong.write_text("prompt,completion\n")
    assert "unknown data file extension '.csv'" in refused(run_argv("sft", tmp_path, tiny_path, wrong), capsys)
    folder = tmp_path / "folder"
    folder.mkdir()
    assert "not a datasets.save_to_disk folder" in refused(run_argv("sft", tmp_path, tiny_path, folder), capsys)
    assert not (tmp_path / "out").exists()


def test_bad_eval_data_is_refused_before_training(tmp_path, tiny_path, capsys):
    train = write_lines(tmp_path / "train.jsonl", *[as_bytes(GOOD_LINE)] * 4)
    bad = write_lines(tmp_path / "eval.jsonl", as_bytes(GOOD_LINE), b'{"prompt": 1, "completion": "2"}')
    line = refused(run_argv("sft", tmp_path, tiny_path, train, f"data.eval={bad}"), capsys)
    assert f"{bad}:2: field 'prompt'" in line
    assert not (tmp_path / "out").exists()


def test_too_little_data_for_one_batch_is_refused_before_the_model_loads(tmp_path, tiny_path, capsys):
    data = write_lines(tmp_path / "train.jsonl", *[as_bytes(GOOD_LINE)] * 3)
    line = refused(run_argv("sft", tmp_path, tiny_path, data, "trainer.global_batch_size=4", "trainer.micro_batch_size=4"), capsys)
    assert f"data.train: {data}: 3 usable examples are fewer than one global batch (trainer.global_batch_size=4)" in line
    assert not (tmp_path / "out").exists()


def test_over_long_rows_are_dropped_and_counted_and_all_over_long_is_an_error(tmp_path, tiny_path, capsys):
    long_line = {"prompt": "1+1=", "completion": "2" * 200}
    data = write_lines(tmp_path / "train.jsonl", as_bytes(long_line), as_bytes(long_line))
    line = refused(run_argv("sft", tmp_path, tiny_path, data, "data.max_length=32"), capsys)
    assert "no examples left" in line and "2 dropped as longer than max_length=32" in line
    strict = refused(run_argv("sft", tmp_path, tiny_path, data, "data.max_length=32", "data.truncation=error"), capsys)
    assert f"{data}:1:" in strict and "longer than data.max_length=32" in strict
    assert not (tmp_path / "out").exists()


def test_preference_pairs_whose_chosen_equals_rejected_are_dropped_and_counted(tmp_path, tiny_path, capsys):
    same = {"prompt": "1+1=", "chosen": "2", "rejected": "2"}
    data = write_lines(tmp_path / "train.jsonl", *[as_bytes(same)] * 4)
    line = refused(run_argv("dpo", tmp_path, tiny_path, data), capsys)
    assert "no examples left" in line and "4 pairs dropped as their chosen and rejected are the same" in line
    assert not (tmp_path / "out").exists()
    mixed = write_lines(tmp_path / "mixed.jsonl", as_bytes(same), as_bytes(COMMANDS["dpo"][0]))
    tokenizer = loading.load_tokenizer(tiny_path)
    pairs, report = load_preference_data(DataConfig(train=str(mixed)), tokenizer)
    assert [pair.location for pair in pairs] == [f"{mixed}:2"]
    assert report.identical_pairs == 1 and "1 pairs dropped as their chosen and rejected are the same" in report.summary()


# -- settings and config files -----------------------------------------------------------------


@pytest.mark.parametrize(
    "override, expected",
    [
        ("optim.lr=-0.1", "command line (optim.lr=-0.1): optim.lr must be >= 0, got -0.1"),
        ("trainer.max_steps=-5", "command line (trainer.max_steps=-5): trainer.max_steps must be >= 0, got -5"),
        ("trainer.epochs=0", "trainer.epochs must be >= 1"),
        ("trainer.keep_checkpoints=0", "trainer.keep_checkpoints must be >= 1"),
        ("optim.betas=[0.9, 1.5]", "optim.betas must be two values in [0, 1)"),
        ("optim.lr=fast", "optim.lr: expected a float, got 'fast'"),
        ("trainer.no_such_key=1", "unknown key 'trainer.no_such_key'"),
        ("trainer.resume=true", None),
    ],
)
def test_out_of_range_and_unknown_settings_are_config_errors(override, expected, tmp_path, tiny_path, capsys):
    data = write_lines(tmp_path / "train.jsonl", *[as_bytes(GOOD_LINE)] * 4)
    extra = [override] if expected else [override, "trainer.overwrite=true"]
    line = refused(run_argv("sft", tmp_path, tiny_path, data, *extra), capsys)
    assert (expected or "trainer.resume and trainer.overwrite: set one of them") in line
    assert not (tmp_path / "out").exists()


def test_config_file_errors_name_file_and_line(tmp_path, capsys):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("trainer:\n  max_steps: 3\n  seed: [1, 2\n")
    assert f"{bad_yaml}:4: invalid YAML" in refused(["sft", "-c", str(bad_yaml)], capsys)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("trainer:\n  max_steps: 3\n  maxsteps: 4\n")
    assert f"{unknown}:3: unknown key 'trainer.maxsteps'" in refused(["sft", "-c", str(unknown)], capsys)
    negative = tmp_path / "negative.yaml"
    negative.write_text("optim:\n  warmup_steps: 1\n  lr: -0.5\n")
    assert f"{negative}:3: optim.lr must be >= 0, got -0.5" in refused(["sft", "-c", str(negative)], capsys)
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"trainer:\n  output_dir: caf\xe9\n")
    offset = len(b"trainer:\n  output_dir: caf")
    assert f"{latin1}:2: not UTF-8: byte 0xe9 at byte offset {offset}" in refused(["sft", "-c", str(latin1)], capsys)
    missing = tmp_path / "missing.yaml"
    assert f"{missing}: config file not found" in refused(["sft", "-c", str(missing)], capsys)


# -- model folders -------------------------------------------------------------------------------


def broken_copy(tiny_path: Path, tmp_path: Path, *, remove=(), config_text=None) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny_path, folder)
    for pattern in remove:
        for file in folder.glob(pattern):
            file.unlink()
    if config_text is not None:
        (folder / "config.json").write_text(config_text)
    return folder


@pytest.mark.parametrize(
    "remove, config_text, expected",
    [
        (("tokenizer*", "special_tokens_map.json", "vocab*", "chat_template*"), None, "has no usable tokenizer"),
        ((), '{"model_type": "llama",\n  "hidden_size": 32,,\n}', "config.json:2: not a valid config.json"),
        (("*.safetensors",), None, "has no weights"),
        (("config.json",), None, "has no config.json"),
    ],
    ids=["no-tokenizer", "corrupt-config", "no-weights", "no-config"],
)
@pytest.mark.parametrize("command", ["sft", "dpo", "ppo", "generate"])
def test_incomplete_model_folders_are_refused_naming_the_setting(command, remove, config_text, expected, tmp_path, tiny_path, capsys):
    model = broken_copy(tiny_path, tmp_path, remove=remove, config_text=config_text)
    record = OUTPUT_COMMANDS[command][1] if command in OUTPUT_COMMANDS else COMMANDS[command][0]
    data = write_lines(tmp_path / "train.jsonl", *[as_bytes(record)] * 4)
    argv = run_argv(command, tmp_path, model, data) if command in COMMANDS else [
        command, f"model.path={model}", f"data.train={data}", f"generate.output={tmp_path / 'out' / 'g.jsonl'}"]
    line = refused(argv, capsys)
    assert line.startswith(f"stema {command}: model.path: ") and expected in line
    assert not (tmp_path / "out").exists()


def test_a_missing_reward_model_folder_names_its_setting(tmp_path, tiny_path, capsys):
    data = write_lines(tmp_path / "train.jsonl", *[as_bytes({"prompt": "1+1="})] * 4)
    missing = tmp_path / "no-rm"
    line = refused(["ppo", f"model.path={tiny_path}", f"data.train={data}", f"trainer.output_dir={tmp_path / 'out'}",
                    f"reward.model={missing}", *SMALL], capsys)
    assert f"reward.model: {missing} is not a folder" in line


# -- output folders ----------------------------------------------------------------------------


def test_an_output_folder_that_is_a_file_is_refused(tmp_path, tiny_path, capsys):
    data = write_lines(tmp_path / "train.jsonl", *[as_bytes(GOOD_LINE)] * 4)
    (tmp_path / "out").write_text("not a folder")
    line = refused(run_argv("sft", tmp_path, tiny_path, data), capsys)
    assert f"trainer.output_dir: {tmp_path / 'out'} is a file, not a folder" in line


# -- the readers on generated input ---------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.sampled_from(["prompt", "completion", "messages", "text", "chosen", "rejected", "label", "x"]), children, max_size=4),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(json_values.map(json.dumps) | st.text(max_size=20), min_size=1, max_size=5),
       kind=st.sampled_from(["sft", "preference", "prompt", "unpaired", "attributes"]))
def test_any_jsonl_content_reads_or_fails_with_a_data_error_at_its_line(lines, kind, tmp_path):
    """Whatever the lines hold, reading and parsing give records or one DataError that starts with
    the file and the 1-based line of the record at fault (never another exception)."""
    path = tmp_path / "generated.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    try:
        parse_records(read_records(path), kind=kind, format="auto", attributes=["a", "b"])
    except DataError as error:
        message = str(error)
        assert message.startswith(f"{path}:") or message.startswith("data.format"), message
        where = message[len(str(path)) + 1 :].split(":", 1)[0]
        assert where == " no records (the file is empty)" or 1 <= int(where) <= len("\n".join(lines).split("\n")), message


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=30), min_size=1, max_size=6),
       data=st.data())
def test_a_byte_that_is_not_utf8_is_located_by_line_and_offset(lines, data, tmp_path):
    """A stray 0x80-0xff byte inserted anywhere into ASCII lines: the error gives its line and its offset."""
    content = "\n".join(lines).encode()
    position = data.draw(st.integers(0, len(content)))
    bad = data.draw(st.integers(0x80, 0xFF))
    path = tmp_path / "generated.jsonl"
    path.write_bytes(content[:position] + bytes([bad]) + content[position:])
    with pytest.raises(DataError) as caught:
        read_records(path)
    line = content[:position].count(b"\n") + 1
    assert str(caught.value).startswith(f"{path}:{line}: not UTF-8: byte 0x{bad:02x} at byte offset {position} ")


@settings(max_examples=150, deadline=None)
@given(key=st.sampled_from(["optim.lr", "trainer.max_steps", "trainer.global_batch_size", "data.max_length", "trainer.seed",
                            "optim.betas", "data.truncation", "model.lora.r", "trainer.nope", "nope"]),
       value=st.text(max_size=12))
def test_any_override_value_loads_or_fails_with_a_config_error(key, value):
    """`key=value` with any text: the config loads, or a ConfigError names the command line (never another exception)."""
    try:
        load_config(SFTConfig, None, [f"{key}={value}"])
    except ConfigError as error:
        assert str(error).startswith("command line"), str(error)


def test_sft_data_reader_counts_over_long_rows(tmp_path, tiny_path):
    data = write_lines(tmp_path / "train.jsonl", as_bytes(GOOD_LINE), as_bytes({"prompt": "1+1=", "completion": "2" * 100}))
    examples, report = load_sft_data(DataConfig(train=str(data), max_length=32), loading.load_tokenizer(tiny_path))
    assert len(examples) == 1 and report.dropped == 1 and "1 dropped as longer than max_length=32" in report.summary()


def test_the_other_readers_name_the_place_too(tmp_path):
    """.json (an array with bytes that are not UTF-8; JSON Lines in a .json file), a corrupt Parquet
    file (the JSONL cases and a .json object without one list are in test_data_io.py)."""
    array = tmp_path / "train.json"
    array.write_bytes(b'[\n  {"prompt": "1+1=", "completion": "2"},\n  {"prompt": "caf\xe9"}\n]\n')
    offset = array.read_bytes().index(b"\xe9")
    with pytest.raises(DataError, match=rf"^{array}:3: not UTF-8: byte 0xe9 at byte offset {offset} "):
        read_records(array)
    lines = tmp_path / "lines.json"
    lines.write_text('{"prompt": "1+1=", "completion": "2"}\n{"prompt": "1+1=", "completion": \n')
    with pytest.raises(DataError, match=rf"^{lines}:2: invalid JSON"):
        read_records(lines)
    parquet = tmp_path / "train.parquet"
    parquet.write_bytes(b"PAR1 this is not a parquet file")
    with pytest.raises(DataError, match=rf"^{parquet}: cannot read Parquet"):
        read_records(parquet)
