"""`stema demo`: the built-in tiny model and arithmetic task end to end on a CPU, with no download.

The setting is the classic RLHF one, stated as such: demonstrations are scarce, prompts are plentiful.
`num_demonstrations` (300) training questions come with a written answer; `num_train` (4000) more have
only the task's verifier (`stema.data.builtin.reward`), no written answer. docs/demo.md has the
measurements behind every number here.

A recipe on top of the trainers (it wires them; no library code imports it):
1. `base`: write the tiny Llama (random weights) and measure held-out exact-match accuracy.
2. `sft`: supervised fine-tuning on the demonstrations, to where its held-out loss stops falling;
   accuracy again.
3. `rm`: a Bradley-Terry reward model from the SFT model on the SFT model's own pairs (see
   `write_sampled_pairs`: answers it sampled for the `num_train` prompts, a right one chosen and a
   wrong one rejected by the verifier), read out as the log-ratio to the SFT model (see RM_*
   below); pairwise accuracy on pairs sampled the same way for the held-out prompts.
4. `dpo`: DPO (with the chosen answers' NLL added, see DPO_SFT_LOSS_WEIGHT) from the SFT model,
   which is also its reference, on the same sampled pairs: one round of online/iterative DPO.
   Exact-match and preference accuracy again.
5. `ppo`: GRPO from the SFT model (not the DPO one) on the `num_train` prompts, every role local:
   the actor generates with the rollout engine refitted in place (temperature 1.3), rewards come
   from the task's verifier, the actor trains on the groups whose samples disagree (see PPO_*
   below); held-out exact-match accuracy is evaluated greedily along the way; KL to the reference
   (the SFT model) is reported. Curves: `ppo_reward.png`, `ppo_kl.png`,
   `ppo_accuracy.png`.

Stages outside the default (run by `--stages all` or by name), each from the SFT model:
- `steerlm`: SteerLM on the built-in attribute task (see `stage_steerlm`); `spearman` is the rank
  correlation of requested and measured verbosity over 200 held-out prompts x 5 levels.
- `spin`: SPIN iterations (see `stage_spin`): held-out exact match and ground-truth
  log-likelihood at the start (iteration 0) and after each iteration.
- `rs`: rejection sampling (see `stage_rs`): greedy held-out exact match before and after.

Preference accuracy (base, sft, dpo) is the fraction of held-out preference pairs for which the
policy's summed log-prob of the chosen completion (the right answer) exceeds that of the rejected
one (a plausible mistake): `stema.evaluation.preference_accuracy`.

Writes into `out`: `results.json` (numbers keyed by stage; held-out exact-match accuracy under
`accuracy`, preference accuracy under `preference_accuracy`), `results.md` (the table it prints),
`<stage>_loss.png` curves, and each stage's run folder with its exported Hugging Face model under
`<stage>/hf`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable

from stema.config import (
    DataConfig,
    DemoConfig,
    DPOConfig,
    ModelConfig,
    OptimConfig,
    PreferenceConfig,
    RewardConfig,
    RMConfig,
    SFTConfig,
    TrainerConfig,
)
from stema.data import builtin, load_preference_data
from stema.evaluation import mean_reward, preference_accuracy
from stema.models.tiny import TinyModelSpec, save_tiny_model
from stema.training.folder import RunFolderError, is_empty_folder, move_aside
from stema.training.logging import read_metrics

MAX_NEW_TOKENS = 6  # answers are at most 3 digits, then <|end|>
# RM stage: the log-ratio readout (beta * log pi/pi_ref of a causal LM trained from the SFT model,
# `stema.trainers.reward`) with the chosen answers' NLL as a regularizer. On the SFT model's own
# sampled pairs a scalar head on the last token stays at 52-77% held-out pairwise accuracy whatever
# was tried (it does not check the sum); the log-ratio readout reads every answer digit through the
# LM head: 93-95% at 400 steps (87% / 75% without the NLL term). Measurements: docs/demo.md.
RM_BETA = 1.0
RM_NLL_WEIGHT = 1.0
# DPO stage: DPO + the chosen answers' NLL (NeMo-Aligner's sft_loss_weight; Pang et al. 2024,
# https://arxiv.org/abs/2404.19733, found the NLL term necessary on arithmetic reasoning). Plain DPO
# (sft_loss_weight 0) on this tiny model lowers the chosen answers' likelihood with the rejected
# ones' and leaves held-out exact match where SFT left it.
DPO_BETA = 1.0
DPO_LR = 1e-3
DPO_SFT_LOSS_WEIGHT = 1.0
# PPO stage (see stage_ppo): GRPO, group-normalized advantages over 8 samples per prompt, rewarded by
# the task's exact-match verifier. Most groups of the SFT model are all right (zero advantage): the
# actor trains only on the groups whose samples disagree (ppo.skip_uniform_groups, DAPO's dynamic
# sampling), so a step costs less and its signal is not diluted; sampling at temperature 1.3 makes
# more groups disagree. At lr 1e-3 (and 5e-4 with skipping) the policy drifts away (accuracy falls
# within 24 steps). Measurements: docs/demo.md.
PPO_LR = 2e-4
PPO_SAMPLES = 8
PPO_PROMPTS = 64
PPO_TEMPERATURE = 1.3
PPO_KL_COEF = 0.01
PPO_MICRO_BATCH = 128  # rows per forward: 32 / 64 / 128 / 256 / 512 measured 1.29 / 0.99 / 0.81-0.97 / 0.92 / 1.05 s a step
PPO_REWARD = "builtin"
DEFAULT_STAGES = ("sft", "rm", "dpo", "ppo")


def _say(message: str) -> None:
    print(f"[stema demo] {message}", file=sys.stderr, flush=True)


class Demo:
    """State shared by the stages: the folders, the held-out prompts, the results so far."""

    def __init__(self, config: DemoConfig):
        self.config = config
        self.out = Path(config.out)
        if config.overwrite:
            moved = move_aside(self.out)
            if moved is not None:
                _say(f"overwrite: moved the previous content of {self.out} to {moved}")
        elif self.out.exists() and not is_empty_folder(self.out):
            raise RunFolderError(
                f"out: {self.out} already holds a demo run; choose another folder (--out) or pass overwrite=true to move it aside"
            )
        self.out.mkdir(parents=True, exist_ok=True)
        self.heldout = builtin.heldout_prompts(config.num_heldout, config.seed)
        self.results: dict[str, dict] = {}
        self.policy_path: Path | None = None  # the newest policy (base, then sft, ...)
        self.sft_path: Path | None = None
        self.pairs: dict[str, Path] | None = None
        # The RL stage's own held-out evaluation (at step 0, every ppo_steps / 5 and at the end:
        # the accuracy curve); benchmarks/bench_learning.py turns it off to time the training alone.
        self.rl_stage_evaluation = True
        # The RL stage trains on the groups whose samples disagree (ppo.skip_uniform_groups);
        # benchmarks/bench_learning.py also runs it on every group, as TRL's GRPOTrainer does.
        self.rl_skip_uniform_groups = True

    def trainer_config(self, stage: str, *, steps: int) -> TrainerConfig:
        return TrainerConfig(
            output_dir=str(self.out / stage),
            max_steps=steps,
            global_batch_size=self.config.batch_size,
            micro_batch_size=self.config.batch_size,
            eval_every=max(1, steps // 5),
            seed=self.config.seed,
            progress_bar=self.config.progress_bar,
        )

    def data_config(self, size: int | None = None, *, heldout: bool = True) -> DataConfig:
        """The built-in task with `size` training questions (default `num_train`) and, with
        `heldout`, the held-out set as its evaluation data."""
        return DataConfig(
            train="builtin", eval="builtin" if heldout else None, builtin_size=self.config.num_train if size is None else size,
            builtin_eval_size=self.config.num_heldout, max_length=64,
        )

    def sampled_pairs(self) -> dict[str, Path]:
        """The SFT model's own preference pairs, made once and shared by the reward model and DPO:
        `train` from `num_train` training prompts (drawn with the seed), `eval` from the held-out
        prompts (see `write_sampled_pairs`)."""
        if self.pairs is None:
            folder = self.out / "pairs"
            prompts = {"train": [r["prompt"] for r in builtin.prompt_records(self.config.num_train, self.config.seed)], "eval": self.heldout}
            self.pairs = {
                split: write_sampled_pairs(self.sft_path, chosen_prompts, path=folder / f"{split}.jsonl", samples=self.config.pair_samples, seed=self.config.seed)
                for split, chosen_prompts in prompts.items()
            }
        return self.pairs

    def policy_scores(self, model_path: Path) -> dict[str, float]:
        """The model at `model_path` (loaded once) on the held-out data: greedy exact-match
        `accuracy`, and `preference_accuracy`, the held-out preference pairs (the DPO stage's
        evaluation pairs) on which it gives the chosen completion the higher summed log-prob."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(model_path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        pairs, _ = load_preference_data(self.data_config(), tokenizer, "eval")
        return {
            "accuracy": mean_reward(model, tokenizer, self.heldout, builtin.reward, max_new_tokens=MAX_NEW_TOKENS),
            "preference_accuracy": preference_accuracy(model, pairs, pad_id=tokenizer.pad_token_id),
        }


