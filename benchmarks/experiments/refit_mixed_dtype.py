"""Experiment: refit time of the 55M benchmark model from an fp32 trainer into a bf16 engine (the
usual RL pairing: every weight cast on the way), the engine with its linear weights packed in place
(the CPU default where oneDNN's layout is a row-block one) against an engine without packed weights
(`prepack=False`, a plain cast copy). Not a bench_rollout row (that benchmark refits from a model of
the engine's own dtype).

    OMP_NUM_THREADS=1 python benchmarks/experiments/refit_mixed_dtype.py [--repeats 7]

Prints the median refit milliseconds of each engine (one thread).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import bench_rollout

    from stema.rollout import EngineRefitter, GenerationEngine

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = bench_rollout.build_model(bench_rollout.LLAMA_55M, torch.float32, "cpu")
    for prepack in (None, False):
        engine = GenerationEngine.from_hf(model, dtype=torch.bfloat16, max_batch=8, max_total_len=96, prepack=prepack)
        packed = engine.decoder.packed
        if packed is None:
            how = "plain buffers (prepack=False)"
        else:
            how = "packed in place" if packed.in_place else "repacked by oneDNN after the copy"
        refit = EngineRefitter(engine, model).refit
        refit()
        seconds = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            refit()
            seconds.append(time.perf_counter() - started)
        print(f"fp32 trainer -> bf16 engine, {how}: refit {1e3 * statistics.median(seconds):.1f} ms (median of {args.repeats})")


if __name__ == "__main__":
    main()
