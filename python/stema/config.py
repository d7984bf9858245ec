"""Typed configs: one dataclass per component, YAML files hold values, `key=value` overrides on top.

    cfg = load_config(SFTConfig, "examples/sft.yaml", ["optim.lr=3e-4", "trainer.max_steps=20"])

Every field is declared with `option(default, doc)`; the doc is what `stema <command> --help`
prints. Unknown keys and values of the wrong type are errors that name the file, the line and the
dotted field (`sft.yaml:7: optim.lr: expected a float, got 'fast'`), raised before anything runs.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(ValueError):
    """A config value or key that does not fit its dataclass; the message names where it came from."""


def option(default: Any, doc: str, **kwargs: Any) -> Any:
    """A dataclass field with a documented default (lists and dicts are copied per instance)."""
    metadata = {"doc": doc}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


def registered(registry: str, default: str, doc: str) -> Any:
    """A field naming an entry of a registry, e.g. `registered("stema.losses.advantages:ADVANTAGES",
    "gae", ...)`: any name registered when the config is loaded is accepted (so a function added
    with `@register_advantage("mine")` is chosen from YAML or the command line), any other is a
    ConfigError listing the registered names. The registry module is imported only to check."""
    return field(default=default, metadata={"doc": doc, "registry": registry})


def registry_of(item: dataclasses.Field) -> Any:
    """The `stema.registry.Registry` a `registered` field names, or None for other fields."""
    path = item.metadata.get("registry")
    if path is None:
        return None
    import importlib

    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


def section(cls: type, doc: str) -> Any:
    """A nested component config field."""
    return field(default_factory=cls, metadata={"doc": doc})


# ---------------------------------------------------------------------------------------------
# Component configs
# ---------------------------------------------------------------------------------------------


@dataclass
class LoraConfig:
    """Low-rank adapters through peft."""

    enabled: bool = option(False, "Train LoRA adapters instead of all weights.")
    r: int = option(8, "Adapter rank.")
    alpha: float = option(16.0, "LoRA scaling numerator (scale = alpha / r).")
    dropout: float = option(0.0, "Dropout on the adapter input.")
    target_modules: list[str] = option(["q_proj", "k_proj", "v_proj", "o_proj"], "Module names that get adapters.")
    merge_on_export: bool = option(True, "Merge adapters into the base weights when exporting the HF checkpoint.")


@dataclass
class ModelConfig:
    """The model to train: the built-in tiny model or any local Hugging Face causal-LM folder."""

    path: str = option("tiny", "'tiny' for the built-in tiny model, else a local Hugging Face model folder.")
    dtype: Literal["float32", "bfloat16", "float16"] = option("float32", "Dtype the weights are kept in.")
    attn_implementation: str = option("sdpa", "Attention implementation passed to transformers.")
    gradient_checkpointing: bool = option(False, "Recompute activations in the backward pass to save memory.")
    lora: LoraConfig = section(LoraConfig, "LoRA adapters.")


@dataclass
class DataConfig:
    """Training and evaluation data."""

    train: str = option("", "Training data: a .jsonl/.json/.parquet file or a datasets.save_to_disk folder; 'builtin' for the built-in task.")
    eval: str | None = option(None, "Evaluation data in the same formats (optional); 'builtin' for held-out built-in questions.")
    format: str = option(
        "auto",
        "Record format: 'auto' detects it from the first record; or messages, conversations, prompt_completion, input_output, "
        "text (SFT); preference, implicit_preference, nemo_preference; regression, helpsteer (attributes); unpaired; prompt.",
    )
    attributes: list[str] = option(
        ["helpfulness", "correctness", "coherence", "complexity", "verbosity"], "Attribute columns of 'helpsteer' data, in label order."
    )
    builtin_size: int = option(2000, "Training examples drawn from the built-in arithmetic task when train is 'builtin'.")
    builtin_eval_size: int = option(200, "Held-out built-in examples when eval is 'builtin'.")
    max_length: int = option(512, "Longest tokenized example (prompt + completion).")
    truncation: Literal["error", "drop", "truncate"] = option(
        "drop", "Over-long examples: 'error' stops, 'drop' skips them, 'truncate' cuts the completion end; each is counted and reported."
    )
    completion_only_loss: bool = option(True, "Loss on completion tokens only (prompt tokens masked).")
    packing: bool = option(False, "SFT: pack several examples into each row (attention stays within an example).")
    shuffle: bool = option(True, "Shuffle the training examples each epoch (seeded).")


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule."""

    lr: float = option(1e-5, "Peak learning rate.")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    betas: list[float] = option([0.9, 0.95], "AdamW betas.")
    eps: float = option(1e-8, "AdamW epsilon.")
    schedule: Literal["cosine", "linear", "constant"] = option("cosine", "Decay after warmup.")
    warmup_steps: int = option(0, "Linear warmup steps from 0 to lr.")
    min_lr_ratio: float = option(0.0, "Final learning rate as a fraction of lr.")
    max_grad_norm: float = option(1.0, "Gradient clipping by global norm; 0 turns it off.")


@dataclass
class TrainerConfig:
    """The shared training loop: batching, evaluation, checkpoints, logging."""

    output_dir: str = option("runs/stema", "Folder for checkpoints, metrics and the exported model.")
    max_steps: int = option(0, "Optimizer steps to run; 0 means run `epochs` epochs.")
    epochs: int = option(1, "Passes over the training data when max_steps is 0.")
    global_batch_size: int = option(8, "Examples per optimizer step (across all data-parallel ranks).")
    micro_batch_size: int = option(8, "Examples per forward/backward; gradients accumulate up to the global batch.")
    eval_every: int = option(0, "Evaluate every N steps (0: only at the end, when eval data is given).")
    save_every: int = option(0, "Checkpoint every N steps (0: only at the end).")
    keep_checkpoints: int = option(2, "Newest checkpoints to keep.")
    log_every: int = option(1, "Log metrics every N steps.")
    seed: int = option(0, "Seed for initialization, shuffling and dropout.")
    resume: bool = option(
        False, "Continue from the newest checkpoint in output_dir; refused when the checkpoint's settings differ in a way that "
        "cannot apply (docs/reliability.md). Without it, a non-empty output_dir is refused."
    )
    overwrite: bool = option(False, "Start anew in a non-empty output_dir: its old content is moved aside to <output_dir>.old-<k> first.")
    precision: Literal["auto", "fp32", "bf16"] = option("auto", "'auto': bf16 autocast on GPU, fp32 on CPU.")
    progress_bar: bool = option(True, "Show a progress bar with loss and tokens/s.")
    tensorboard: bool = option(True, "Also write TensorBoard events when tensorboard is installed.")
    export_hf: bool = option(True, "Export the final model in Hugging Face format (safetensors + tokenizer).")