def write_sampled_pairs(model_path: Path, prompts: list, *, path: Path, samples: int, seed: int) -> Path:
    """Preference pairs from the model's own samples, labelled by the task's verifier: `samples`
    answers sampled (temperature 1) for each prompt; a prompt with at least one right and one wrong
    answer among those that ended (EOS) and are not empty gives the pair (first right, first wrong);
    the others give none. Written to `path` as JSONL preference records (chosen_reward 1,
    rejected_reward 0); returns `path`. No written answer is used: the online/iterative DPO setting
    (Xiong et al. 2024, https://arxiv.org/abs/2312.11456; Pang et al. 2024,
    https://arxiv.org/abs/2404.19733)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stema.config import SamplingConfig
    from stema.data import encode_prompt
    from stema.data.io import write_jsonl_atomic
    from stema.rollout.factory import generate_once

    model = AutoModelForCausalLM.from_pretrained(model_path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    encoded = [encode_prompt(prompt, tokenizer) for prompt in prompts for _ in range(samples)]
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=MAX_NEW_TOKENS, seed=seed, batch_size=256)
    sequences = generate_once(model, tokenizer, encoded, sampling).sequences  # samples per prompt, in prompt order
    rows = []
    for index, prompt in enumerate(prompts):
        finished = [s.text for s in sequences[index * samples : (index + 1) * samples] if s.finish_reason == "eos" and s.text.strip()]
        right = [text for text in finished if builtin.reward(prompt, text) == 1.0]
        wrong = [text for text in finished if builtin.reward(prompt, text) == 0.0]
        if right and wrong:
            rows.append({
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": right[0]}],
                "rejected": [{"role": "assistant", "content": wrong[0]}],
                "chosen_reward": 1.0,
                "rejected_reward": 0.0,
            })
    return write_jsonl_atomic(path, rows)


def stage_base(demo: Demo) -> dict:
    path = save_tiny_model(demo.out / "base", TinyModelSpec(seed=demo.config.seed))
    demo.policy_path = path
    return demo.policy_scores(path)


def stage_sft(demo: Demo) -> dict:
    from stema.trainers import sft

    config = SFTConfig(
        model=ModelConfig(path=str(demo.policy_path)),
        data=demo.data_config(demo.config.num_demonstrations),
        optim=OptimConfig(lr=3e-3, warmup_steps=30, schedule="cosine", min_lr_ratio=0.1),
        trainer=demo.trainer_config("sft", steps=demo.config.sft_steps),
    )
    result = sft.run(config)
    demo.policy_path = demo.sft_path = Path(config.trainer.output_dir) / "hf"
    return {
        **demo.policy_scores(demo.policy_path),
        "eval_loss": result.eval_metrics["loss"],
    }


def stage_rm(demo: Demo) -> dict:
    from stema.trainers import reward

    pairs = demo.sampled_pairs()
    config = RMConfig(
        model=ModelConfig(path=str(demo.policy_path)),
        data=DataConfig(train=str(pairs["train"]), eval=str(pairs["eval"]), max_length=64),
        optim=OptimConfig(lr=1e-3, warmup_steps=20, schedule="cosine", min_lr_ratio=0.1),
        trainer=demo.trainer_config("rm", steps=demo.config.rm_steps),
        reward=RewardConfig(readout="log_ratio", beta=RM_BETA, nll_weight=RM_NLL_WEIGHT),
    )
    result = reward.run(config)
    return {"pairwise_accuracy": result.eval_metrics["accuracy"], "margin": result.eval_metrics["margin"]}


def stage_dpo(demo: Demo) -> dict:
    from stema.trainers import dpo

    pairs = demo.sampled_pairs()
    config = DPOConfig(
        model=ModelConfig(path=str(demo.policy_path)),
        data=DataConfig(train=str(pairs["train"]), eval=str(pairs["eval"]), max_length=64),
        optim=OptimConfig(lr=DPO_LR, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1),
        trainer=demo.trainer_config("dpo", steps=demo.config.dpo_steps),
        # The reference runs once over the pairs instead of at every step (fewer forward passes
        # when the stage sees each pair more than once).
        preference=PreferenceConfig(loss="dpo", beta=DPO_BETA, sft_loss_weight=DPO_SFT_LOSS_WEIGHT, precompute_ref_logprobs=True),
    )
    result = dpo.run(config)
    demo.policy_path = Path(config.trainer.output_dir) / "hf"
    return {
        **demo.policy_scores(demo.policy_path),
        "reward_accuracy": result.eval_metrics["rewards/accuracy"],
        "eval_loss": result.eval_metrics["loss"],
    }


def stage_ppo(demo: Demo) -> dict:
    from stema.config import PPOAlgorithmConfig, PPOConfig, RewardSourceConfig, RolloutConfig
    from stema.trainers import ppo

    start = demo.sft_path or demo.policy_path
    config = PPOConfig(
        model=ModelConfig(path=str(start)),
        reward=RewardSourceConfig(function=PPO_REWARD, eval_function="builtin"),
        data=demo.data_config(heldout=demo.rl_stage_evaluation),
        optim=OptimConfig(lr=PPO_LR, schedule="constant"),
        trainer=TrainerConfig(
            output_dir=str(demo.out / "ppo"), max_steps=demo.config.ppo_steps, global_batch_size=PPO_PROMPTS,
            micro_batch_size=PPO_MICRO_BATCH, eval_every=max(1, demo.config.ppo_steps // 5), seed=demo.config.seed,
            progress_bar=demo.config.progress_bar,
        ),
        rollout=RolloutConfig(samples_per_prompt=PPO_SAMPLES, max_new_tokens=MAX_NEW_TOKENS, temperature=PPO_TEMPERATURE,
                              max_batch=PPO_PROMPTS * PPO_SAMPLES),
        ppo=PPOAlgorithmConfig(advantage="grpo", kl_in="loss", kl_estimator="k3", kl_coef=PPO_KL_COEF, whiten_advantages=False,
                               skip_uniform_groups=demo.rl_skip_uniform_groups, recompute_old_logprobs=False),
    )
    result = ppo.run(config)
    demo.policy_path = Path(config.trainer.output_dir) / "hf"
    return {
        **demo.policy_scores(demo.policy_path),
        "kl": result.train_metrics["kl"],
        "train_reward": result.train_metrics["reward"],
        "start": str(start),
    }


STAGES: dict[str, Callable[[Demo], dict]] = {"sft": stage_sft, "rm": stage_rm, "dpo": stage_dpo, "ppo": stage_ppo}


STEERLM_LR = 3e-3


def stage_steerlm(demo: Demo) -> dict:
    """SteerLM on the built-in attribute task (`stema.data.builtin_attributes`): an attribute model
    (correctness, verbosity) from labelled answers, `annotate` on an unlabelled pool, SFT conditioned
    on the predicted verbosity, then greedy answers to held-out prompts at each requested verbosity.
    The tiny attribute model cannot judge correctness (it would need the arithmetic it has not
    learned), so its correctness predictions sit near the mean; the SFT conditions on verbosity."""
    from stema.config import AnnotateConfig, AnnotateOptions, SamplingConfig, SteerLMConfig
    from stema.data import builtin_attributes
    from stema.data import encode_prompt
    from stema.data.steerlm import condition_prompt, format_attributes
    from stema.evaluation import spearman
    from stema.rollout.factory import generate_once
    from stema.trainers import reward, steerlm

    data = demo.out / "steerlm_data"
    files = builtin_attributes.write_files(data, size=demo.config.num_train // 2, seed=demo.config.seed)
    labelled, pool = files["labelled"], files["pool"]
    attributes = list(builtin_attributes.ATTRIBUTES)
    start = demo.sft_path or demo.policy_path
    attribute_model = RMConfig(
        model=ModelConfig(path=str(start)),
        data=DataConfig(train=str(labelled), attributes=attributes, max_length=96),
        optim=OptimConfig(lr=2e-3, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1),
        trainer=demo.trainer_config("steerlm_attribute_model", steps=demo.config.steerlm_attribute_steps),
        reward=RewardConfig(num_attributes=len(attributes), loss="regression"),
    )
    attribute_mse = reward.run(attribute_model).train_metrics["mse"]
    annotated = steerlm.annotate(AnnotateConfig(
        model=ModelConfig(path=str(Path(attribute_model.trainer.output_dir) / "hf")),
        data=DataConfig(train=str(pool), attributes=attributes, max_length=96),
        annotate=AnnotateOptions(output=str(data / "annotated.jsonl")),
    ))
    config = SteerLMConfig(
        model=ModelConfig(path=str(start)),
        data=DataConfig(train=str(annotated), attributes=["verbosity"], max_length=128),
        optim=OptimConfig(lr=STEERLM_LR, warmup_steps=20, schedule="cosine", min_lr_ratio=0.1),
        trainer=demo.trainer_config("steerlm", steps=demo.config.steerlm_steps),
    )
    steerlm.run(config)

    from stema.models.loading import load_policy

    model, tokenizer = load_policy(ModelConfig(path=str(Path(config.trainer.output_dir) / "hf")), cache_dir=demo.out / "cache")
    prompts = demo.heldout[:200]
    requested = [level for _ in prompts for level in range(builtin_attributes.VERBOSITY_LEVELS)]
    conditioned = [condition_prompt(prompt, format_attributes({"verbosity": level})) for prompt in prompts for level in range(builtin_attributes.VERBOSITY_LEVELS)]
    batch = generate_once(model, tokenizer, [encode_prompt(prompt, tokenizer) for prompt in conditioned], SamplingConfig(max_new_tokens=64, batch_size=128), greedy=True)
    texts = [sequence.text for sequence in batch.sequences]
    measured = [builtin_attributes.measure_verbosity(text) for text in texts]
    words_by_level = [
        round(sum(m for m, r in zip(measured, requested) if r == level) / len(prompts), 2) for level in range(builtin_attributes.VERBOSITY_LEVELS)
    ]
    correct = sum(builtin_attributes.is_correct(prompt, text) for prompt, text in zip(conditioned, texts))
    correlation = spearman(requested, measured)
    _say(f"steerlm: Spearman correlation of requested and measured verbosity (words) on held-out prompts: {correlation:.3f}")
    return {
        "spearman": correlation,
        "words_by_requested_verbosity": words_by_level,
        "steered_accuracy": correct / len(texts),
        "attribute_model_mse": attribute_mse,
    }


STAGES["steerlm"] = stage_steerlm


def resolve_stages(text: str) -> list[str]:
    if text in ("default", ""):
        return list(DEFAULT_STAGES)
    if text == "all":
        return list(STAGES)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in STAGES]
    if unknown:
        raise ValueError(f"unknown demo stage(s) {unknown}; stages: {', '.join(STAGES)} (or 'default', 'all')")
    return [name for name in STAGES if name in names]  # always in pipeline order


def plot_curves(out: Path, stage: str) -> list[Path]:
    """The stage's curves from its metrics.jsonl: `<stage>_loss.png` (training loss per step and
    evaluation loss); for ppo `ppo_reward.png`, `ppo_kl.png` and `ppo_accuracy.png` instead."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if stage == "ppo":
        return plot_ppo_curves(out, plt)
    train = read_metrics(out / stage, "train")
    evaluation = read_metrics(out / stage, "eval")
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", linewidth=1)
    if evaluation and "loss" in evaluation[0]:
        axis.plot([r["step"] for r in evaluation], [r["loss"] for r in evaluation], "o-", label="eval loss")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_title(f"stema demo: {stage}")
    axis.legend()
    figure.tight_layout()
    path = out / f"{stage}_loss.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return [path]


