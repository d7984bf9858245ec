"""SteerLM (Dong et al. 2023, https://arxiv.org/abs/2310.05344; NeMo-Aligner's SteerLM recipe).

1. Attribute model: `stema rm` with `reward.loss=regression` and `reward.num_attributes=k` trains a
   k-output regression reward model on labelled responses (NeMo-Aligner's `{"text", "label"}`
   with -100 where unknown, or HelpSteer attribute columns).
2. `stema annotate` (`annotate`): the attribute model predicts the k attributes of every
   (prompt, completion) of a data set, batched, under no_grad, read by the one reward readout
   (`stema.rewards.score_sequences`, as `stema rm` trained it); the records are written with one
   column per attribute (`data.attributes` order) to a JSONL file, atomically.
3. `stema steerlm` (`run`): attribute-conditioned SFT: each prompt gets its response's attribute
   string by the template of `stema.data.steerlm` (values rounded and clamped to
   [steer.min_value, steer.max_value]), then SFT exactly as `stema sft` (the SFT trainer's
   algorithm on the shared loop, loss on the completion).
4. `stema generate --attributes ...` (`generate`): the requested attribute string goes into every
   prompt by the same template; the rollout engine completes them (transformers' generate for the
   families the engine does not serve); JSONL out, atomically.

Departures from the paper: one round (no bootstrapping of the attribute model on the steered
model's own generations); the attribute string sits in the user turn (see `stema.data.steerlm`)
rather than in a separate label turn of a dedicated prompt format.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from stema.config import AnnotateConfig, ConfigError, GenerateConfig, SteerLMConfig
from stema.data import AttributeExample, read_examples, tokenize_attributes
from stema.data.io import write_jsonl_atomic
from stema.data.steerlm import condition_prompt, format_attributes, load_steered_sft_data, parse_attributes
from stema.data.tokenize import LengthReport, encode_prompt
from stema.models.loading import check_model_folders, load_policy, load_tokenizer, resolve_model_path
from stema.rewards import score_sequences
from stema.rollout.factory import generate_once
from stema.training import TrainResult
from stema.distributed import World
from stema.training.setup import Run, report_data, seed_everything
from stema.trainers import sft


def _output_run(command: str, output: str) -> Run:
    """A Run for a command that writes one file (no training folder): say() and the device."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return Run(command=command, output_dir=Path(output).parent, device=device, world=World(role=command, device=device))


def annotate(config: AnnotateConfig) -> Path:
    """Step 2: label `data.train` with the attribute model's predictions; returns the output path."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    run = _output_run("annotate", config.annotate.output)
    check_model_folders(config)
    examples = read_examples(config.data, kind="sft", split="train")  # every record checked before the model loads
    path = resolve_model_path(config.model, cache_dir=run.output_dir / "cache")
    tokenizer = load_tokenizer(path)
    if not any(name.endswith("ForSequenceClassification") for name in AutoConfig.from_pretrained(path, local_files_only=True).architectures or []):
        raise ConfigError(f"model.path: {path} is not an attribute model (a `stema rm` export with reward.loss=regression)")
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=getattr(torch, config.model.dtype), local_files_only=True)
    names = list(config.data.attributes)
    if model.config.num_labels != len(names):
        raise ConfigError(
            f"data.attributes: {len(names)} names ({', '.join(names)}) but the attribute model {path} has "
            f"{model.config.num_labels} outputs; list one name per output, in label order"
        )
    model.to(run.device)
    report = LengthReport(f"train data ({config.data.train})", config.data.max_length)
    kept, sequences = [], []
    for example in examples:
        scored = AttributeExample(example.prompt, example.completion, [], example.location)
        item = tokenize_attributes(scored, tokenizer, max_length=config.data.max_length, truncation=config.data.truncation, report=report)
        if item is not None:
            kept.append(example)
            sequences.append(item.input_ids)
    report_data(run, "train", kept, report)
    predictions = score_sequences(model, sequences, pad_id=tokenizer.pad_token_id, batch_size=config.annotate.batch_size)  # [N, k]
    rows = (
        {"prompt": example.prompt, "completion": example.completion, **{name: round(float(value), 4) for name, value in zip(names, values)}}
        for example, values in zip(kept, predictions.tolist())
    )
    output = write_jsonl_atomic(config.annotate.output, rows)
    run.say(f"wrote {len(kept)} annotated records ({', '.join(names)}) to {output}")
    return output


def run(config: SteerLMConfig) -> TrainResult:
    """Step 3: attribute-conditioned SFT of `model` on `data` (see the module docstring): the SFT
    recipe with the loader that puts each response's attributes into its prompt."""
    load = functools.partial(load_steered_sft_data, min_value=config.steer.min_value, max_value=config.steer.max_value)
    return sft.run(config, command="steerlm", load=load)


def generate(config: GenerateConfig) -> Path:
    """Step 4: complete `data.train`'s prompts, each steered by `generate.attributes` when given."""
    run_info = _output_run("generate", config.generate.output)
    seed_everything(config.sampling.seed)
    check_model_folders(config)
    prompts = [example.prompt for example in read_examples(config.data, kind="prompt", split="train")]
    model, tokenizer = load_policy(config.model, cache_dir=run_info.output_dir / "cache")
    model.to(run_info.device)
    if config.generate.attributes:
        values = parse_attributes(config.generate.attributes, min_value=config.steer.min_value, max_value=config.steer.max_value)
        prompts = [condition_prompt(prompt, format_attributes(values)) for prompt in prompts]
    prompt_ids = [encode_prompt(prompt, tokenizer) for prompt in prompts]
    batch = generate_once(model, tokenizer, prompt_ids, config.sampling, say=run_info.say)
    rows = (
        {"prompt": prompt, "completion": sequence.text, "finish_reason": sequence.finish_reason}
        for prompt, sequence in zip(prompts, batch.sequences)
    )
    output = write_jsonl_atomic(config.generate.output, rows)
    run_info.say(f"wrote {len(prompts)} generations to {output}")
    return output