@dataclass
class RewardConfig:
    """Reward-model head and loss."""

    num_attributes: int = option(1, "1: a scalar Bradley-Terry reward; k > 1: k regression heads (SteerLM attributes).")
    loss: Literal["bradley_terry", "regression"] = option("bradley_terry", "Pairwise preference loss or multi-attribute MSE.")
    margin: bool = option(False, "Bradley-Terry: subtract the pair's `margin` field from the reward difference.")
    center_rewards_coefficient: float = option(0.0, "Penalty on (r_chosen + r_rejected)^2 that keeps rewards centred.")
    readout: Literal["head", "log_ratio"] = option(
        "head", "head: a linear head on the last token's hidden state (a sequence classifier). log_ratio: the implicit "
        "reward beta * (log pi(y|x) - log pi_ref(y|x)) of a causal LM trained from model.path, which stays as the "
        "reference pi_ref (Rafailov et al. 2023); Bradley-Terry only; exported with the reference beside it."
    )
    beta: float = option(1.0, "readout log_ratio: the reward's scale beta.")
    nll_weight: float = option(
        0.0, "readout log_ratio: weight of the chosen responses' negative log-likelihood added to the loss, a regularizer "
        "that keeps the model a language model (Yang et al. 2024, generalizable reward models)."
    )


@dataclass
class PreferenceConfig:
    """The preference loss of `stema dpo` (the DPO family) and where the reference log-probs come from."""

    loss: str = registered(
        "stema.losses.preference:PREFERENCE_LOSSES", "dpo",
        "dpo (sigmoid; cDPO with label_smoothing), ipo, rpo_sq / rpo_bwd_kl / rpo_fwd_kl (NeMo-Aligner's reward-aware "
        "losses, from the pairs' chosen_reward / rejected_reward), simpo (reference-free).",
    )
    beta: float = option(0.1, "Strength of the KL penalty to the reference (IPO's tau; SimPO's reward scale).")
    label_smoothing: float = option(0.0, "dpo: probability that a preference label is flipped (cDPO), in [0, 0.5).")
    gt_reward_scale: float = option(1.0, "rpo_*: eta, the scale of the ground-truth reward margin chosen_reward - rejected_reward.")
    default_chosen_reward: float = option(1.0, "rpo_*: chosen_reward of pairs whose data gives none.")
    default_rejected_reward: float = option(0.0, "rpo_*: rejected_reward of pairs whose data gives none.")
    simpo_gamma: float = option(0.5, "simpo: the target reward margin gamma.")
    average_logprobs: bool = option(
        False, "Average the log-probs over each completion's tokens instead of summing them (SimPO; TRL's IPO)."
    )
    sft_loss_weight: float = option(0.0, "Weight of the chosen responses' SFT loss (negative log-likelihood) added to the loss.")
    precompute_ref_logprobs: bool = option(
        False, "Run the reference model once over the data before training, keep its log-probs with the examples and free it."
    )


@dataclass
class KTOLossConfig:
    """The KTO loss of `stema kto`."""

    beta: float = option(0.1, "Strength of the KL penalty to the reference.")
    desirable_weight: float = option(1.0, "Weight of the desirable examples' losses (lambda_D).")
    undesirable_weight: float = option(1.0, "Weight of the undesirable examples' losses (lambda_U).")
    average_logprobs: bool = option(False, "Average the log-probs over each completion's tokens instead of summing them.")


@dataclass
class RolloutConfig:
    """Generation during PPO: sampling and the rollout engines (STEMA's own, refitted in place)."""

    samples_per_prompt: int = option(1, "Responses generated per prompt (at least 2 for the rloo and grpo estimators).")
    max_new_tokens: int = option(64, "Longest response, in tokens.")
    temperature: float = option(1.0, "Sampling temperature (the trainer scores tokens at the same temperature).")
    top_p: float = option(1.0, "Nucleus sampling: smallest set of tokens with this much probability (1: off). The "
                          "sampling log-probs PPO's ratio uses stay those of the full temperature-scaled policy (what "
                          "the trainer recomputes), not renormalized over the kept tokens; the vllm backend, which "
                          "reports the renormalized ones, refuses top_p < 1.")
    top_k: int = option(0, "Sample among the k most likely tokens (0: off). Log-probs as for top_p; the vllm backend "
                        "refuses top_k > 0.")
    stop_strings: list[str] = option([], "Strings that end a response (besides EOS).")
    engine_dtype: Literal["auto", "float32", "bfloat16", "float16"] = option("auto", "Engine weights dtype; 'auto': bf16 on GPU, fp32 on CPU.")
    max_batch: int = option(64, "Sequences an engine generates at once (its KV cache holds this many).")
    num_engines: int = option(1, "Rollout engines (each its own weight copy) pulling prompt batches from the load-balancing scheduler.")
    backend: Literal["stema", "hf", "vllm"] = option(
        "stema", "Generation backend: 'stema' (STEMA's engine; transformers' generate for families it does not serve), "
        "'hf' (transformers' generate on the policy), 'vllm' (an in-process vLLM engine refitted in place; needs the vllm "
        "extra, rollout.top_p 1, rollout.top_k 0, rollout.num_engines 1, and roles.placement disaggregated with several "
        "actor workers)."
    )


