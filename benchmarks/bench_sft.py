"""SFT training throughput: STEMA's shared loop (`stema.training.train` + `SFTAlgorithm`) against
TRL's `SFTTrainer.train()`, same model, data, batches and number of optimizer steps, fp32, one process.

Model: a randomly initialized Llama (transformers `LlamaConfig`, no download) with a real LM's
vocabulary (32000, untied input and output embeddings) and a small body: hidden 256, 4 layers, 4
attention heads, MLP 688 (19.5M parameters, 16.4M of them in the two embeddings). Quick: vocab
512, hidden 32, 1 layer.
Data: pre-tokenized random token sequences, no tokenizer: each example is a 64-token prompt and a
192-token completion with the loss on the completion only (quick: 8 + 24), batch 2, no
padding, so every step trains the same number of tokens whichever examples the two samplers draw.
Both sides start from the same weights (same config, same seed). Each side checks, before training,
that its first batch trains exactly the completion tokens.

Timing: each side runs 1 warm-up step, N timed steps (N = 8; quick: 2) and one more step whose start
closes the clock. A clock mark is taken at the start of every optimizer step (STEMA: when the loop
asks the algorithm for the step's denominators, right after sampling; TRL: the `on_step_begin`
callback, right after the batches are fetched), so each of the N intervals from the start of step 2
to the start of step N + 2 is one whole step: data collation, forward, backward, clipping, AdamW, the
lr schedule and each side's per-step logging. tokens/s = trained (completion) tokens per step / the
median of the N step times; the same definition for both. The median, and the best of 3 runs of each
side (fresh interpreters, this file with `--worker`, in alternating order), because on a shared
machine another process taking a core for a moment only ever slows a step down. ratio = STEMA
tokens/s / TRL tokens/s; goal 1.3. Quick: one run of each side, in this process.

Peak memory (full size, CPU): in the worker, the resident-set high-water mark is reset just before
training (writing 5 to /proc/self/clear_refs) and read at the closing clock mark, minus the RSS
before training: the peak memory the process holds while training, as the OS sees it, with the
default allocator (glibc keeps some freed memory, as it does for users; the workers do not fix its
mmap threshold as bench_logprobs.py does, since that would also change the timings). The larger
figure of a side's runs counts. On CUDA: torch.cuda.max_memory_allocated() growth. Ratio TRL /
STEMA, no goal.

Settings. STEMA: `TrainerConfig(precision="fp32", global_batch_size = micro_batch_size = 2,
progress_bar=False, tensorboard=False, export_hf=False)`, its JSONL metrics logged every step as by
default; `OptimConfig(lr=2e-5, betas=(0.9, 0.999), weight_decay=0, schedule="linear")` (TRL's values)
with its default clipping at 1.0 (as TRL). TRL: `SFTConfig(per_device_train_batch_size=2,
max_steps=N + 2, bf16=False, use_cpu=True, activation_checkpointing=False, completion_only_loss=True,
report_to=[], disable_tqdm=True)` and the rest at its defaults: fused AdamW (transformers' default
optimizer since torch 2.8), lr 2e-5 with a linear schedule, clipping at 1.0, logging every 10 steps,
and its fused LM-head loss, which always also computes per-token entropy and top-1 accuracy for its
metrics (no setting turns them off). TRL's default gradient checkpointing (on) is turned off because
STEMA's is off by default: neither recomputes activations. fp32 because this is an fp32 comparison
(TRL defaults to bf16). `completion_only_loss=True` because TRL's default decides from a "prompt"
column, which pre-tokenized data lacks. TRL is given STEMA's tiny character tokenizer only for its
pad and EOS ids; the data is pre-tokenized (`input_ids`, `completion_mask`). Both save a checkpoint
when training ends (STEMA's loop always does; TRL's at max_steps), after the closing mark.

Where the time goes (torch.profiler over the timed steps, 1 thread, TRL 1.16, torch 2.13): STEMA
about 0.62 s/step, TRL about 1.26 s/step. TRL's LM-head loss takes 1.06 s of its step: on a device
without Triton it runs as PyTorch tiles over all [512, 32000] logits, with several full-size
temporaries, the entropy and accuracy terms, and a second LM-head matmul in the backward pass (it
recomputes the logits instead of keeping them); STEMA's fused log-prob kernel takes 45 ms next to
the model's own LM-head matmuls. STEMA's AdamW (torch's per-tensor loop) takes 105 ms of its step
against 13 ms for TRL's fused AdamW, and its many small parallel regions make it the part of STEMA's
step that slows most when other processes compete for the cores.

    python benchmarks/bench_sft.py [--quick]
"""

# No `from __future__ import annotations`: run_all.py loads this file without registering it in
# sys.modules, where dataclasses look string annotations up.
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

BENCHMARK = "sft_train"
GOAL = 1.3
FRAMEWORKS = ("stema", "trl")
REPEATS = 3
LEARNING_RATE = 2e-5


