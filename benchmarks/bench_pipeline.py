"""Pipeline parallel on the CPU: `stema sft` in 1 process against 2 pipeline stages (torchrun, gloo,
schedule 1f1b) at the same global batch, and each stage's measured bubble against the schedule's
theoretical (pp - 1) / (microbatches + pp - 1).

Model: a randomly initialized Llama with untied embeddings (pipeline stages need them), hidden 256,
8 decoder layers, 8 heads, MLP 688, the tiny character tokenizer (vocabulary ~100). Data: 64
prompt/completion records of random letters, ~120 tokens each, `data.max_length` 128 (the pipeline
pads every row to it; the 1-process run pads to each micro-batch's longest row). Global batch 16,
fp32, 8 optimizer steps; the first 2 are warm-up.

Figures:
- tokens/s: trained tokens per step (all ranks) / the median step time (the loop's own
  `tokens_per_s` in metrics.jsonl, steps 3..8);
- peak memory per process: the resident-set high-water mark (VmHWM) at exit, which includes the
  interpreter, torch and the model as loaded whole before it is split; and the training state
  the process keeps: 4 x its trained parameters' bytes (weights, gradients, AdamW's two moments);
- bubble: on each stage, 1 - (seconds inside its forward and backward chunks) / (seconds inside
  the schedule's step), over steps 3..8; theory (pp - 1) / (m + pp - 1) for m micro-batches.
  Send/receive waits and the loss count as idle, so the measured bubble is an upper bound.

Each process runs one torch thread (OMP_NUM_THREADS=1): 1 process uses one core, 2 stages two.
Not in run_all.py: it launches torchrun worlds (a minute or more on a shared 2-core machine), and
its figures are absolute, so record `uptime` beside them.

    python benchmarks/bench_pipeline.py [--microbatches 2 4 8] [--steps 8]
"""

import argparse
import json
import os
import random
import statistics
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WARMUP_STEPS = 2


def write_inputs(folder: Path) -> tuple[Path, Path]:
    """The untied Llama and the random-letter data set, under `folder`."""
    import torch
    from transformers import AutoModelForCausalLM

    from stema.models import tiny
    from stema.models.families import tiny_family_config

    tokenizer = tiny.build_tokenizer()
    config = tiny_family_config("llama", vocab_size=len(tokenizer), hidden_size=256, num_layers=8, num_heads=8, num_kv_heads=8,
                                intermediate_size=688, max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    model_path = folder / "model"
    AutoModelForCausalLM.from_config(config).save_pretrained(model_path)
    tokenizer.save_pretrained(model_path)
    rng = random.Random(0)
    letters = string.ascii_lowercase + " "
    rows = [{"prompt": "".join(rng.choices(letters, k=40)), "completion": "".join(rng.choices(letters, k=rng.randint(60, 80)))}
            for _ in range(64)]
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return model_path, data


def sft_args(out: Path, model: Path, data: Path, steps: int, *extra: str) -> list[str]:
    return ["sft", f"trainer.output_dir={out}", f"model.path={model}", f"data.train={data}", "data.max_length=128",
            "trainer.global_batch_size=16", "trainer.micro_batch_size=2", f"trainer.max_steps={steps}", "trainer.precision=fp32",
            "trainer.progress_bar=false", "trainer.tensorboard=false", "trainer.export_hf=false", "trainer.save_every=0",
            "optim.lr=1e-4", *extra]


def worker(report: Path, args: list[str]) -> None:
    """One rank: `stema sft` with the pipeline's step and its stages' forward/backward chunks timed."""
    from torch.distributed.pipelining import PipelineStage

    from stema.cli import main
    from stema.distributed.pipeline import Pipeline
    from stema.training import loop

    spans: dict[str, list[float]] = {"step": [], "compute": []}

    def timed(function, kind):
        def wrapper(*inner, **kwargs):
            started = time.perf_counter()
            try:
                return function(*inner, **kwargs)
            finally:
                spans[kind].append(time.perf_counter() - started)
        return wrapper

    step_marks: list[int] = []
    original_step = Pipeline.train_step

    def train_step(self, *inner, **kwargs):
        step_marks.append(len(spans["compute"]))
        return timed(original_step, "step")(self, *inner, **kwargs)

    Pipeline.train_step = train_step
    trained_bytes = []
    original_optimizer = loop.build_optimizer

    def build_optimizer(model, cfg):
        trained_bytes.append(sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad))
        return original_optimizer(model, cfg)

    loop.build_optimizer = build_optimizer
    PipelineStage.forward_one_chunk = timed(PipelineStage.forward_one_chunk, "compute")
    PipelineStage.backward_one_chunk = timed(PipelineStage.backward_one_chunk, "compute")
    code = main(args)
    step_marks.append(len(spans["compute"]))
    computes = [sum(spans["compute"][a:b]) for a, b in zip(step_marks, step_marks[1:])]
    hwm_kib = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
    report.write_text(json.dumps({"code": code, "steps": spans["step"], "computes": computes, "peak_mib": hwm_kib / 1024,
                                  "state_mib": 4 * trained_bytes[0] / 2**20}))


def run(nproc: int, folder: Path, args: list[str]) -> list[dict]:
    """The per-rank reports of one run (1 process: plain python; more: torchrun)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "python"), os.environ.get("PYTHONPATH", "")])))
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                   f"--nproc_per_node={nproc}"]
    reports = [folder / f"rank{rank}.json" for rank in range(nproc)]
    command = [*launcher, __file__, "--worker", str(folder / "rank{rank}.json"), *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    return [json.loads(report.read_text()) for report in reports]


def tokens_per_s(out: Path) -> float:
    from stema.training.logging import read_metrics

    return statistics.median(record["tokens_per_s"] for record in read_metrics(out, "train")[WARMUP_STEPS:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parser.add_argument("--microbatches", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--steps", type=int, default=8)
    options = parser.parse_args()
    if options.worker:
        report, *args = options.worker
        worker(Path(report.format(rank=os.environ.get("RANK", "0"))), args)
        return
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        model, data = write_inputs(folder)
        print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
        print("| run | micro-batches | tokens/s | vs 1 process | peak MiB per process | training state MiB per process | "
              "bubble measured per stage | bubble theory |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        one = folder / "one"
        reports = run(1, one, sft_args(one, model, data, options.steps))
        base = tokens_per_s(one)
        print(f"| 1 process | 8 x 2 examples | {base:.0f} | 1.00 | {reports[0]['peak_mib']:.0f} | {reports[0]['state_mib']:.1f} | - | - |")
        for microbatches in options.microbatches:
            out = folder / f"pp2-m{microbatches}"
            reports = run(2, out, sft_args(out, model, data, options.steps, "distributed.pp_size=2", "distributed.pp_schedule=1f1b",
                                           f"distributed.pp_microbatches={microbatches}"))
            speed = tokens_per_s(out)
            bubbles = [1 - sum(r["computes"][WARMUP_STEPS:]) / sum(r["steps"][WARMUP_STEPS:]) for r in reports]
            theory = (2 - 1) / (microbatches + 2 - 1)
            peaks = " / ".join(f"{report['peak_mib']:.0f}" for report in reports)
            states = " / ".join(f"{report['state_mib']:.1f}" for report in reports)
            measured = " / ".join(f"{bubble:.2f}" for bubble in bubbles)
            print(f"| pp=2 1f1b | {microbatches} x {16 // microbatches} examples | {speed:.0f} | {speed / base:.2f} | {peaks} | {states} | "
                  f"{measured} | {theory:.2f} |")
        print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")


if __name__ == "__main__":
    main()