@dataclass
class PPOAlgorithmConfig:
    """The PPO update: advantages, clipping, KL penalty, rewards, epochs."""

    advantage: str = registered(
        "stema.losses.advantages:ADVANTAGES", "gae",
        "Advantage estimator: gae (needs the critic), reinforce, rloo, grpo (group-normalized; several samples per prompt), or "
        "any estimator registered with @register_advantage (its module imported with `--import MODULE`)."
    )
    gamma: float = option(1.0, "Discount factor.")
    lam: float = option(0.95, "GAE lambda.")
    whiten_advantages: bool = option(True, "Normalize advantages to zero mean and unit variance over the rollout batch's tokens.")
    clip_ratio: float = option(0.2, "PPO ratio clipping epsilon.")
    value_clip: float = option(0.2, "Critic value clipping around the rollout's values (0: off).")
    entropy_coef: float = option(0.0, "Entropy bonus coefficient.")
    kl_coef: float = option(0.05, "KL penalty coefficient (the start value when adaptive).")
    kl_target: float | None = option(None, "Adaptive KL: target per-sequence KL (null: fixed kl_coef).")
    kl_horizon: int = option(10000, "Adaptive KL: horizon in samples (Ziegler et al. 2019).")
    kl_in: Literal["reward", "loss"] = option("reward", "Where the KL penalty goes: per-token in the reward (PPO), or in the loss (GRPO).")
    kl_estimator: Literal["k1", "k2", "k3"] = option("k1", "KL estimator of the penalty (k1 = log-ratio; GRPO uses k3 in the loss).")
    reward_clip: float = option(0.0, "Clip sequence scores to [-reward_clip, reward_clip] (0: off).")
    normalize_rewards: bool = option(False, "Normalize sequence scores by running mean and std across steps.")
    truncation_penalty: float | None = option(None, "Score given instead of the reward to responses cut at max_new_tokens (null: no penalty).")
    ppo_epochs: int = option(1, "Passes over each rollout batch.")
    minibatch_size: int = option(0, "Sequences per optimizer step within a pass (0: the whole rollout batch).")
    critic_warmup_steps: int = option(0, "First steps in which only the critic trains.")
    recompute_old_logprobs: bool = option(
        True, "Score the rollout under the policy in a forward of its own before the update. false: with ppo_epochs 1 and "
        "one minibatch the update's forward is that policy, so its detached log-probs are the old ones (TRL's "
        "num_iterations=1): one actor forward less per step. Needs kl_in loss; the kl metric then uses the engine's "
        "sampling log-probs and only engine_logprob_mismatch_mean (over the trained tokens) is logged. With "
        "skip_uniform_groups too, the reference scores only the rows the actor trains on, and the kl metric is theirs."
    )
    skip_uniform_groups: bool = option(
        False, "Train the actor only on the groups (a prompt's samples) whose scores are not all equal (DAPO's dynamic "
        "sampling without re-sampling, Yu et al. 2025): a uniform group has zero group advantage. Needs samples_per_prompt >= 2."
    )


@dataclass
class RewardSourceConfig:
    """Where the rewards of generated responses come from (`stema ppo`, `grpo`, `rs`): a Python
    function or a trained reward model, exactly one (`stema.rewards.Reward`)."""

    function: str = option(
        "", "A reward function 'module:function' called as f(prompt, completion_text) -> number; 'builtin' for the built-in "
        "task. The module is imported from the current folder as well (as `python -m` does), at start-up."
    )
    model: str = option("", "A trained reward model folder (a `stema rm` export with one output), read at each sequence's last token.")
    micro_batch_size: int = option(32, "Sequences per reward-model forward pass.")
    eval_function: str = option("", "Reward function 'module:function' for the held-out evaluation (empty: the training reward).")


@dataclass
class RolesConfig:
    """How PPO's roles (actor, critic, reward, reference) are placed and called."""

    backend: Literal["local", "ray"] = option("local", "local: roles in this process (calls run in threads); ray: each role a Ray actor.")
    reference: Literal["copy", "lora", "cpu_offload"] = option(
        "copy",
        "Reference policy: a frozen copy in its own role; 'lora': the actor with adapters disabled (needs model.lora); "
        "'cpu_offload': a frozen copy kept in CPU memory and moved to the device for each call.",
    )
    ray_address: str = option("", "Ray cluster to join ('auto', 'ray://host:port'); empty starts a local Ray.")
    call_timeout_s: float = option(1800.0, "Seconds a role call may take before the run stops with an error naming the role.")
    actor_workers: int = option(1, "Ray actors running the actor as one torch.distributed world (FSDP2); > 1 needs backend ray.")
    critic_workers: int = option(1, "Ray actors running the critic as one torch.distributed world (FSDP2); > 1 needs backend ray.")
    placement: Literal["colocated", "disaggregated"] = option(
        "colocated", "colocated: the rollout engines live in the actor's processes (KV cache freed while training); "
        "disaggregated: they live in roles.rollout_workers Ray actors of their own, on their own devices, refitted "
        "from the actor after every update (needs backend ray)."
    )
    rollout_workers: int = option(1, "Ray actors holding only rollout engines (placement disaggregated); prompts are split among them by rows.")
    refit_bucket_mb: float = option(512.0, "Most MiB of gathered weights a sharded actor's rank holds at once when it refits its engines.")


@dataclass
class DistributedConfig:
    """Data parallel (FSDP2), tensor parallel and pipeline parallel under `torchrun` (in ppo / grpo: inside the actor's and critic's Ray role groups); a single process ignores it (pp_size > 1 needs pp_size processes or more)."""

    strategy: Literal["fsdp", "none"] = option(
        "fsdp", "'fsdp': shard weights, gradients and optimizer state over the data-parallel ranks (FSDP2) when "
        "launched with torchrun --nproc_per_node N > 1; 'none': a plain model (one process only)."
    )
    mixed_precision: Literal["none", "bf16"] = option(
        "none", "FSDP2 mixed precision: 'bf16' computes in bf16 copies of the fp32 weights and reduces gradients in fp32."
    )
    cpu_offload: bool = option(False, "Keep the sharded weights, gradients and optimizer state in CPU memory (FSDP2 CPU offload).")
    tp_size: int = option(1, "Tensor-parallel ranks per model replica (Llama, Qwen2); data-parallel ranks = world size / (tp_size x pp_size).")
    pp_size: int = option(
        1, "Pipeline stages (Llama, Qwen2, Mistral with untied embeddings): each stage a run of consecutive decoder layers on "
        "its own ranks, the embedding on the first, norm and head on the last; must divide the world size / tp_size (in "
        "ppo / grpo: roles.actor_workers and roles.critic_workers, whose role groups hold the stages)."
    )
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b"] = option(
        "1f1b", "Pipeline schedule (torch.distributed.pipelining): gpipe (all forwards, then all backwards), 1f1b (one "
        "forward one backward: fewer live activations), interleaved_1f1b (2 stages per rank: a smaller bubble; needs "
        "2 x pp_size to divide the decoder layers and pp_microbatches to be a multiple of pp_size)."
    )
    pp_microbatches: int = option(
        0, "Pipeline micro-batches per optimizer step on each data-parallel rank (0: the rank's share of "
        "trainer.global_batch_size / trainer.micro_batch_size); each holds (share / pp_microbatches) examples."
    )
    timeout_s: float = option(600.0, "Seconds a collective may wait for the other ranks before the run stops with an error naming the rank.")


