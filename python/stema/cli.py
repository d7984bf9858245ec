"""`stema <command> -c cfg.yaml key=value ...`: the command line.

Each command pairs a typed config class with the function that runs it. Values come from the
config class's defaults, then the YAML file, then the dotted `key=value` overrides; any unknown key
or wrongly typed value stops the command before it starts, naming file, line and field.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from dataclasses import dataclass
from typing import Any, Callable

from stema import __version__
from stema.config import (
    ConfigError,
    DemoConfig,
    DPOConfig,
    GRPOConfig,
    KTOConfig,
    PPOConfig,
    RMConfig,
    SFTConfig,
    describe,
    load_config,
)
from stema.config import AnnotateConfig, GenerateConfig, RSConfig, SPINConfig, SteerLMConfig


def _run_sft(config: SFTConfig) -> Any:
    from stema.trainers.sft import run

    return run(config)


def _run_rm(config: RMConfig) -> Any:
    from stema.trainers.reward import run

    return run(config)


def _run_dpo(config: DPOConfig) -> Any:
    from stema.trainers.dpo import run

    return run(config)


def _run_kto(config: KTOConfig) -> Any:
    from stema.trainers.kto import run

    return run(config)


def _run_ppo(config: PPOConfig) -> Any:
    from stema.trainers.ppo import run

    return run(config)


def _run_grpo(config: GRPOConfig) -> Any:
    from stema.trainers.ppo import run_grpo

    return run_grpo(config)


def _run_annotate(config: AnnotateConfig) -> Any:
    from stema.trainers.steerlm import annotate

    return annotate(config)


def _run_steerlm(config: SteerLMConfig) -> Any:
    from stema.trainers.steerlm import run

    return run(config)


def _run_generate(config: GenerateConfig) -> Any:
    from stema.trainers.steerlm import generate

    return generate(config)


def _run_rs(config: RSConfig) -> Any:
    from stema.trainers.rejection import run

    return run(config)


def _run_spin(config: SPINConfig) -> Any:
    from stema.trainers.spin import run

    return run(config)


def _run_demo(config: Any) -> Any:
    from stema.demo import run

    return run(config)


@dataclass(frozen=True)
class Command:
    name: str
    summary: str
    config_class: Callable[[], type]
    run: Callable[[Any], Any]


COMMANDS = {
    command.name: command
    for command in (
        Command("sft", "Supervised fine-tuning (prompt masking, packing, LoRA).", lambda: SFTConfig, _run_sft),
        Command("rm", "Reward model: pairwise Bradley-Terry or multi-attribute regression.", lambda: RMConfig, _run_rm),
        Command("dpo", "Preference optimization: DPO, cDPO, IPO, RPO (reward-aware), SimPO; LoRA or full.", lambda: DPOConfig, _run_dpo),
        Command("kto", "KTO on unpaired (prompt, completion, label) data.", lambda: KTOConfig, _run_kto),
        Command("ppo", "RLHF with PPO: actor, critic, reward, reference roles; gae, reinforce, rloo or grpo advantages.", lambda: PPOConfig, _run_ppo),
        Command("grpo", "GRPO: PPO's machinery with group-normalized advantages, no critic, KL in the loss.", lambda: GRPOConfig, _run_grpo),
        Command("annotate", "SteerLM: label a data set with an attribute model's predictions.", lambda: AnnotateConfig, _run_annotate),
        Command("steerlm", "SteerLM: attribute-conditioned SFT.", lambda: SteerLMConfig, _run_steerlm),
        Command("generate", "Generate completions, optionally steered: --attributes quality:4,verbosity:2.", lambda: GenerateConfig, _run_generate),
        Command("rs", "Rejection sampling: best-of-n by a reward function or model, then SFT on the winners.", lambda: RSConfig, _run_rs),
        Command("spin", "SPIN: self-play fine-tuning against the model's own generations.", lambda: SPINConfig, _run_spin),
        Command("demo", "Built-in tiny model and task end to end on a CPU, no download.", lambda: DemoConfig, _run_demo),
    )
}


def config_help(config_class: type) -> str:
    lines = ["config keys (set in the YAML file or as key=value):"]
    for key, type_name, default, doc in describe(config_class):
        lines.append(f"  {key} ({type_name}, default {default!r})")
        lines.extend("      " + line for line in textwrap.wrap(doc, 88))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stema",
        description="STEMA: align language models (SFT, reward models, PPO, DPO, ...).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"stema {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    for command in COMMANDS.values():
        sub = subparsers.add_parser(
            command.name,
            help=command.summary,
            description=command.summary,
            epilog=config_help(command.config_class()),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.add_argument("-c", "--config", help="YAML file of config values")
        sub.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                         help="import MODULE (from the current folder or the installed packages) before the config is read, "
                              "e.g. one that registers an estimator with @register_advantage; may be repeated")
        sub.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=3e-4")
        if command.name == "demo":
            sub.add_argument("--out", help="output folder (same as out=DIR)")
            sub.add_argument("--stages", help="comma-separated stages, or 'all' (same as stages=...)")
        if command.name == "generate":
            sub.add_argument("--attributes", help="requested attributes, e.g. quality:4,verbosity:2 (same as generate.attributes=...)")
    return parser


def command_config(args: argparse.Namespace) -> tuple[Command, Any]:
    """The command that parsed `args` names and its config: defaults, the `-c` file, then the
    overrides (the demo's --out/--stages and generate's --attributes among them), type-checked
    and validated without running anything. ConfigError when a key or value is wrong."""
    command = COMMANDS[args.command]
    overrides = list(args.overrides)
    if command.name == "demo":
        overrides += [f"out={args.out}"] if args.out else []
        overrides += [f"stages={args.stages}"] if args.stages else []
    if command.name == "generate" and args.attributes:
        overrides.append(f"generate.attributes='{args.attributes}'")
    return command, load_config(command.config_class(), args.config, overrides)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        import_modules(args.imports)
        command, config = command_config(args)
    except ConfigError as error:
        print(f"stema {args.command}: config error: {error}", file=sys.stderr)
        return 2
    try:
        command.run(config)
    except Exception as error:
        reported = user_error(error)
        if reported is None:
            raise
        print(f"stema {command.name}: {reported}", file=sys.stderr)
        return 2
    return 0


def import_modules(names: list[str]) -> None:
    """Import each `--import` module, the current folder first on the path (as `python -m` does);
    ConfigError naming the module when it cannot be imported."""
    from stema.rewards import import_from_current_folder

    for name in names:
        try:
            import_from_current_folder(name)
        except Exception as error:
            raise ConfigError(f"--import {name}: {type(error).__name__}: {error}") from None


def user_error(error: BaseException) -> BaseException | None:
    """The error to report in one line (exit 2) when `error` is, or was caused by, bad input: a
    ConfigError, a DataError or a RewardFunctionError, also when raised inside a role worker (a
    RoleError's cause, or a Ray task error's `cause`). None for anything else (a bug: traceback)."""
    from stema.data.errors import DataError
    from stema.rewards import RewardFunctionError
    from stema.training.folder import RunFolderError

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        remote = getattr(error, "cause", None)  # ray.exceptions.RayTaskError: the exception raised in the actor
        if isinstance(remote, BaseException):
            error = remote
            continue
        if isinstance(error, (ConfigError, DataError, RewardFunctionError, RunFolderError)):
            return error
        error = error.__cause__
    return None


def entry() -> None:
    """The `stema` program (and `python -m stema.cli`): `main()`, then exit with its code.

    A process of a torchrun world (WORLD_SIZE > 1) leaves with `os._exit` once the command has
    returned (its process group destroyed, its files written and closed): torch's gloo backend can
    still be releasing its last work on a C++ thread while the interpreter finalizes, and a thread
    that then asks for the GIL is ended mid-destructor, which aborts the process ("terminate called
    without an active exception") after a run that succeeded. Errors still raise as usual."""
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
