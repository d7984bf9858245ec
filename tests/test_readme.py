"""The README's commands and config keys are real: every `stema ...` line in its code blocks parses,
its `-c` file exists and every key resolves against the command's typed config (nothing runs), and
every dotted key it names in backticks (starting with a config section or a command's name) exists
in some command's config."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from stema.cli import COMMANDS, build_parser, command_config
from stema.config import describe

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
_BLOCK = re.compile(r"```(\w*)\n(.*?)```", re.S)
_INLINE = re.compile(r"`([a-z_]+(?:\.[a-z_]+)+)(?:=[^`]*)?`")


_INLINE_COMMAND = re.compile(r"`(stema [a-z]+ [^`<]*)`")


def readme_commands() -> list[str]:
    """Each `stema ...` command in the README: the lines of its shell code blocks (after any `&&`,
    comments dropped) and the inline ones with arguments (the commands table)."""
    text = README.read_text()
    commands = [match.strip() for match in _INLINE_COMMAND.findall(_BLOCK.sub("", text))]
    for language, body in _BLOCK.findall(text):
        if language not in ("bash", "sh", ""):
            continue
        for line in body.splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if words[:1] == ["stema"]:
                    commands.append(shlex.join(words))
    return commands


def config_keys() -> set[str]:
    """Every dotted key of every command's config."""
    return {key for command in COMMANDS.values() for key, *_ in describe(command.config_class())}


def test_readme_has_commands_for_every_trainer():
    named = {shlex.split(command)[1] for command in readme_commands()}
    assert {"sft", "rm", "dpo", "kto", "ppo", "grpo", "rs", "spin", "steerlm", "annotate", "generate", "demo"} <= named


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_resolves_against_its_config(command, monkeypatch):
    monkeypatch.chdir(ROOT)  # -c paths are relative to the repository root, as a user runs them
    args = build_parser().parse_args(shlex.split(command)[1:])
    if args.imports:
        # The --import modules register names for the whole process: resolved in a process of its own.
        script = ("import sys; from stema.cli import build_parser, command_config, import_modules; "
                  "args = build_parser().parse_args(sys.argv[1:]); import_modules(args.imports); command_config(args)")
        done = subprocess.run([sys.executable, "-c", script, *shlex.split(command)[1:]], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return
    command_config(args)


def test_readme_config_keys_exist():
    keys = config_keys()
    sections = {key.split(".")[0] for key in keys if "." in key} | set(COMMANDS)  # `dpo.loss` is a (wrong) key too
    named = {match for match in _INLINE.findall(README.read_text()) if match.split(".")[0] in sections}
    assert named, "the README names no config keys in backticks"
    assert sorted(named - keys) == []


def test_a_wrong_key_in_a_command_is_caught():
    from stema.config import ConfigError

    args = build_parser().parse_args(["dpo", "-c", str(ROOT / "examples/dpo/tiny_builtin.yaml"), "dpo.loss=ipo"])
    with pytest.raises(ConfigError, match="dpo"):
        command_config(args)
