"""DPO training throughput: STEMA's DPO loop against TRL's `DPOTrainer.train()` on the CPU.

Both train the same randomly initialized Llama (vocabulary 32000, a small body: hidden 256, 2
layers; quick: vocabulary 1000, hidden 32, 1 layer) in fp32 with the sigmoid DPO loss (beta 0.1), a
separate frozen reference model, AdamW at a constant learning rate, gradient clipping at 1.0, no
activation checkpointing, on the same pre-tokenized random pairs: 8 pairs per step, each a
128-token prompt with a 128-token chosen and a 96-token rejected completion (quick: 2 pairs,
16 / 8 / 6 tokens). Every pair has the same lengths, so every batch has the same padding whatever
each side's shuffling picks.

Timing: the seconds of each optimizer step after the first (the first warms up allocators and
thread pools), excluding set-up and the final checkpoint: STEMA's per-step times from its
metrics (sampling, collation, forward, backward, optimizer step), TRL's as the time between
consecutive `on_step_end` callbacks (the same work plus TRL's per-step bookkeeping).
tokens/s = non-padding tokens of one step (chosen + rejected rows) / the median step time (the
median, because other processes on a shared CPU stall single steps); ratio = STEMA / TRL, goal 1.3. TRL's trainer sees the data already tokenized: its dataset
preparation is skipped (it is not timed either way).

Where the difference comes from: both run the policy over the concatenated [chosen; rejected]
batch and the reference under no_grad, and neither builds [N, V] logits for the whole batch; TRL
1.16 on a CPU projects every position through the LM head in chunks (and recomputes the chunks'
logits in the backward pass), and computes entropy, mean logits and top-1 per token for its
metrics; STEMA projects only the completion positions, whose log-probs the loss needs, and keeps
their [M, V] logits for the fused kernel's one-pass backward.

    python benchmarks/bench_dpo.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
from pathlib import Path

import torch
from common import trl_step_timer

BENCHMARK = "dpo"
GOAL = 1.3
BETA = 0.1
LR = 1e-6
FULL = dict(vocab=32000, hidden=256, layers=2, heads=4, intermediate=688, pairs=8, prompt=128, chosen=128, rejected=96, steps=8)
QUICK = dict(vocab=1000, hidden=32, layers=1, heads=2, intermediate=64, pairs=2, prompt=16, chosen=8, rejected=6, steps=3)
BASELINE_NAME = "TRL 1.16 DPOTrainer.train() (sigmoid loss, separate reference model)"


def build_model(size: dict, *, seed: int = 0):
    """A randomly initialized LlamaForCausalLM of `size` (fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=size["vocab"],
        hidden_size=size["hidden"],
        intermediate_size=size["intermediate"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        num_key_value_heads=size["heads"],
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


def random_pairs(size: dict, *, count: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """`count` pre-tokenized pairs of fixed lengths: prompt_ids, chosen_ids, rejected_ids (completions)."""
    generator = torch.Generator().manual_seed(seed)

    def tokens(length: int) -> list[int]:
        return torch.randint(3, size["vocab"], (length,), generator=generator).tolist()

    return [{"prompt_ids": tokens(size["prompt"]), "chosen_ids": tokens(size["chosen"]), "rejected_ids": tokens(size["rejected"])} for _ in range(count)]


def tokens_per_step(size: dict) -> int:
    return size["pairs"] * (2 * size["prompt"] + size["chosen"] + size["rejected"])


def stema_step_seconds(model, pairs: list[dict], size: dict, output_dir: Path) -> list[float]:
    """Seconds of each optimizer step of STEMA's DPO loop (`stema.training.train` + DPOAlgorithm)."""
    from stema.config import OptimConfig, PreferenceConfig, TrainerConfig
    from stema.data import TokenizedPair
    from stema.trainers.dpo import DPOAlgorithm
    from stema.training import train
    from stema.training.logging import read_metrics
    from stema.training.logprobs import ReferenceModel

    examples = []
    for pair in pairs:
        prompt, hidden = pair["prompt_ids"], [-100] * len(pair["prompt_ids"])
        examples.append(
            TokenizedPair(
                prompt_ids=prompt,
                chosen_ids=prompt + pair["chosen_ids"],
                rejected_ids=prompt + pair["rejected_ids"],
                chosen_labels=hidden + pair["chosen_ids"],
                rejected_labels=hidden + pair["rejected_ids"],
            )
        )
    algorithm = DPOAlgorithm(
        pad_id=0, preference=PreferenceConfig(loss="dpo", beta=BETA), reference=ReferenceModel.of(model), micro_batch_size=size["pairs"]
    )
    trainer_cfg = TrainerConfig(
        output_dir=str(output_dir), max_steps=size["steps"], global_batch_size=size["pairs"], micro_batch_size=size["pairs"],
        progress_bar=False, tensorboard=False, export_hf=False, keep_checkpoints=1,
    )
    optim_cfg = OptimConfig(lr=LR, schedule="constant", max_grad_norm=1.0)
    train(model=model, algorithm=algorithm, train_examples=examples, eval_examples=None, trainer_cfg=trainer_cfg, optim_cfg=optim_cfg)
    return [record["tokens"] / record["tokens_per_s"] for record in read_metrics(output_dir, "train")]


def trl_step_seconds(model, pairs: list[dict], size: dict, output_dir: Path) -> list[float]:
    """Seconds between consecutive optimizer-step ends of TRL's `DPOTrainer.train()`."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from stema.models.tiny import build_tokenizer

    class PretokenizedDPOTrainer(DPOTrainer):
        """DPOTrainer on data that is already prompt_ids / chosen_ids / rejected_ids."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    timer = trl_step_timer()

    args = DPOConfig(
        output_dir=str(output_dir), per_device_train_batch_size=size["pairs"], max_steps=size["steps"], learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, beta=BETA, loss_type=["sigmoid"], max_length=None,
        bf16=False, use_cpu=True, activation_checkpointing=False, logging_steps=1, save_strategy="no", report_to=[],
        disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )
    tokenizer = build_tokenizer()  # only its pad token (id 0) is used: the data is already token ids
    trainer = PretokenizedDPOTrainer(
        model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=Dataset.from_list(pairs),
        processing_class=tokenizer, callbacks=[timer],
    )
    trainer.train()
    return timer.step_seconds()


def measure(*, device: str = "cpu", quick: bool = False) -> list[dict]:
    """One row: DPO training tokens/s of STEMA and TRL on the CPU (no rows for other devices: the
    comparison and its goal are defined on the CPU)."""
    if device != "cpu":
        return []
    from datasets import disable_progress_bars

    disable_progress_bars()
    size = QUICK if quick else FULL
    pairs = random_pairs(size, count=size["pairs"] * size["steps"])
    start_model = build_model(size)
    with tempfile.TemporaryDirectory() as folder:
        stema_seconds = stema_step_seconds(copy.deepcopy(start_model), pairs, size, Path(folder) / "stema")
        trl_seconds = trl_step_seconds(copy.deepcopy(start_model), pairs, size, Path(folder) / "trl")
    measured = size["steps"] - 1  # the first step of each is a warm-up
    stema_rate = tokens_per_step(size) / statistics.median(stema_seconds[1:])
    trl_rate = tokens_per_step(size) / statistics.median(trl_seconds[1:])
    ratio = stema_rate / trl_rate
    case = (
        f"Llama V={size['vocab']} H={size['hidden']} L={size['layers']} fp32; {size['pairs']} pairs/step, prompt {size['prompt']}, "
        f"chosen {size['chosen']}, rejected {size['rejected']} tokens; median of {measured} steps"
    )
    return [
        {
            "benchmark": BENCHMARK,
            "case": case,
            "metric": "train tokens/s",
            "stema": stema_rate,
            "baseline": trl_rate,
            "ratio": ratio,
            "higher_is_better": True,
            "goal": GOAL,
            "met": ratio >= GOAL,
            "baseline_name": BASELINE_NAME,
            "device": f"cpu ({torch.get_num_threads()} torch threads)",
        }
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    for row in measure(device="cpu", quick=args.quick):
        print(
            f"{row['benchmark']} | {row['case']} | STEMA {row['stema']:.0f} tok/s | TRL {row['baseline']:.0f} tok/s | "
            f"x{row['ratio']:.2f} (goal {row['goal']}, met={row['met']}) | {row['device']}"
        )


if __name__ == "__main__":
    main()
