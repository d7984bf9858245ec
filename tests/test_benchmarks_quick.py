"""The benchmark code runs and returns well-formed rows (quick sizes; no speed is asserted here:
speed goals live in benchmarks/RESULTS.md, measured by benchmarks/run_all.py)."""

import importlib.util
from pathlib import Path

import pytest

RUN_ALL = Path(__file__).resolve().parents[1] / "benchmarks" / "run_all.py"


def load_run_all():
    spec = importlib.util.spec_from_file_location("stema_run_all", RUN_ALL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run_all = load_run_all()
BENCH_MODULES = run_all.load_benchmark_modules()


def test_every_kernel_has_a_benchmark():
    names = {Path(module.__file__).stem for module in BENCH_MODULES}
    assert {"bench_logprobs", "bench_gae", "bench_refit", "bench_scheduler", "bench_rollout"} <= names


@pytest.mark.parametrize("module", BENCH_MODULES, ids=lambda m: Path(m.__file__).stem)
def test_quick_measure_returns_finite_ratios(module):
    rows = module.measure(device="cpu", quick=True)
    assert rows, "measure() returned no rows"
    for row in rows:
        run_all.check_row(row, Path(module.__file__).stem)
        assert row["device"].startswith("cpu")
        assert row["stema"] > 0 and row["baseline"] > 0 and row["ratio"] > 0
        if row["goal"] is not None:
            # ratio is always the improvement factor; higher_is_better describes the raw metric
            assert row["met"] == (row["ratio"] >= row["goal"])


def test_results_table_replaces_only_its_own_device_section(tmp_path, monkeypatch):
    monkeypatch.setattr(run_all, "RESULTS_PATH", tmp_path / "RESULTS.md")
    row = dict(benchmark="b", case="c", metric="time", stema=1.0, baseline=3.0, ratio=3.0, higher_is_better=True,
               goal=2.0, met=True, baseline_name="torch", device="cpu")
    run_all.write_section("cuda", "<!-- results:cuda -->\nGPU TABLE\n<!-- /results:cuda -->")
    run_all.write_section("cpu", run_all.section("cpu", False, [row], "cmd"))
    run_all.write_section("cpu", run_all.section("cpu", False, [dict(row, ratio=4.0)], "cmd"))
    text = (tmp_path / "RESULTS.md").read_text()
    assert "GPU TABLE" in text
    assert text.count("<!-- results:cpu -->") == 1
    assert "| 4.00 |" in text and "| 3.00 |" not in text


def test_learning_comparison_runs_both_sides_from_the_sft_model():
    """bench_learning (not in run_all: minutes per seed) at smoke sizes: both frameworks run GRPO
    (STEMA twice: the demo's stage, and training on every group as TRL does) from the demo's SFT
    model and are scored by the demo's evaluation. (The DPO comparison needs the SFT model's own
    sampled pairs, which a smoke-sized SFT model does not answer right often enough
    to make: it runs in the full benchmark only.)"""
    spec = importlib.util.spec_from_file_location("stema_bench_learning", RUN_ALL.parent / "bench_learning.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.compare(0, quick=True, algorithms=("grpo", "grpo_all_groups"))
    for algorithm in ("grpo", "grpo_all_groups"):
        row = result[algorithm]
        assert 0.0 <= row["stema_accuracy"] <= 1.0 and 0.0 <= row["trl_accuracy"] <= 1.0
        assert row["stema_seconds"] > 0 and row["trl_seconds"] > 0
    assert result["grpo"]["trl_seconds"] == result["grpo_all_groups"]["trl_seconds"]  # TRL ran once
    assert "| 0 | grpo |" in bench.table([result]) and "| 0 | grpo_all_groups |" in bench.table([result])
