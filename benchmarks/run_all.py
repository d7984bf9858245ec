"""Run every kernel benchmark side by side with its plain-PyTorch baseline and report ratios.

    python benchmarks/run_all.py                  # full sizes on the CPU, table to stdout
    python benchmarks/run_all.py --device cuda    # on a GPU
    python benchmarks/run_all.py --quick          # tiny sizes (seconds), for a smoke run
    python benchmarks/run_all.py --write          # also replace this device's section of RESULTS.md

Each `benchmarks/bench_<kernel>.py` exposes `measure(*, device, quick) -> list[dict]` of rows with
ROW_KEYS: `stema` and `baseline` are the raw figures (`higher_is_better` says which way that metric
goes), `ratio` is always the improvement factor (> 1: STEMA is better), and `met` is
`ratio >= goal`. Every figure is a ratio of STEMA to its baseline measured in the same process, in the same run, because absolute
times on shared machines mean little.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import math
import platform
import re
import sys
from pathlib import Path

import torch

import stema_kernels

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_PATH = BENCH_DIR / "RESULTS.md"
ROW_KEYS = ("benchmark", "case", "metric", "stema", "baseline", "ratio", "higher_is_better", "goal", "met", "baseline_name", "device")


def load_benchmark_modules() -> list:
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))  # the benchmarks import their shared `common` module
    modules = []
    for path in sorted(BENCH_DIR.glob("bench_*.py")):
        name = f"stema_bench_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # registered before running, as `import` does (dataclasses need it)
        spec.loader.exec_module(module)
        if hasattr(module, "measure"):
            modules.append(module)
    return modules


def check_row(row: dict, source: str) -> dict:
    missing = [key for key in ROW_KEYS if key not in row]
    if missing:
        raise ValueError(f"{source}: benchmark row {row.get('case')!r} lacks {missing}")
    for key in ("stema", "baseline", "ratio"):
        if not (isinstance(row[key], (int, float)) and math.isfinite(row[key])):
            raise ValueError(f"{source}: {key}={row[key]!r} in row {row['case']!r} is not a finite number")
    return row


def collect(device: str, quick: bool, only: list[str] | None = None) -> list[dict]:
    rows = []
    for module in load_benchmark_modules():
        name = Path(module.__file__).stem
        if only and not any(word in name for word in only):
            continue
        print(f"[run_all] {name} on {device}{' (quick)' if quick else ''} ...", file=sys.stderr, flush=True)
        rows.extend(check_row(row, name) for row in module.measure(device=device, quick=quick))
    return rows


def format_number(value: float) -> str:
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1e6 or magnitude < 1e-3:
        return f"{value:.3e}"
    return f"{value:.4g}"


def format_table(rows: list[dict]) -> str:
    lines = [
        "| benchmark | case | metric | STEMA | baseline | baseline is | ratio (x better) | goal | met |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        goal = "" if row["goal"] is None else f"{row['goal']:g}"
        met = "" if row["met"] is None else ("yes" if row["met"] else "NO")
        lines.append(
            f"| {row['benchmark']} | {row['case']} | {row['metric']} | {format_number(row['stema'])} | "
            f"{format_number(row['baseline'])} | {row['baseline_name']} | {row['ratio']:.2f} | {goal} | {met} |"
        )
    return "\n".join(lines)


def describe_machine(device: str) -> str:
    info = stema_kernels.build_info()
    if device == "cuda":
        machine = f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    else:
        cpu = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        machine = f"{cpu}, {torch.get_num_threads()} torch threads (torch {torch.__version__})"
    build = f"stema_kernels {info['version']}: cuda={info['cuda']} archs={info['cuda_archs']} openmp={info['openmp']}"
    return f"{machine}; {build}; Python {platform.python_version()}"


def section(device: str, quick: bool, rows: list[dict], command: str, *, table: str | None = None) -> str:
    today = datetime.date.today().isoformat()
    return (
        f"<!-- results:{device} -->\n"
        f"## {device.upper()} ({today})\n\n"
        f"Machine: {describe_machine(device)}.\n"
        f"Command: `{command}`{' (quick sizes: not the issue sizes)' if quick else ''}.\n\n"
        f"{table or format_table(rows)}\n"
        f"<!-- /results:{device} -->"
    )


def merged_table(device: str, rows: list[dict]) -> str:
    """The table of this device's recorded section with the rows of the benchmarks in `rows`
    replaced by `rows` (for `--only ... --write`: the other benchmarks' recorded rows stay)."""
    current = RESULTS_PATH.read_text() if RESULTS_PATH.exists() else ""
    match = re.search(rf"<!-- results:{device} -->.*?<!-- /results:{device} -->", current, re.S)
    rerun = {row["benchmark"] for row in rows}
    new_lines = format_table(rows).splitlines()
    if match is None:
        return "\n".join(new_lines)
    kept = [line for line in match.group(0).splitlines()
            if line.startswith("| ") and not line.startswith("| benchmark ") and line.split(" | ")[0][2:] not in rerun]
    body = sorted(kept + new_lines[2:], key=lambda line: line.split(" | ")[0])
    return "\n".join(new_lines[:2] + body)


def write_section(device: str, text: str) -> None:
    header = (
        "# Benchmark results\n\n"
        "Written by `benchmarks/run_all.py --write`; each device's section is replaced by its own run.\n"
        "Every ratio compares STEMA with its baseline measured side by side in one run.\n"
    )
    current = RESULTS_PATH.read_text() if RESULTS_PATH.exists() else header
    pattern = re.compile(rf"<!-- results:{device} -->.*?<!-- /results:{device} -->", re.S)
    if pattern.search(current):
        updated = pattern.sub(lambda _: text, current)
    else:
        updated = current.rstrip("\n") + "\n\n" + text + "\n"
    RESULTS_PATH.write_text(updated)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--write", action="store_true", help="replace this device's section of benchmarks/RESULTS.md")
    parser.add_argument("--only", nargs="*", help="run only benchmarks whose file name contains one of these words")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    rows = collect(args.device, args.quick, args.only)
    command = "python benchmarks/run_all.py" + (f" --device {args.device}" if args.device != "cpu" else "")
    command += " --quick" if args.quick else ""
    if args.only:
        command += " (this run: --only " + " ".join(args.only) + "; the other rows are from the previous full run)"
    table = merged_table(args.device, rows) if args.only and args.write else None
    text = section(args.device, args.quick, rows, command, table=table)
    print(text)
    if args.write:
        write_section(args.device, text)
        print(f"[run_all] wrote the {args.device} section of {RESULTS_PATH}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