@dataclass(frozen=True)
class BenchSize:
    """Model size, example shape and step count of one benchmark setting."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    prompt_length: int
    completion_length: int
    batch_size: int
    timed_steps: int

    @property
    def steps(self) -> int:
        """Optimizer steps each side runs: a warm-up step, the timed steps, and one that closes the clock."""
        return self.timed_steps + 2

    @property
    def trained_tokens_per_step(self) -> int:
        return self.batch_size * self.completion_length


FULL = BenchSize(vocab_size=32000, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=688,
                 prompt_length=64, completion_length=192, batch_size=2, timed_steps=8)
QUICK = BenchSize(vocab_size=512, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                  prompt_length=8, completion_length=24, batch_size=2, timed_steps=2)


def build_model(size: BenchSize, device: str):
    """The randomly initialized Llama both sides train (seed 0, fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=size.vocab_size,
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        num_key_value_heads=size.num_heads,
        max_position_embeddings=size.prompt_length + size.completion_length,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    return model.to(device)


def make_sequences(size: BenchSize) -> list[list[int]]:
    """`steps * batch_size` random token sequences of prompt + completion length (ids >= 3: no special tokens)."""
    generator = torch.Generator().manual_seed(0)
    shape = (size.steps * size.batch_size, size.prompt_length + size.completion_length)
    return torch.randint(3, size.vocab_size, shape, generator=generator).tolist()


class PeakMemory:
    """Peak memory growth from `start()` to `read()`: CPU RSS high-water mark, or CUDA allocator peak."""

    def __init__(self, device: str):
        self.device = device
        self.before = 0

    def start(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
            return
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # VmHWM := VmRSS
        self.before = _proc_status_bytes("VmRSS")

    def read(self) -> int:
        if self.device.startswith("cuda"):
            return torch.cuda.max_memory_allocated() - self.before
        return _proc_status_bytes("VmHWM") - self.before


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


class StepClock:
    """Marks taken at the start of each optimizer step; `memory` (optional) runs from `start()`,
    just before training, to the closing mark."""

    def __init__(self, size: BenchSize, device: str, memory: PeakMemory | None):
        self.size = size
        self.device = device
        self.memory = memory
        self.marks: list[float] = []
        self.peak_bytes: int | None = None

    def start(self) -> None:
        if self.memory is not None:
            self.memory.start()

    def mark(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        self.marks.append(time.perf_counter())
        if len(self.marks) == self.size.steps and self.memory is not None:
            self.peak_bytes = self.memory.read()

    def result(self) -> dict:
        """Per-step seconds of the N timed steps, their median, tokens/s at the median, peak memory."""
        if len(self.marks) != self.size.steps:
            raise RuntimeError(f"expected {self.size.steps} step marks, got {len(self.marks)}")
        step_seconds = [end - start for start, end in zip(self.marks[1:], self.marks[2:])]
        median = statistics.median(step_seconds)
        return {
            "step_seconds": step_seconds,
            "median_step_seconds": median,
            "tokens_per_s": self.size.trained_tokens_per_step / median,
            "peak_bytes": self.peak_bytes,
        }


def check_trained_tokens(framework: str, tokens_in_first_batch: int, size: BenchSize) -> None:
    """Both sides must train exactly the completion tokens, or tokens/s would not compare like with like."""
    if tokens_in_first_batch != size.trained_tokens_per_step:
        raise RuntimeError(
            f"{framework} trains {tokens_in_first_batch} tokens of the first batch, not the "
            f"{size.trained_tokens_per_step} completion tokens"
        )


def train_stema(size: BenchSize, device: str, workdir: str, clock: StepClock) -> None:
    """STEMA's shared loop with `SFTAlgorithm` on the benchmark model and data."""
    from stema.config import OptimConfig, TrainerConfig
    from stema.data.tokenize import IGNORE_INDEX, TokenizedSFT
    from stema.trainers.sft import SFTAlgorithm, count_loss_tokens
    from stema.training import train

    class ClockedSFT(SFTAlgorithm):
        def denominators(self, examples):
            clock.mark()
            return super().denominators(examples)

    examples = [
        TokenizedSFT(ids, [IGNORE_INDEX] * size.prompt_length + ids[size.prompt_length :]) for ids in make_sequences(size)
    ]
    model = build_model(size, device)
    algorithm = ClockedSFT(
        pad_id=0, packing=False, max_length=size.prompt_length + size.completion_length,
        micro_batch_size=size.batch_size, attn_implementation="sdpa",
    )
    trainer_cfg = TrainerConfig(
        output_dir=os.path.join(workdir, "stema"), max_steps=size.steps, global_batch_size=size.batch_size,
        micro_batch_size=size.batch_size, precision="fp32", progress_bar=False, tensorboard=False, export_hf=False,
    )
    optim_cfg = OptimConfig(lr=LEARNING_RATE, betas=[0.9, 0.999], weight_decay=0.0, schedule="linear")
    check_trained_tokens("stema", count_loss_tokens(examples[: size.batch_size]), size)
    clock.start()
    train(model=model, algorithm=algorithm, train_examples=examples, eval_examples=None, trainer_cfg=trainer_cfg, optim_cfg=optim_cfg)


def train_trl(size: BenchSize, device: str, workdir: str, clock: StepClock) -> None:
    """TRL's SFTTrainer on the same model and data (settings in the module docstring)."""
    from datasets import Dataset, disable_progress_bars
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from stema.models.tiny import build_tokenizer

    class ClockCallback(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.mark()

    disable_progress_bars()
    completion_mask = [0] * size.prompt_length + [1] * size.completion_length
    dataset = Dataset.from_list([{"input_ids": ids, "completion_mask": completion_mask} for ids in make_sequences(size)])
    args = SFTConfig(
        output_dir=os.path.join(workdir, "trl"),
        per_device_train_batch_size=size.batch_size,
        max_steps=size.steps,
        learning_rate=LEARNING_RATE,
        bf16=False,
        use_cpu=not device.startswith("cuda"),
        activation_checkpointing=False,
        completion_only_loss=True,  # its default (None) means True only for datasets with a "prompt" column
        report_to=[],
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=build_model(size, device), args=args, train_dataset=dataset, processing_class=build_tokenizer(),
        callbacks=[ClockCallback()],
    )
    labels = trainer.data_collator([trainer.train_dataset[index] for index in range(size.batch_size)])["labels"]
    check_trained_tokens("trl", int((labels[:, 1:] != -100).sum()), size)
    clock.start()
    trainer.train()


TRAINERS = {"stema": train_stema, "trl": train_trl}


def run_in_this_process(framework: str, size: BenchSize, device: str, *, measure_memory: bool) -> dict:
    """{step_seconds, median_step_seconds, tokens_per_s, peak_bytes (None unless measure_memory)} of one side's run."""
    clock = StepClock(size, device, PeakMemory(device) if measure_memory else None)
    with tempfile.TemporaryDirectory(prefix=f"bench_sft_{framework}_") as workdir:
        TRAINERS[framework](size, device, workdir, clock)
    return clock.result()


def run_in_fresh_interpreter(framework: str, size: BenchSize, device: str) -> dict:
    """`run_in_this_process` in a new Python running this file, so that neither side inherits the
    other's allocator state, thread pools or patched modules, and the RSS figures are its own."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path for path in sys.path if path))
    command = [sys.executable, os.path.abspath(__file__), "--worker", framework, json.dumps(asdict(size)), device]
    child = subprocess.run(command, env=env, capture_output=True, text=True)
    if child.returncode != 0:
        raise RuntimeError(f"bench_sft worker {framework} failed:\n{child.stderr[-4000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def device_label(device: str) -> str:
    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} torch threads)"


def measure(*, device: str = "cpu", quick: bool = False) -> list[dict]:
    """Tokens/s of STEMA and TRL SFT on the same model, data and steps; peak memory at full size."""
    size = QUICK if quick else FULL
    if quick:
        runs = {framework: [run_in_this_process(framework, size, device, measure_memory=False)] for framework in FRAMEWORKS}
    else:
        runs = {framework: [] for framework in FRAMEWORKS}
        for repeat in range(REPEATS):
            for framework in FRAMEWORKS if repeat % 2 == 0 else FRAMEWORKS[::-1]:
                result = run_in_fresh_interpreter(framework, size, device)
                runs[framework].append(result)
                steps = " ".join(f"{seconds:.2f}" for seconds in result["step_seconds"])
                print(f"[bench_sft] {framework} run {repeat + 1}: {result['tokens_per_s']:.0f} tokens/s (step seconds {steps})",
                      file=sys.stderr, flush=True)
    best = {framework: max(results, key=lambda result: result["tokens_per_s"]) for framework, results in runs.items()}
    case = (
        f"Llama V={size.vocab_size} d={size.hidden_size} L={size.num_layers}, B={size.batch_size} x "
        f"({size.prompt_length}+{size.completion_length}) tokens, {size.timed_steps} steps, fp32"
    )
    common = {"benchmark": BENCHMARK, "case": case, "baseline_name": "TRL SFTTrainer.train()", "device": device_label(device)}
    ratio = best["stema"]["tokens_per_s"] / best["trl"]["tokens_per_s"]
    rows = [
        dict(common, metric="trained_tokens_per_s", stema=best["stema"]["tokens_per_s"], baseline=best["trl"]["tokens_per_s"],
             ratio=ratio, higher_is_better=True, goal=GOAL, met=ratio >= GOAL),
    ]
    if not quick:
        peak = {framework: max(result["peak_bytes"] for result in results) / 2**20 for framework, results in runs.items()}
        rows.append(
            dict(common, metric="peak_memory_growth_MiB", stema=peak["stema"], baseline=peak["trl"],
                 ratio=peak["trl"] / peak["stema"], higher_is_better=False, goal=None, met=None)
        )
    return rows


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", nargs=3, metavar=("FRAMEWORK", "SIZE_JSON", "DEVICE"),
                        help="(internal) train one side in this process and print its result as JSON")
    args = parser.parse_args()
    if args.worker:
        framework, size_json, device = args.worker
        print(json.dumps(run_in_this_process(framework, BenchSize(**json.loads(size_json)), device, measure_memory=True)))
        return
    for row in measure(device=args.device, quick=args.quick):
        print(json.dumps(row))


if __name__ == "__main__":
    _main()