@dataclass
class SFTConfig:
    """`stema sft`: supervised fine-tuning."""

    model: ModelConfig = section(ModelConfig, "Model.")
    data: DataConfig = section(DataConfig, "Data.")
    optim: OptimConfig = section(OptimConfig, "Optimizer.")
    trainer: TrainerConfig = section(TrainerConfig, "Training loop.")
    distributed: DistributedConfig = section(DistributedConfig, "Multi-process data and tensor parallelism.")


@dataclass
class RMConfig:
    """`stema rm`: reward-model training."""

    model: ModelConfig = section(ModelConfig, "Backbone model.")
    data: DataConfig = section(DataConfig, "Preference (or attribute) data.")
    optim: OptimConfig = section(OptimConfig, "Optimizer.")
    trainer: TrainerConfig = section(TrainerConfig, "Training loop.")
    distributed: DistributedConfig = section(DistributedConfig, "Multi-process data and tensor parallelism.")
    reward: RewardConfig = section(RewardConfig, "Reward head and loss.")


@dataclass
class DPOConfig:
    """`stema dpo`: direct preference optimization and its family (IPO, RPO, SimPO)."""

    model: ModelConfig = section(ModelConfig, "Policy model; with LoRA the reference is the same model with adapters disabled.")
    data: DataConfig = section(DataConfig, "Preference pairs (TRL's or NeMo-Aligner's formats).")
    optim: OptimConfig = section(OptimConfig, "Optimizer.")
    trainer: TrainerConfig = section(TrainerConfig, "Training loop.")
    distributed: DistributedConfig = section(DistributedConfig, "Multi-process data and tensor parallelism.")
    preference: PreferenceConfig = section(PreferenceConfig, "Preference loss and reference log-probs.")


@dataclass
class PPOConfig:
    """`stema ppo`: RLHF with PPO (actor, critic, reward, reference roles; the rollout engine refitted in place)."""

    model: ModelConfig = section(ModelConfig, "The actor (policy) model; it is also the reference's starting point.")
    critic: ModelConfig = field(
        default_factory=lambda: ModelConfig(path="auto"),
        metadata={"doc": "Critic (value model); path 'auto': the reward model when reward.model is set, else the policy with a new value head."},
    )
    reward: RewardSourceConfig = section(RewardSourceConfig, "Reward function or reward model.")
    data: DataConfig = section(DataConfig, "Prompts (prompt-only records, or any format with a prompt; 'builtin' for the built-in task).")
    optim: OptimConfig = section(OptimConfig, "Actor optimizer.")
    critic_optim: OptimConfig = section(OptimConfig, "Critic optimizer.")
    trainer: TrainerConfig = section(
        TrainerConfig, "Loop: max_steps PPO steps, global_batch_size prompts per step, micro_batch_size sequences per forward/backward."
    )
    rollout: RolloutConfig = section(RolloutConfig, "Generation.")
    ppo: PPOAlgorithmConfig = section(PPOAlgorithmConfig, "The PPO update.")
    roles: RolesConfig = section(RolesConfig, "Role placement.")
    distributed: DistributedConfig = section(
        DistributedConfig, "Process group settings (stema ppo runs as one controller process; roles scale out through roles.backend)."
    )


@dataclass
class GRPOConfig(PPOConfig):
    """`stema grpo`: PPO's machinery with the group-normalized `grpo` estimator, no critic, KL in the loss."""

    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(samples_per_prompt=4), metadata={"doc": "Generation."})
    ppo: PPOAlgorithmConfig = field(
        default_factory=lambda: PPOAlgorithmConfig(advantage="grpo", kl_in="loss", kl_estimator="k3", kl_coef=0.04, whiten_advantages=False),
        metadata={"doc": "The update (grpo estimator, k3 KL in the loss)."},
    )


@dataclass
class KTOConfig:
    """`stema kto`: Kahneman-Tversky optimization on unpaired (prompt, completion, label) data."""

    model: ModelConfig = section(ModelConfig, "Policy model; with LoRA the reference is the same model with adapters disabled.")
    data: DataConfig = section(DataConfig, "Unpaired data: prompt, completion, label (true: desirable).")
    optim: OptimConfig = section(OptimConfig, "Optimizer.")
    trainer: TrainerConfig = section(TrainerConfig, "Training loop.")
    distributed: DistributedConfig = section(DistributedConfig, "Multi-process data and tensor parallelism.")
    kto: KTOLossConfig = section(KTOLossConfig, "KTO loss.")


@dataclass
class SamplingConfig:
    """How the generation engine samples (`stema generate`, `stema rs`, `stema spin`)."""

    temperature: float = option(1.0, "Softmax temperature; 0 is greedy decoding.")
    top_p: float = option(1.0, "Nucleus sampling: keep the most likely tokens whose mass reaches top_p (1: off).")
    top_k: int = option(0, "Keep the k most likely tokens (0: off).")
    max_new_tokens: int = option(64, "Most tokens generated per response.")
    seed: int = option(0, "Seed of the sampler (same seed, prompts and weights: same samples).")
    batch_size: int = option(64, "Sequences the generation engine decodes at once.")
    backend: Literal["stema", "hf", "vllm"] = option(
        "stema", "Generation backend: 'stema' (STEMA's engine; transformers' generate for families it does not serve), "
        "'hf' (transformers' generate on the model), 'vllm' (needs the vllm extra)."
    )


@dataclass
class AnnotateOptions:
    """Where `stema annotate` writes the attribute predictions."""

    output: str = option("annotated.jsonl", "JSONL file written (atomically): prompt, completion and one column per data.attributes name.")
    batch_size: int = option(32, "Sequences per forward pass of the attribute model.")


