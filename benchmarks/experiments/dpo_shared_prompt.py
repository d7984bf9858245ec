"""Experiment (not a product path): how much a DPO step would gain from sharing the prompt between
the chosen and the rejected answer.

The usual DPO batch runs two sequences per pair, prompt + chosen and prompt + rejected. Sharing the
prompt puts one sequence per pair, prompt + chosen + rejected, with a tree attention mask (the
rejected tokens see the prompt and themselves, not the chosen ones) and positions that restart
after the prompt for the rejected answer; the rejected answer's first token is predicted from the
prompt's last position. Same log-probs (checked here), fewer tokens.

    python benchmarks/experiments/dpo_shared_prompt.py --demo runs/demo [--threads 2]

`--demo`: a `stema demo` output folder (its `sft/hf` model and `pairs/train.jsonl`). Times the
policy's forward + backward + AdamW step of a DPO + NLL loss on batches of 32 pairs (the reference
log-probs precomputed, as the demo's DPO stage does), both ways, twice, interleaved; prints ms per
step. Measured 2026-12-03 (benchmarks/RESULTS.md, session 10): 1.43x with 2 threads.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def encode(rows, tokenizer):
    from stema.data import encode_prompt

    def answer(messages):
        return tokenizer(messages[0]["content"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]

    return [(encode_prompt(row["prompt"], tokenizer), answer(row["chosen"]), answer(row["rejected"])) for row in rows]


def two_sequences(pairs):
    """input_ids, attention_mask, answer mask [2 * pairs, T]: rows 2i (chosen) and 2i + 1 (rejected)."""
    sequences, answers = [], []
    for prompt, chosen, rejected in pairs:
        for completion in (chosen, rejected):
            sequences.append(prompt + completion)
            answers.append([0] * len(prompt) + [1] * len(completion))
    length = max(map(len, sequences))

    def pad(rows):
        return torch.tensor([row + [0] * (length - len(row)) for row in rows])

    return pad(sequences), pad([[1] * len(row) for row in sequences]), pad(answers)


def two_sequence_logps(model, input_ids, attention_mask, answers):
    logprobs = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float().log_softmax(-1)
    token = logprobs.gather(-1, input_ids[:, 1:, None])[..., 0] * answers[:, 1:]
    total = token.sum(-1)
    return total[0::2], total[1::2]


def one_sequence(pairs):
    """input_ids, position_ids, 4-D bool mask, the predicting row of each token, chosen and rejected masks."""
    count, length = len(pairs), max(len(p) + len(c) + len(r) for p, c, r in pairs)
    input_ids = torch.zeros(count, length, dtype=torch.long)
    positions = torch.zeros(count, length, dtype=torch.long)
    mask = torch.zeros(count, 1, length, length, dtype=torch.bool)
    mask[:, 0, :, 0] = True  # padding rows attend to something
    predictor = torch.zeros(count, length, dtype=torch.long)
    chosen_mask, rejected_mask = torch.zeros(count, length), torch.zeros(count, length)
    for i, (prompt, chosen, rejected) in enumerate(pairs):
        p, c, r = len(prompt), len(chosen), len(rejected)
        n = p + c + r
        input_ids[i, :n] = torch.tensor(prompt + chosen + rejected)
        positions[i, :n] = torch.tensor(list(range(p + c)) + list(range(p, p + r)))
        tree = torch.tril(torch.ones(n, n, dtype=torch.bool))
        tree[p + c:, p:p + c] = False
        mask[i, 0, :n, :n] = tree
        predictor[i, p:p + c] = torch.arange(p - 1, p + c - 1)
        predictor[i, p + c:n] = torch.tensor([p - 1] + list(range(p + c, n - 1)))
        chosen_mask[i, p:p + c] = 1
        rejected_mask[i, p + c:n] = 1
    return input_ids, positions, mask, predictor, chosen_mask, rejected_mask


def one_sequence_logps(model, input_ids, positions, mask, predictor, chosen_mask, rejected_mask):
    logprobs = model(input_ids=input_ids, position_ids=positions, attention_mask=mask).logits.float().log_softmax(-1)
    predicting = logprobs.gather(1, predictor[..., None].expand(-1, -1, logprobs.shape[-1]))
    token = predicting.gather(-1, input_ids[..., None])[..., 0]
    return (token * chosen_mask).sum(-1), (token * rejected_mask).sum(-1)


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", required=True, type=Path, help="a `stema demo` output folder")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model_path = args.demo / "sft" / "hf"
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, attn_implementation="sdpa")
    pairs = encode([json.loads(line) for line in (args.demo / "pairs" / "train.jsonl").open()], tokenizer)
    means = [sum(len(pair[k]) for pair in pairs) / len(pairs) for k in range(3)]
    print(f"{len(pairs)} pairs; mean tokens: prompt {means[0]:.1f}, chosen {means[1]:.1f}, rejected {means[2]:.1f}")
    with torch.no_grad():
        usual = two_sequence_logps(model, *two_sequences(pairs[:16]))
        shared = one_sequence_logps(model, *one_sequence(pairs[:16]))
    for name, a, b in zip(("chosen", "rejected"), usual, shared):
        print(f"{name} log-probs, max |two sequences - one sequence|: {(a - b).abs().max().item():.2e}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-9)

    def step(logps, batch):
        chosen, rejected = logps(model, *batch)
        loss = -torch.nn.functional.logsigmoid(chosen - rejected).mean() - chosen.mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    batches = [pairs[k:k + args.batch] for k in range(0, len(pairs) - args.batch + 1, args.batch)]
    ways = {"two sequences per pair": (two_sequence_logps, [two_sequences(b) for b in batches]),
            "one sequence per pair, prompt shared": (one_sequence_logps, [one_sequence(b) for b in batches])}
    seconds = {name: [] for name in ways}
    for _ in range(2):
        for name, (logps, prepared) in ways.items():
            step(logps, prepared[0])
            started = time.perf_counter()
            for batch in prepared:
                step(logps, batch)
            seconds[name].append((time.perf_counter() - started) / len(prepared))
    for name, (_, prepared) in ways.items():
        print(f"{name}: {1e3 * min(seconds[name]):.1f} ms/step, input {tuple(prepared[0][0].shape)}")
    usual_s, shared_s = (min(values) for values in seconds.values())
    print(f"speed-up of sharing the prompt: {usual_s / shared_s:.2f}x ({args.threads} threads)")


if __name__ == "__main__":
    main()
