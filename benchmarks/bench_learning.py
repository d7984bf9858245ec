"""Learning comparison with TRL on the demo task: from the same SFT model, with the same data and
settings, `stema grpo` against TRL's `GRPOTrainer` and `stema dpo` against TRL's `DPOTrainer`;
held-out exact match after each run and the run's wall time, per seed.

For each seed:
1. `stema demo --stages sft` (the demo's own base model, task and SFT stage) gives the SFT model
   both sides start from, and its held-out exact match.
2. GRPO: STEMA runs the demo's RL stage (`stema.demo.stage_ppo`: GRPO advantages, k3 KL in the
   loss, the demo's lr, KL coefficient, prompts and samples per prompt, steps, temperature and
   sampling length) twice: as the demo runs it (`grpo`: the actor trains only on the groups whose
   samples disagree, `ppo.skip_uniform_groups`, and the reference scores only those rows), and on
   every group (`grpo_all_groups`: the same algorithm as TRL's). Both take the old log-probs from
   the update's own forward (`ppo.recompute_old_logprobs: false`), as TRL does with one iteration.
   TRL's `GRPOTrainer` (run once, set against both) gets the same model, the demo's training prompts, the same exact match reward, prompts x samples per step, lr (constant),
   beta, temperature, completion length,
   clipping 0.2, one optimizer step per generation batch (`num_iterations=1`), group-scaled
   rewards, token-level loss over the batch (`loss_type="bnpo"`, STEMA's denominator) and the
   same number of steps. The prompts each side draws per step follow its own sampler (both shuffle
   the same pool).
3. DPO: STEMA runs the demo's DPO stage (`stema.demo.stage_dpo`: sigmoid DPO plus the chosen
   answers' NLL, cosine lr with warm-up, reference log-probs computed once) on the SFT model's own
   sampled pairs (`Demo.sampled_pairs`, made once before either run); TRL's `DPOTrainer`
   gets the same pairs, beta, lr schedule (cosine to 10% after the same warm-up), batch and steps,
   with `loss_type=["sigmoid", "sft"]`. STEMA's NLL term is summed over each chosen answer's tokens
   and averaged over pairs; TRL's "sft" term is the mean over the batch's chosen tokens, so its
   weight is STEMA's times the mean chosen-answer length in tokens (measured on the pairs), which
   makes the two terms equal on a batch of average length.
4. Each trained model (STEMA's export, TRL's `save_model`) is scored by the demo's own evaluation
   (`Demo.policy_scores`: greedy exact match on the seed's held-out questions).

Wall time: TRL's `train()` (its reference log-probs and generation included; loading the model
and saving it are not) and STEMA's stage without its evaluation (the RL stage runs without its
periodic held-out evaluation, `Demo.rl_stage_evaluation`; set-up, loading, tokenizing, training,
the final checkpoint and the Hugging Face export included, so STEMA's figure holds more work), measured one
after the other in one process, with the process's CPU seconds (all threads) beside them: on a
shared machine the CPU seconds are the steadier figure (run with OMP_NUM_THREADS=1), and record
`uptime`.
Goal (issue 14): STEMA at least as accurate as TRL within the seed-to-seed spread, at at least 2x
TRL's speed.

Not in run_all.py: a full comparison takes minutes per seed.

    python benchmarks/bench_learning.py [--seeds 0 1] [--algorithms grpo grpo_all_groups dpo] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

from common import exact_match_reward, trl_grpo_config

QUICK = dict(sft_steps=20, ppo_steps=2, dpo_steps=3, num_demonstrations=32, num_train=64, num_heldout=16, pair_samples=2)


def demo_state(folder: Path, seed: int, quick: bool):
    """The demo after its base and SFT stages (the SFT model is `demo.sft_path`)."""
    from stema import demo as demo_module
    from stema.config import DemoConfig

    sizes = QUICK if quick else {}
    demo = demo_module.Demo(DemoConfig(out=str(folder / "demo"), seed=seed, progress_bar=False, **sizes))
    for name, stage in (("base", demo_module.stage_base), ("sft", demo_module.stage_sft)):
        demo.results[name] = stage(demo)
    return demo


class Clock:
    """Wall and CPU seconds (this process, all its threads) of the work done inside `running()`,
    less what is done inside `paused()` (a stage's own evaluation of its model)."""

    def __init__(self):
        self.wall = self.cpu = 0.0

    @contextlib.contextmanager
    def running(self, sign: float = 1.0):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall += sign * (time.perf_counter() - wall)
            self.cpu += sign * (time.process_time() - cpu)

    def paused(self):
        return self.running(sign=-1.0)


def stema_stage(demo, stage) -> tuple[float, Clock]:
    """(held-out exact match, clock) of one of the demo's stages run from its SFT model; the clock
    leaves out the stage's own evaluation of the trained model (as TRL's leaves out its scoring)."""
    demo.policy_path = demo.sft_path
    demo.rl_stage_evaluation = False  # no held-out evaluation inside the RL stage: TRL's train() has none
    clock, evaluate = Clock(), demo.policy_scores

    def evaluation(path: Path) -> dict:
        with clock.paused():
            return evaluate(path)

    demo.policy_scores = evaluation
    try:
        with clock.running():
            values = stage(demo)
    finally:
        del demo.policy_scores  # the method again
    return values["accuracy"], clock


def trained(trainer) -> Clock:
    """The clock of TRL's `trainer.train()`."""
    clock = Clock()
    with clock.running():
        trainer.train()
    return clock


def trl_common(output_dir: Path, *, seed: int, steps: int, lr: float) -> dict:
    return dict(output_dir=str(output_dir), max_steps=steps, learning_rate=lr, bf16=False, use_cpu=True, logging_steps=1,
                save_strategy="no", report_to=[], disable_tqdm=True, seed=seed, dataloader_num_workers=0,
                max_grad_norm=1.0)


def scored(demo, trainer, folder: Path) -> float:
    """Held-out exact match of TRL's trained model, saved as a Hugging Face folder."""
    trainer.save_model(str(folder))
    trainer.processing_class.save_pretrained(str(folder))
    return demo.policy_scores(folder)["accuracy"]


def trl_grpo(demo, folder: Path) -> tuple[float, Clock]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOTrainer

    from stema import demo as demo_module
    from stema.data import builtin

    cfg = demo.config
    args = trl_grpo_config(folder / "trl-grpo", prompts=demo_module.PPO_PROMPTS, samples=demo_module.PPO_SAMPLES,
                           new_tokens=demo_module.MAX_NEW_TOKENS, steps=cfg.ppo_steps, lr=demo_module.PPO_LR,
                           beta=demo_module.PPO_KL_COEF, seed=cfg.seed, temperature=demo_module.PPO_TEMPERATURE, epsilon=0.2,
                           scale_rewards="group")
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(demo.sft_path), reward_funcs=exact_match_reward, args=args,
        train_dataset=Dataset.from_list(builtin.prompt_records(cfg.num_train, cfg.seed)),
        processing_class=AutoTokenizer.from_pretrained(demo.sft_path),
    )
    clock = trained(trainer)
    return scored(demo, trainer, folder / "trl-grpo" / "hf"), clock