@dataclass
class AnnotateConfig:
    """`stema annotate`: label a data set with the attributes an attribute model (`stema rm`, regression) predicts."""

    model: ModelConfig = section(ModelConfig, "The attribute model: a `stema rm` export with one output per data.attributes name.")
    data: DataConfig = section(DataConfig, "data.train: the records to label (any SFT format); data.attributes: the output names, in label order.")
    annotate: AnnotateOptions = section(AnnotateOptions, "Output.")


@dataclass
class SteerConfig:
    """How attribute values enter the prompt (the template is in `stema.data.steerlm`)."""

    min_value: int = option(0, "Attribute values are rounded and clamped to [min_value, max_value] (HelpSteer: 0..4).")
    max_value: int = option(4, "Largest attribute value.")


@dataclass
class SteerLMConfig:
    """`stema steerlm`: attribute-conditioned SFT (SteerLM): each prompt carries its response's attribute string."""

    model: ModelConfig = section(ModelConfig, "Policy model to fine-tune.")
    data: DataConfig = section(DataConfig, "SFT records with one column per data.attributes name (what `stema annotate` writes); 'builtin' for the built-in attribute task.")
    optim: OptimConfig = section(OptimConfig, "Optimizer.")
    trainer: TrainerConfig = section(TrainerConfig, "Training loop.")
    steer: SteerConfig = section(SteerConfig, "Attribute values.")
    distributed: DistributedConfig = section(DistributedConfig, "Multi-process data and tensor parallelism.")


@dataclass
class GenerateOptions:
    """Output and steering of `stema generate`."""

    output: str = option("generations.jsonl", "JSONL file written (atomically): prompt, completion, finish_reason.")
    attributes: str = option("", "Requested attributes, e.g. 'quality:4,verbosity:2', put in every prompt by the SteerLM template ('' for none).")


@dataclass
class GenerateConfig:
    """`stema generate`: complete prompts with the generation engine, optionally steered by attributes."""

    model: ModelConfig = section(ModelConfig, "Model to generate with (the rollout engine serves Llama, Qwen2, Mistral; other families use transformers' generate, one process).")
    data: DataConfig = section(DataConfig, "data.train: the prompts (records with a 'prompt' field; 'builtin' for built-in questions).")
    sampling: SamplingConfig = section(SamplingConfig, "Sampling.")
    generate: GenerateOptions = section(GenerateOptions, "Output and attributes.")
    steer: SteerConfig = section(SteerConfig, "Attribute values.")


@dataclass
class RejectionSamplingOptions:
    """Best-of-n selection of `stema rs`."""

    num_samples: int = option(8, "Responses sampled per prompt (n of best-of-n).")
    min_reward: float | None = option(None, "Keep a prompt's best response only when its reward is at least this (null: always keep it).")


@dataclass
class RSConfig:
    """`stema rs`: rejection sampling: best-of-n generations scored by a reward, then SFT on the winners."""

    model: ModelConfig = section(ModelConfig, "Policy that samples and is fine-tuned (the rollout engine serves Llama, Qwen2, Mistral; other families use transformers' generate, one process).")
    data: DataConfig = section(DataConfig, "Prompts (train: to sample from; eval: greedy reward before and after).")
    optim: OptimConfig = section(OptimConfig, "Optimizer of the SFT on the winners.")
    trainer: TrainerConfig = section(TrainerConfig, "Training loop of the SFT on the winners.")
    sampling: SamplingConfig = section(SamplingConfig, "Sampling of the n candidates.")
    reward: RewardSourceConfig = section(RewardSourceConfig, "Reward function or reward model scoring the candidates (and the greedy held-out responses).")
    rs: RejectionSamplingOptions = section(RejectionSamplingOptions, "Best-of-n selection.")
    distributed: DistributedConfig = section(DistributedConfig, "FSDP2 data parallel under torchrun: each rank samples its blocks of sampling.batch_size prompts, then trains.")


@dataclass
class SPINOptions:
    """Self-play iterations of `stema spin`."""

    iterations: int = option(3, "Self-play iterations: generate, train with the SPIN loss, move the reference forward.")


@dataclass
class SPINConfig:
    """`stema spin`: self-play fine-tuning (ground truth chosen, the model's own generation rejected)."""

    model: ModelConfig = section(ModelConfig, "Policy, usually an SFT model (the rollout engine serves Llama, Qwen2, Mistral; other families use transformers' generate, one process).")
    data: DataConfig = section(DataConfig, "SFT data (prompt + ground-truth completion); eval: held-out log-likelihood and exact match.")
    optim: OptimConfig = section(OptimConfig, "Optimizer of each iteration.")
    trainer: TrainerConfig = section(TrainerConfig, "Training loop of each iteration (max_steps / epochs per iteration).")
    preference: PreferenceConfig = section(PreferenceConfig, "The SPIN loss: a DPO-family loss (default dpo) against the previous iteration.")
    sampling: SamplingConfig = section(SamplingConfig, "Sampling of the rejected responses.")
    spin: SPINOptions = section(SPINOptions, "Iterations.")
    distributed: DistributedConfig = section(DistributedConfig, "FSDP2 data parallel under torchrun: each rank samples its blocks of sampling.batch_size prompts, then trains.")


