"""GRPO and PPO step throughput: STEMA's controller against TRL's `GRPOTrainer.train()` on the CPU.

Both train the built-in tiny Llama (1.3M parameters, character tokenizer; random weights, seed 0)
on the same built-in arithmetic prompts (chat template, about 18 tokens), rewarded by the task's
exact-match function, in fp32 on the CPU: 8 prompts per step, 4 samples per prompt (32
sequences), temperature 1, at most 32 new tokens (quick: 2 prompts x 2 samples, 4 tokens), one
optimizer step per rollout batch over all 32 sequences at once, beta 0.04 (k3 KL in the loss)
against a separate frozen reference, AdamW at a constant lr, clipping at 1.0, token-level loss
averaging (TRL's `loss_type="bnpo"`, which is STEMA's denominator).

Timing: the wall time of each step after the first (warm-up), median over the steps: STEMA's
`step_s` from its metrics (the whole controller step: generation, inference of the actor, the
reference and the reward, advantages, the update, the refit), TRL's the time between consecutive
`on_step_end` callbacks (generation with `model.generate`, scoring, the reference pass, the update).
prompts/s = 8 / the median step time; generated tokens/s = the step's generated tokens / its time
(TRL's from its logged `completions/mean_length`). STEMA's rows also split its step into
generation, inference, training and refit. A second STEMA row runs PPO with GAE and a critic (no
TRL counterpart runs in TRL 1.16's main package: its PPO trainer moved to `trl.experimental`).

    python benchmarks/bench_grpo.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from common import exact_match_reward, trl_grpo_config, trl_step_timer

BENCHMARK = "grpo"
GOAL = 2.0
LR = 1e-5
BETA = 0.04
FULL = dict(prompts=8, samples=4, new_tokens=32, steps=8)
QUICK = dict(prompts=2, samples=2, new_tokens=4, steps=3)
BASELINE_NAME = "TRL 1.16 GRPOTrainer.train() (bnpo loss, beta 0.04, separate reference)"


def stema_steps(model_path: Path, size: dict, output_dir: Path, *, advantage: str) -> list[dict]:
    """Per-step metrics of STEMA's PPO controller (`stema grpo`, or `stema ppo` with GAE)."""
    from stema.config import GRPOConfig, load_config
    from stema.trainers.ppo import run
    from stema.training.logging import read_metrics

    sequences = size["prompts"] * size["samples"]
    overrides = [
        f"model.path={model_path}", "reward.function=builtin", "data.train=builtin", f"data.builtin_size={size['prompts'] * size['steps']}",
        "data.max_length=64", f"rollout.samples_per_prompt={size['samples']}", f"rollout.max_new_tokens={size['new_tokens']}",
        "rollout.temperature=1.0", f"rollout.max_batch={sequences}", f"trainer.global_batch_size={size['prompts']}",
        f"trainer.micro_batch_size={sequences}", f"trainer.max_steps={size['steps']}", f"trainer.output_dir={output_dir}",
        "trainer.progress_bar=false", "trainer.tensorboard=false", "trainer.export_hf=false", f"optim.lr={LR}",
        "optim.schedule=constant", f"ppo.kl_coef={BETA}", f"ppo.advantage={advantage}",
    ]
    if advantage == "gae":
        overrides += ["ppo.kl_in=reward", "ppo.kl_estimator=k1", "ppo.whiten_advantages=true"]
    run(load_config(GRPOConfig, None, overrides), command=f"bench-{advantage}")
    return read_metrics(output_dir, "train")


def trl_steps(model_path: Path, size: dict, output_dir: Path) -> tuple[list[float], list[float]]:
    """(seconds between consecutive step ends, mean completion length per step) of TRL's GRPOTrainer."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOTrainer

    from stema.data import builtin

    timer = trl_step_timer()
    args = trl_grpo_config(output_dir, prompts=size["prompts"], samples=size["samples"], new_tokens=size["new_tokens"],
                           steps=size["steps"], lr=LR, beta=BETA, seed=0)
    records = builtin.prompt_records(size["prompts"] * size["steps"], 0)
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_path), reward_funcs=exact_match_reward, args=args,
        train_dataset=Dataset.from_list(records), processing_class=AutoTokenizer.from_pretrained(model_path),
        callbacks=[timer],
    )
    trainer.train()
    lengths = [entry["completions/mean_length"] for entry in trainer.state.log_history if "completions/mean_length" in entry]
    return timer.step_seconds(), lengths


def _row(case: str, metric: str, stema: float, baseline: float, baseline_name: str, goal: float | None) -> dict:
    ratio = stema / baseline
    return {
        "benchmark": BENCHMARK, "case": case, "metric": metric, "stema": stema, "baseline": baseline, "ratio": ratio,
        "higher_is_better": True, "goal": goal, "met": None if goal is None else ratio >= goal,
        "baseline_name": baseline_name, "device": "cpu",
    }


def measure(*, device: str = "cpu", quick: bool = False) -> list[dict]:
    """Rows: prompts/s and generated tokens/s of STEMA's GRPO vs TRL, STEMA's step split, and
    STEMA's PPO with GAE (CPU only: the comparison is defined on the CPU)."""
    if device != "cpu":
        return []
    from datasets import disable_progress_bars

    from stema.models.tiny import save_tiny_model

    disable_progress_bars()
    size = QUICK if quick else FULL
    with tempfile.TemporaryDirectory() as folder:
        model_path = save_tiny_model(Path(folder) / "tiny")
        grpo = stema_steps(model_path, size, Path(folder) / "stema-grpo", advantage="grpo")[1:]
        ppo = stema_steps(model_path, size, Path(folder) / "stema-ppo", advantage="gae")[1:]
        trl_seconds, trl_lengths = trl_steps(model_path, size, Path(folder) / "trl")
    trl_seconds, trl_lengths = trl_seconds[1:], trl_lengths[1:]
    sequences = size["prompts"] * size["samples"]
    case = (f"tiny Llama 1.3M fp32, {size['prompts']} prompts x {size['samples']} samples, <= {size['new_tokens']} new tokens, "
            f"median of {len(grpo)} steps")
    stema_step = statistics.median(r["step_s"] for r in grpo)
    trl_step = statistics.median(trl_seconds)
    stema_tokens = statistics.median(r["generated_tokens"] / r["step_s"] for r in grpo)
    trl_tokens = statistics.median(length * sequences / seconds for length, seconds in zip(trl_lengths, trl_seconds))
    rows = [
        _row(case, "GRPO prompts/s", size["prompts"] / stema_step, size["prompts"] / trl_step, BASELINE_NAME, GOAL),
        _row(case, "GRPO generated tokens/s", stema_tokens, trl_tokens, BASELINE_NAME, GOAL),
    ]
    ppo_step = statistics.median(r["step_s"] for r in ppo)
    rows.append(_row(case + ", PPO with GAE + critic", "PPO prompts/s", size["prompts"] / ppo_step, size["prompts"] / trl_step,
                     BASELINE_NAME + " (GRPO: no PPO trainer in TRL 1.16's main package)", None))
    for part in ("generation_s", "inference_s", "training_s", "refit_s"):
        share = statistics.median(r[part] / r["step_s"] for r in grpo)
        rows.append(_row(case, f"STEMA GRPO step share: {part[:-2]}", share, 1.0, "the whole STEMA step", None))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    for row in measure(device="cpu", quick=args.quick):
        print(f"{row['metric']}: STEMA {row['stema']:.4g}, baseline {row['baseline']:.4g}, ratio {row['ratio']:.2f}")


if __name__ == "__main__":
    main()