def mean_chosen_tokens(demo) -> float:
    """Mean length in tokens of the chosen answers of the demo's training pairs (as STEMA tokenizes them)."""
    from stema.config import DataConfig
    from stema.data import load_preference_data
    from stema.data.tokenize import IGNORE_INDEX
    from stema.models.loading import load_tokenizer

    pairs, _ = load_preference_data(DataConfig(train=str(demo.sampled_pairs()["train"]), max_length=64), load_tokenizer(demo.sft_path))
    return statistics.fmean(sum(label != IGNORE_INDEX for label in pair.chosen_labels) for pair in pairs)


def trl_dpo(demo, folder: Path) -> tuple[float, Clock]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from stema import demo as demo_module

    cfg = demo.config
    sft_weight = demo_module.DPO_SFT_LOSS_WEIGHT * mean_chosen_tokens(demo)
    args = DPOConfig(
        **trl_common(folder / "trl-dpo", seed=cfg.seed, steps=cfg.dpo_steps, lr=demo_module.DPO_LR),
        per_device_train_batch_size=cfg.batch_size, beta=demo_module.DPO_BETA, loss_type=["sigmoid", "sft"],
        loss_weights=[1.0, sft_weight], lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
        warmup_steps=10, precompute_ref_log_probs=True, activation_checkpointing=False,
    )
    lines = demo.sampled_pairs()["train"].read_text().splitlines()
    records = [{key: record[key] for key in ("prompt", "chosen", "rejected")} for record in map(json.loads, lines)]
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(demo.sft_path), args=args, train_dataset=Dataset.from_list(records),
        processing_class=AutoTokenizer.from_pretrained(demo.sft_path),
    )
    clock = trained(trainer)
    return scored(demo, trainer, folder / "trl-dpo" / "hf"), clock