@dataclass
class DemoConfig:
    """`stema demo`: the built-in tiny model and task end to end on a CPU, with no download."""

    out: str = option("runs/demo", "Output folder: results.json, the table, loss-curve PNGs and every stage's model; it must be absent or empty.")
    overwrite: bool = option(False, "Rerun into a non-empty out folder: its old content is moved aside to <out>.old-<k> first.")
    stages: str = option("default", "Comma-separated stages to run in order, 'default', or 'all'.")
    seed: int = option(0, "Seed for the tiny model, the task data and training.")
    num_demonstrations: int = option(300, "Built-in training questions with a written answer: the SFT stage's demonstrations (scarce on purpose, see docs/demo.md).")
    num_train: int = option(4000, "Built-in training questions without a written answer for the later stages: the prompts of the reward model's and DPO's sampled pairs and of the RL stage.")
    num_heldout: int = option(1000, "Held-out questions for exact-match accuracy and pairwise accuracy.")
    pair_samples: int = option(8, "Answers the SFT model samples per prompt to make the reward model's and DPO's preference pairs.")
    sft_steps: int = option(1000, "SFT optimizer steps.")
    rm_steps: int = option(400, "Reward-model optimizer steps.")
    dpo_steps: int = option(300, "DPO optimizer steps.")
    ppo_steps: int = option(240, "PPO steps (each: generate, score, update, refit).")
    batch_size: int = option(32, "Global batch size of every stage.")
    progress_bar: bool = option(True, "Show progress bars.")
    steerlm_steps: int = option(500, "SteerLM stage: attribute-conditioned SFT optimizer steps.")
    steerlm_attribute_steps: int = option(100, "SteerLM stage: attribute-model (regression reward model) optimizer steps.")
    spin_iterations: int = option(3, "SPIN stage: self-play iterations.")
    spin_steps: int = option(100, "SPIN stage: optimizer steps per iteration.")
    rs_samples: int = option(32, "Rejection-sampling stage: responses sampled per prompt.")
    rs_steps: int = option(400, "Rejection-sampling stage: SFT optimizer steps on the winners.")


# ---------------------------------------------------------------------------------------------
# Loading, validation, overrides
# ---------------------------------------------------------------------------------------------


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(choice) for choice in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(annotation))
    if origin is list:
        (item,) = typing.get_args(annotation)
        return f"a list of {_type_name(item)}"
    if annotation is type(None):
        return "null"
    return {bool: "a bool", int: "an int", float: "a float", str: "a string"}.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """`value` checked against `annotation` (ints are accepted for floats); ConfigError otherwise."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for option_type in typing.get_args(annotation):
            try:
                return _coerce(value, option_type, where)
            except ConfigError:
                continue
    elif origin is Literal:
        if value in typing.get_args(annotation):
            return value
    elif origin is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, (list, tuple)):
            return [_coerce(item, item_type, f"{where}[{index}]") for index, item in enumerate(value)]
    elif annotation is type(None):
        if value is None:
            return None
    elif annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # PyYAML follows YAML 1.1, which reads `3e-4` (no dot) as a string; accept it as a number.
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif annotation is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
    else:
        raise TypeError(f"config field {where}: unsupported annotation {annotation!r}")
    raise ConfigError(f"{where}: expected {_type_name(annotation)}, got {value!r}")


def _check_registered(item: dataclasses.Field, value: Any, where: str) -> None:
    """ConfigError when a `registered` field's value is not a name in its registry."""
    registry = registry_of(item)
    if registry is not None and value not in registry:
        raise ConfigError(f"{where}: unknown {registry.kind} {value!r} (registered: {', '.join(registry.names())})")


class _Source:
    """Where values came from: a file with the line of each dotted key, or the command line."""

    def __init__(self, name: str, lines: dict[str, int] | None = None):
        self.name = name
        self.lines = lines or {}

    def at(self, dotted: str) -> str:
        line = self.lines.get(dotted)
        return f"{self.name}:{line}" if line is not None else self.name