def plot_ppo_curves(out: Path, plt) -> list[Path]:
    train = read_metrics(out / "ppo", "train")
    evaluation = read_metrics(out / "ppo", "eval")
    curves = [
        ("reward", "mean training reward (sampled)", [r["step"] for r in train], [r["reward"] for r in train]),
        ("kl", "KL to the reference (nats per response)", [r["step"] for r in train], [r["kl"] for r in train]),
        ("accuracy", "held-out exact match (greedy)", [r["step"] for r in evaluation], [r["reward"] for r in evaluation]),
    ]
    paths = []
    for name, label, steps, values in curves:
        figure, axis = plt.subplots(figsize=(6, 3.5))
        axis.plot(steps, values, "o-" if name == "accuracy" else "-", linewidth=1)
        axis.set_xlabel("PPO step")
        axis.set_ylabel(label)
        axis.set_title(f"stema demo: ppo {name}")
        figure.tight_layout()
        path = out / f"ppo_{name}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        paths.append(path)
    return paths


def format_table(results: dict[str, dict]) -> str:
    lines = [
        "| stage | held-out exact match | preference accuracy | RM pairwise accuracy | KL to reference | seconds |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for stage, values in results.items():
        accuracy = f"{values['accuracy']:.1%}" if "accuracy" in values else ""
        preference = f"{values['preference_accuracy']:.1%}" if "preference_accuracy" in values else ""
        pairwise = f"{values['pairwise_accuracy']:.1%}" if "pairwise_accuracy" in values else ""
        kl = f"{values['kl']:.3f}" if "kl" in values else ""
        lines.append(f"| {stage} | {accuracy} | {preference} | {pairwise} | {kl} | {values.get('seconds', 0):.0f} |")
    return "\n".join(lines)


def run(config: DemoConfig) -> dict[str, dict]:
    stages = resolve_stages(config.stages)
    demo = Demo(config)
    _say(f"stages: base, {', '.join(stages)}; output in {demo.out}")
    for name, stage in [("base", stage_base)] + [(name, STAGES[name]) for name in stages]:
        started = time.perf_counter()
        _say(f"stage {name} ...")
        values = stage(demo)
        values["seconds"] = round(time.perf_counter() - started, 1)
        demo.results[name] = values
        if name != "base":
            plot_curves(demo.out, name)
        (demo.out / "results.json").write_text(json.dumps(demo.results, indent=2) + "\n")
        _say(f"stage {name}: {values}")
    table = format_table(demo.results)
    (demo.out / "results.md").write_text(table + "\n")
    print(table)
    return demo.results


RS_LR = 1e-3


def stage_rs(demo: Demo) -> dict:
    """Rejection sampling from the SFT model: best of `rs_samples` sampled answers per training
    question by the exact-match reward, only right answers kept (min_reward 1), then SFT on them;
    greedy held-out exact match (the reward of greedy outputs) before and after."""
    from stema.config import RejectionSamplingOptions, RewardSourceConfig, RSConfig, SamplingConfig
    from stema.trainers import rejection

    config = RSConfig(
        model=ModelConfig(path=str(demo.sft_path or demo.policy_path)),
        data=DataConfig(train="builtin", eval="builtin", builtin_size=demo.config.num_train // 2, builtin_eval_size=demo.config.num_heldout),
        optim=OptimConfig(lr=RS_LR, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1),
        trainer=demo.trainer_config("rs", steps=demo.config.rs_steps),
        sampling=SamplingConfig(temperature=1.0, max_new_tokens=MAX_NEW_TOKENS, seed=demo.config.seed, batch_size=256),
        reward=RewardSourceConfig(function="builtin"),
        rs=RejectionSamplingOptions(num_samples=demo.config.rs_samples, min_reward=1.0),
    )
    summary = rejection.run(config)
    demo.policy_path = Path(config.trainer.output_dir) / "hf"
    return {
        "accuracy": summary.greedy_reward_after,
        "greedy_reward_before": summary.greedy_reward_before,
        "greedy_reward_after": summary.greedy_reward_after,
        "winners": summary.winners,
        "prompts": summary.prompts,
        "mean_sample_reward": summary.mean_sample_reward,
    }



def stage_spin(demo: Demo) -> dict:
    """SPIN from the SFT model: `spin_iterations` rounds of (sample an answer to every training
    question, DPO with the right answer chosen and the sample rejected against the previous
    iteration, plus the right answers' NLL as in the DPO stage); held-out ground-truth
    log-likelihood and greedy exact match after each round."""
    from stema.config import SamplingConfig, SPINConfig, SPINOptions
    from stema.trainers import spin

    config = SPINConfig(
        model=ModelConfig(path=str(demo.sft_path or demo.policy_path)),
        data=DataConfig(
            train="builtin", eval="builtin", builtin_size=demo.config.num_train // 4,
            builtin_eval_size=demo.config.num_heldout, max_length=64,
        ),
        optim=OptimConfig(lr=DPO_LR, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1),
        trainer=demo.trainer_config("spin", steps=demo.config.spin_steps),
        preference=PreferenceConfig(loss="dpo", beta=DPO_BETA, sft_loss_weight=DPO_SFT_LOSS_WEIGHT),
        sampling=SamplingConfig(temperature=1.0, max_new_tokens=MAX_NEW_TOKENS, seed=demo.config.seed, batch_size=256),
        spin=SPINOptions(iterations=demo.config.spin_iterations),
    )
    history = spin.run(config)["iterations"]
    demo.policy_path = Path(config.trainer.output_dir) / "hf"
    return {
        "accuracy": history[-1]["exact_match"],
        "exact_match_by_iteration": [round(entry["exact_match"], 4) for entry in history],
        "gt_logprob_by_iteration": [round(entry["gt_logprob"], 4) for entry in history],
    }


STAGES["spin"] = stage_spin
STAGES["rs"] = stage_rs