ALGORITHMS = ("grpo", "grpo_all_groups", "dpo")


def compare(seed: int, *, quick: bool, algorithms: tuple[str, ...] = ALGORITHMS) -> dict:
    """One seed's figures: the SFT model's accuracy, then per algorithm (of `algorithms`) STEMA's
    and TRL's accuracy and seconds. `grpo` is the demo's RL stage as it runs in `stema demo`
    (training on the groups whose samples disagree); `grpo_all_groups` the same stage training on
    every group, as TRL's GRPOTrainer does (TRL runs once; both STEMA rows are set against it)."""
    from datasets import disable_progress_bars

    from stema import demo as demo_module

    disable_progress_bars()
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        demo = demo_state(folder, seed, quick)
        result = {"seed": seed, "sft_accuracy": demo.results["sft"]["accuracy"]}
        if "dpo" in algorithms:
            demo.sampled_pairs()  # made once, before any clock runs: both DPO runs train on them
        runs = {"grpo": (demo_module.stage_ppo, "ppo", trl_grpo, True),
                "grpo_all_groups": (demo_module.stage_ppo, "ppo", trl_grpo, False),
                "dpo": (demo_module.stage_dpo, "dpo", trl_dpo, True)}
        trl_done: dict = {}
        for algorithm in algorithms:
            stage, stage_folder, trl_run, skip_uniform = runs[algorithm]
            demo.rl_skip_uniform_groups = skip_uniform
            stema_accuracy, stema = stema_stage(demo, stage)
            (demo.out / stage_folder).rename(demo.out / f"{stage_folder}-{algorithm}")  # the next run of the stage starts anew
            if trl_run not in trl_done:
                trl_done[trl_run] = trl_run(demo, folder / algorithm)
            trl_accuracy, trl = trl_done[trl_run]
            result[algorithm] = {"stema_accuracy": stema_accuracy, "trl_accuracy": trl_accuracy,
                                 "stema_seconds": stema.wall, "trl_seconds": trl.wall, "speedup": trl.wall / stema.wall,
                                 "stema_cpu_seconds": stema.cpu, "trl_cpu_seconds": trl.cpu, "cpu_speedup": trl.cpu / stema.cpu}
    return result


def table(results: list[dict]) -> str:
    lines = ["| seed | algorithm | SFT exact match | STEMA exact match | TRL exact match | STEMA wall s (CPU s) | TRL wall s (CPU s) "
             "| speed-up, wall (CPU) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for result in results:
        for algorithm in ALGORITHMS:
            if algorithm not in result:
                continue
            row = result[algorithm]
            lines.append(f"| {result['seed']} | {algorithm} | {result['sft_accuracy']:.1%} | {row['stema_accuracy']:.1%} | "
                         f"{row['trl_accuracy']:.1%} | {row['stema_seconds']:.1f} ({row['stema_cpu_seconds']:.1f}) | "
                         f"{row['trl_seconds']:.1f} ({row['trl_cpu_seconds']:.1f}) | {row['speedup']:.2f} ({row['cpu_speedup']:.2f}) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run; the figures mean nothing)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--algorithms", nargs="+", choices=ALGORITHMS, default=list(ALGORITHMS),
                        help="the comparisons to run (default: all)")
    args = parser.parse_args()
    results = [compare(seed, quick=args.quick, algorithms=tuple(args.algorithms)) for seed in args.seeds]
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