def _apply(instance: Any, values: dict, source: _Source, prefix: str = "") -> None:
    if not isinstance(values, dict):
        name = prefix.rstrip(".")
        raise ConfigError(f"{source.at(name)}: {name or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(type(instance))
    fields = {f.name: f for f in dataclasses.fields(instance)}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{source.at(dotted)}: unknown key '{dotted}' (known keys here: {known})")
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            _apply(getattr(instance, key), value, source, f"{dotted}.")
            continue
        try:
            setattr(instance, key, _coerce(value, annotation, dotted))
            _check_registered(fields[key], getattr(instance, key), dotted)
        except ConfigError as error:
            raise ConfigError(f"{source.at(dotted)}: {error}") from None


def _yaml_with_lines(text: str, name: str) -> tuple[Any, dict[str, int]]:
    """Parse YAML, also returning the 1-based line of every dotted key."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{name}:{mark.line + 1}" if mark is not None else name
        raise ConfigError(f"{where}: invalid YAML: {getattr(error, 'problem', error)}") from None
    lines: dict[str, int] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                dotted = f"{prefix}{key_node.value}"
                lines[dotted] = key_node.start_mark.line + 1
                walk(value_node, f"{dotted}.")

    walk(root, "")
    data = yaml.safe_load(text)
    return ({} if data is None else data), lines


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value), the value parsed as YAML (`3e-4`, `true`, `[a, b]`, `null`)."""
    if "=" not in text:
        raise ConfigError(f"command line: override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"command line: override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _nest(dotted: str, value: Any) -> dict:
    nested: Any = value
    for part in reversed(dotted.split(".")):
        nested = {part: nested}
    return nested


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Defaults of `cls`, then the YAML file's values, then `key=value` overrides, all type-checked."""
    config = cls()
    places: dict[str, str] = {}  # dotted key -> where its value was last set, for cross-field errors
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        values, lines = _yaml_with_lines(_read_text(path), str(path))
        _apply(config, values, _Source(str(path), lines))
        places.update({key: f"{path}:{line}" for key, line in lines.items()})
    for override in overrides:
        key, value = parse_override(override)
        _apply(config, _nest(key, value), _Source(f"command line ({override})"))
        places[key] = f"command line ({override})"
    try:
        validate(config)
    except ConfigError as error:
        key = re.match(r"[A-Za-z_][\w.]*", str(error))
        where = places.get(key.group(0)) if key else None
        raise (ConfigError(f"{where}: {error}") if where else error) from None
    return config


def _read_text(path: Path) -> str:
    """A config file's text; bytes that are not UTF-8 are a ConfigError naming line and byte offset."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ConfigError(f"{path}:{line}: not UTF-8: byte 0x{data[error.start]:02x} at byte offset {error.start}") from None


def validate(config: Any, prefix: str = "", *, batch_of_prompts: bool = False) -> None:
    """Cross-field checks that types alone cannot express. Under PPO (`batch_of_prompts`) the
    global batch counts prompts and the micro-batch sequences, so one need not divide the other."""
    if isinstance(config, TrainerConfig):
        if config.micro_batch_size < 1 or config.global_batch_size < 1:
            raise ConfigError(f"{prefix}global_batch_size and micro_batch_size must be >= 1")
        if not batch_of_prompts and config.global_batch_size % config.micro_batch_size:
            raise ConfigError(
                f"{prefix}global_batch_size ({config.global_batch_size}) must be a multiple of "
                f"micro_batch_size ({config.micro_batch_size})"
            )
    if isinstance(config, OptimConfig):
        _validate_optim(config, prefix)
    if isinstance(config, TrainerConfig):
        _validate_trainer_counts(config, prefix)
    if isinstance(config, PreferenceConfig):
        if config.beta <= 0:
            raise ConfigError(f"{prefix}beta must be > 0, got {config.beta}")
        if not 0.0 <= config.label_smoothing < 0.5:
            raise ConfigError(f"{prefix}label_smoothing must be in [0, 0.5), got {config.label_smoothing}")
        if config.label_smoothing and config.loss != "dpo":
            raise ConfigError(f"{prefix}label_smoothing applies to loss 'dpo' only (loss is {config.loss!r})")
        if config.precompute_ref_logprobs and config.loss == "simpo":
            raise ConfigError(f"{prefix}precompute_ref_logprobs: loss 'simpo' uses no reference model")
    if isinstance(config, RewardConfig) and config.readout == "log_ratio":
        _validate_log_ratio_readout(config, prefix)
    if isinstance(config, RMConfig) and config.reward.readout == "log_ratio" and config.model.lora.enabled:
        raise ConfigError("reward.readout: log_ratio trains the whole causal LM against its starting weights; it does not take "
                          "model.lora.enabled")
    if isinstance(config, RewardSourceConfig):
        if bool(config.function) == bool(config.model):
            raise ConfigError(f"{prefix.rstrip('.') or 'reward'}: set exactly one of {prefix}function and {prefix}model")
        if config.micro_batch_size < 1:
            raise ConfigError(f"{prefix}micro_batch_size must be >= 1, got {config.micro_batch_size}")
    if isinstance(config, PPOConfig):
        _validate_ppo(config)
    if isinstance(config, DistributedConfig) and (config.tp_size < 1 or config.pp_size < 1 or config.pp_microbatches < 0
                                                  or config.timeout_s <= 0):
        raise ConfigError(f"{prefix}tp_size and pp_size must be >= 1, pp_microbatches >= 0 and timeout_s > 0 (got "
                          f"{config.tp_size}, {config.pp_size}, {config.pp_microbatches}, {config.timeout_s})")
    if isinstance(config, KTOLossConfig) and config.beta <= 0:
        raise ConfigError(f"{prefix}beta must be > 0, got {config.beta}")
    if isinstance(config, SteerConfig) and config.min_value > config.max_value:
        raise ConfigError(f"{prefix}min_value ({config.min_value}) must be <= max_value ({config.max_value})")
    if isinstance(config, SamplingConfig) and (config.max_new_tokens < 1 or config.batch_size < 1 or config.temperature < 0):
        raise ConfigError(f"{prefix}max_new_tokens and batch_size must be >= 1 and temperature >= 0")
    for options, name in ((RejectionSamplingOptions, "num_samples"), (SPINOptions, "iterations"), (AnnotateOptions, "batch_size")):
        if isinstance(config, options) and getattr(config, name) < 1:
            raise ConfigError(f"{prefix}{name} must be >= 1, got {getattr(config, name)}")
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        _check_registered(item, value, f"{prefix}{item.name}")
        if dataclasses.is_dataclass(value):
            validate(value, f"{prefix}{item.name}.", batch_of_prompts=isinstance(config, PPOConfig))


def _validate_log_ratio_readout(config: RewardConfig, prefix: str) -> None:
    if config.beta <= 0 or config.nll_weight < 0:
        raise ConfigError(f"{prefix}beta must be > 0 and {prefix}nll_weight >= 0 (got {config.beta}, {config.nll_weight})")
    for name, value, allowed in (("loss", config.loss, "bradley_terry"), ("num_attributes", config.num_attributes, 1),
                                 ("margin", config.margin, False), ("center_rewards_coefficient", config.center_rewards_coefficient, 0.0)):
        if value != allowed:
            raise ConfigError(f"{prefix}{name}: {prefix}readout log_ratio is a pairwise Bradley-Terry reward; it needs "
                              f"{prefix}{name} {allowed} (got {value})")


def _validate_optim(config: OptimConfig, prefix: str) -> None:
    for name, value, ok, rule in (
        ("lr", config.lr, config.lr >= 0, ">= 0"),
        ("weight_decay", config.weight_decay, config.weight_decay >= 0, ">= 0"),
        ("eps", config.eps, config.eps > 0, "> 0"),
        ("betas", config.betas, len(config.betas) == 2 and all(0 <= beta < 1 for beta in config.betas), "two values in [0, 1)"),
        ("warmup_steps", config.warmup_steps, config.warmup_steps >= 0, ">= 0"),
        ("min_lr_ratio", config.min_lr_ratio, 0 <= config.min_lr_ratio <= 1, "in [0, 1]"),
        ("max_grad_norm", config.max_grad_norm, config.max_grad_norm >= 0, ">= 0 (0 turns clipping off)"),
    ):
        if not ok:
            raise ConfigError(f"{prefix}{name} must be {rule}, got {value}")


def _validate_trainer_counts(config: TrainerConfig, prefix: str) -> None:
    for name, least in (("max_steps", 0), ("epochs", 1), ("eval_every", 0), ("save_every", 0), ("keep_checkpoints", 1), ("log_every", 1)):
        if getattr(config, name) < least:
            raise ConfigError(f"{prefix}{name} must be >= {least}, got {getattr(config, name)}")
    if config.resume and config.overwrite:
        raise ConfigError(f"{prefix}resume and {prefix}overwrite: set one of them (continue the run, or move it aside and start anew)")


def _validate_ppo(config: PPOConfig) -> None:
    if config.ppo.advantage in ("rloo", "grpo") and config.rollout.samples_per_prompt < 2:
        raise ConfigError(f"rollout.samples_per_prompt: the {config.ppo.advantage} estimator needs at least 2 (got {config.rollout.samples_per_prompt})")
    if config.ppo.skip_uniform_groups and config.rollout.samples_per_prompt < 2:
        raise ConfigError(f"ppo.skip_uniform_groups needs rollout.samples_per_prompt >= 2 (got {config.rollout.samples_per_prompt})")
    if config.roles.reference == "lora" and not config.model.lora.enabled:
        raise ConfigError("roles.reference: 'lora' needs model.lora.enabled (the reference is the actor with adapters disabled)")
    _validate_role_groups(config)
    if config.rollout.backend == "vllm":
        _validate_vllm_rollout(config)
    for name, value in (("rollout.samples_per_prompt", config.rollout.samples_per_prompt), ("rollout.max_new_tokens", config.rollout.max_new_tokens),
                        ("rollout.max_batch", config.rollout.max_batch), ("rollout.num_engines", config.rollout.num_engines),
                        ("ppo.ppo_epochs", config.ppo.ppo_epochs)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    sequences = config.trainer.global_batch_size * config.rollout.samples_per_prompt
    minibatch = config.ppo.minibatch_size or sequences
    if sequences % minibatch or minibatch % config.trainer.micro_batch_size:
        raise ConfigError(
            f"ppo.minibatch_size ({minibatch}) must divide the rollout batch (trainer.global_batch_size x rollout.samples_per_prompt = "
            f"{sequences} sequences) and be a multiple of trainer.micro_batch_size ({config.trainer.micro_batch_size})"
        )
    if config.ppo.clip_ratio <= 0 or config.rollout.temperature <= 0:
        raise ConfigError("ppo.clip_ratio and rollout.temperature must be > 0")
    if not config.ppo.recompute_old_logprobs and (config.ppo.ppo_epochs != 1 or minibatch != sequences or config.ppo.kl_in != "loss"):
        raise ConfigError(
            "ppo.recompute_old_logprobs: false needs ppo.ppo_epochs 1, one minibatch (ppo.minibatch_size 0) and ppo.kl_in loss "
            f"(got {config.ppo.ppo_epochs}, {config.ppo.minibatch_size}, {config.ppo.kl_in}): a later minibatch or epoch, or the "
            "reward's KL, needs the log-probs of the policy before the update"
        )


def _validate_vllm_rollout(config: PPOConfig) -> None:
    """ConfigError naming the first setting `rollout.backend: vllm` cannot serve (see
    `stema.rollout.vllm`): its log-probs are those of the truncated distribution under top-p /
    top-k; an in-process engine starts a torch.distributed group of its own, so it is one engine
    per process, and in the actor's process only when the actor is one process."""
    rollout, roles = config.rollout, config.roles
    for name, value, allowed in (("rollout.top_p", rollout.top_p, 1.0), ("rollout.top_k", rollout.top_k, 0)):
        if value != allowed:
            raise ConfigError(f"{name}: rollout.backend vllm reports log-probs of the top-p/top-k truncated distribution, "
                              f"not the full policy PPO's ratio needs; it needs {name} {allowed} (got {value})")
    if rollout.num_engines != 1:
        raise ConfigError(f"rollout.num_engines: rollout.backend vllm runs one in-process vLLM engine per process (it starts a "
                          f"torch.distributed group of its own); it needs rollout.num_engines 1 (got {rollout.num_engines}); "
                          "more engines: roles.rollout_workers with roles.placement disaggregated")
    if roles.placement == "colocated" and roles.actor_workers != 1:
        raise ConfigError(f"roles.actor_workers: rollout.backend vllm runs its in-process engine beside the trainer, which "
                          f"starts a torch.distributed group of its own, so not in {roles.actor_workers} actor ranks; with "
                          "several actor workers put the engines in the rollout role (roles.placement: disaggregated)")


def _validate_role_groups(config: PPOConfig) -> None:
    roles = config.roles
    if roles.rollout_workers < 1:
        raise ConfigError(f"roles.rollout_workers must be >= 1, got {roles.rollout_workers}")
    if roles.placement == "colocated" and roles.rollout_workers > 1:
        raise ConfigError(f"roles.rollout_workers: {roles.rollout_workers} rollout workers need roles.placement "
                          "disaggregated (colocated engines live in the actor's processes)")
    if roles.placement == "disaggregated":
        if roles.backend != "ray":
            raise ConfigError("roles.placement: 'disaggregated' puts the engines in Ray actors of their own; it needs roles.backend ray")
        if config.model.lora.enabled:
            raise ConfigError("roles.placement: 'disaggregated' does not refit LoRA policies yet (the buckets carry whole "
                              "weights, not merged adapters); use 'colocated' with model.lora")
    if roles.refit_bucket_mb <= 0:
        raise ConfigError(f"roles.refit_bucket_mb must be > 0, got {roles.refit_bucket_mb}")
    sequences = config.trainer.global_batch_size * config.rollout.samples_per_prompt
    for name, workers, lora in (("actor_workers", roles.actor_workers, config.model.lora.enabled),
                                ("critic_workers", roles.critic_workers, config.critic.lora.enabled)):
        if workers < 1:
            raise ConfigError(f"roles.{name} must be >= 1, got {workers}")
        if workers == 1:
            continue
        if roles.backend != "ray":
            raise ConfigError(f"roles.{name}: {workers} workers need roles.backend ray")
        if lora:
            raise ConfigError(f"roles.{name}: LoRA is not supported with several workers per role yet; use 1")
        if sequences % workers:
            raise ConfigError(f"roles.{name}: {workers} workers must divide the rollout batch (trainer.global_batch_size x "
                              f"rollout.samples_per_prompt = {sequences} sequences), each rank taking an equal share")


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def to_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def describe(cls: type, prefix: str = "", defaults: Any = None) -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, doc) for every leaf field: what `--help` lists. The defaults are
    those of `cls` itself, nested sections included (`GRPOConfig`'s ppo section, not PPO's)."""
    rows = []
    defaults = cls() if defaults is None else defaults
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        annotation = hints[item.name]
        value = getattr(defaults, item.name)
        if dataclasses.is_dataclass(annotation):
            rows.extend(describe(annotation, f"{prefix}{item.name}.", value))
            continue
        registry = registry_of(item)
        type_name = f"a registered {registry.kind}: {', '.join(registry.names())}" if registry is not None else _type_name(annotation)
        rows.append((f"{prefix}{item.name}", type_name, value, item.metadata.get("doc", "")))
    return rows
