"""Pipeline parallel on `torch.distributed.pipelining`: the decoder layers of a Hugging Face causal
LM split into stages over the mesh's "pp" dimension, composed with tensor parallel ("tp") and
FSDP2 ("dp") inside each stage.

    check_pipeline_config(config, command="sft")      # before any process group: ConfigError
    model = place_pipeline(model, world, config.distributed, microbatches=4, length=512)  # this rank's stages, HF names kept
    totals = model.pipeline.train_step(batches, loss_of=...)   # one schedule step, gradients summed

One seam per model family (`PIPELINE_SEAMS`, registered by `register_pipeline_seam`): each stage
runs its own decoder layers with its own rotary embeddings and causal mask (built from the
sequence length alone: the batches are right-padded, so positions past a sequence's end never
reach its tokens), the embedding on the first stage, the final norm and LM head on the last.

A rank holds one stage (gpipe, 1f1b) or two (interleaved_1f1b: stages r and r + pp_size). Its
parameters live in one `PipelineRankModel` whose names are the Hugging Face model's
(`model.layers.5.mlp.up_proj.weight`, `lm_head.weight`), so a `torch.distributed.checkpoint`
written at one (dp, tp, pp) layout loads at any other, and the optimizer, gradient clipping and
Hugging Face export see one module per rank.

Loss denominators stay global: every micro-batch's loss is already divided by the whole global
batch's count (tokens, pairs), so the schedules run with `scale_grads=False` (their default
divides the gradients by the number of micro-batches, for mean-reduced losses) and the summed
micro-batch gradients are the full-batch gradient.

Sequences are right-padded to one fixed length (`data.max_length`): the stages exchange
activations through buffers of a fixed shape, given up front (static shapes, no shape inference).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch

from stema.config import ConfigError
from stema.models.loading import SCORE_HEAD

from .world import World

# family -> function(config, hidden [B, T, H], positions [1, T]) -> (layer index -> attention mask)
PIPELINE_SEAMS: dict[str, Callable[..., Callable[[int], Any]]] = {}

# commands whose training loss can be computed from the last stage's outputs (loss_from_logits)
PIPELINE_COMMANDS = ("sft", "dpo", "kto", "steerlm", "rm")
# commands whose trainable models live in Ray role groups, the stages inside each group's world
ROLE_GROUP_COMMANDS = ("ppo", "grpo")


def register_pipeline_seam(family: str) -> Callable:
    """Register the causal-mask builder of a model family's pipeline stages."""

    def register(builder: Callable) -> Callable:
        PIPELINE_SEAMS[family] = builder
        return builder

    return register


def _full_causal(config, hidden, positions):
    from transformers.masking_utils import create_causal_mask

    return create_causal_mask(config=config, inputs_embeds=hidden, attention_mask=None, cache=None, position_ids=positions)


def _sliding_causal(config, hidden, positions):
    from transformers.masking_utils import create_sliding_window_causal_mask

    return create_sliding_window_causal_mask(
        config=config, inputs_embeds=hidden, attention_mask=None, cache=None, position_ids=positions
    )


@register_pipeline_seam("llama")
def llama_masks(config, hidden: torch.Tensor, positions: torch.Tensor) -> Callable[[int], Any]:
    """Llama: one causal mask for every layer (as `LlamaModel.forward`)."""
    mask = _full_causal(config, hidden, positions)
    return lambda index: mask


@register_pipeline_seam("mistral")
def mistral_masks(config, hidden: torch.Tensor, positions: torch.Tensor) -> Callable[[int], Any]:
    """Mistral: a sliding-window causal mask for every layer when `sliding_window` is set, else causal."""
    mask = (_full_causal if config.sliding_window is None else _sliding_causal)(config, hidden, positions)
    return lambda index: mask


@register_pipeline_seam("qwen2")
def qwen2_masks(config, hidden: torch.Tensor, positions: torch.Tensor) -> Callable[[int], Any]:
    """Qwen2: each layer's mask by its `layer_types` entry (full or sliding-window attention)."""
    builders = {"full_attention": _full_causal, "sliding_attention": _sliding_causal}
    masks = {kind: builders[kind](config, hidden, positions) for kind in set(config.layer_types)}
    return lambda index: masks[config.layer_types[index]]


def stage_layers(num_layers: int, num_stages: int) -> list[range]:
    """Consecutive decoder layers of each stage, as even as possible (the first stages take one
    more when the count does not divide: the last stage also carries the LM head and the loss)."""
    if num_stages > num_layers:
        raise ValueError(f"{num_stages} pipeline stages need at least as many decoder layers, got {num_layers}")
    base, extra = divmod(num_layers, num_stages)
    bounds = [0]
    for stage in range(num_stages):
        bounds.append(bounds[-1] + base + (1 if stage < extra else 0))
    return [range(start, stop) for start, stop in zip(bounds, bounds[1:])]


def stages_per_rank(schedule: str) -> int:
    return 2 if schedule == "interleaved_1f1b" else 1


def pipeline_microbatches(distributed_cfg: Any, trainer_cfg: Any, *, dp_size: int) -> int:
    """Micro-batches per step on each data-parallel rank: `pp_microbatches`, or the rank's share
    of the global batch in `micro_batch_size` pieces."""
    per_rank = trainer_cfg.global_batch_size // dp_size
    return distributed_cfg.pp_microbatches or max(1, per_rank // trainer_cfg.micro_batch_size)


def _model_config(model_cfg: Any):
    """The Hugging Face config of `model.path` (read from its folder; the built-in tiny model's
    from its builder), without loading weights."""
    if model_cfg.path == "tiny":
        from stema.models import tiny

        return tiny.build_config(tiny.TinyModelSpec(), tiny.build_tokenizer())
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_cfg.path)


def check_pipeline_config(config: Any, *, command: str, world_size: int | None = None) -> None:
    """ConfigError naming the keys when `distributed.pp_size > 1` cannot run: a split that does not
    divide the world or the batch, a command, LoRA, packing or a model family
    without a seam, tied embeddings, too few layers for the stages. Reads only the config and the
    model's config.json: call it before any process-group work."""
    dist_cfg = config.distributed
    if dist_cfg.pp_size == 1:
        return
    pp = dist_cfg.pp_size
    if command in ROLE_GROUP_COMMANDS:
        _check_role_group_pipeline(config)
        return
    if command not in PIPELINE_COMMANDS:
        raise ConfigError(f"distributed.pp_size={pp}: stema {command} does not run pipeline stages (supported: "
                          f"{', '.join(PIPELINE_COMMANDS + ROLE_GROUP_COMMANDS)}); use pp_size 1")
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    if world_size % (pp * dist_cfg.tp_size):
        raise ConfigError(f"distributed.pp_size={pp} x distributed.tp_size={dist_cfg.tp_size} must divide the world size "
                          f"{world_size} (torchrun --nproc_per_node)")
    _check_pipeline_settings(config)
    _check_pipeline_model(config, config.model, uses_lm_head=command != "rm")
    _check_pipeline_batches(config, dp_size=world_size // (pp * dist_cfg.tp_size))


def _check_role_group_pipeline(config: Any) -> None:
    """PPO / GRPO: the stages run inside the actor's (and the critic's) Ray role group, whose
    ranks must be a multiple of pp_size x tp_size (several workers, so no LoRA: the config
    refuses LoRA groups); STEMA's engines, colocated; micro-batches from the minibatch
    (`stema.training.ppo_update.ppo_pipeline_microbatches`)."""
    from stema.losses.advantages import needs_critic

    dist_cfg, roles = config.distributed, config.roles
    pp, model_parallel = dist_cfg.pp_size, dist_cfg.pp_size * dist_cfg.tp_size
    groups = {"actor_workers": (roles.actor_workers, config.model, True)}
    if needs_critic(config.ppo.advantage):
        critic_path = config.critic.path if config.critic.path != "auto" else (config.reward.model or config.model.path)
        groups["critic_workers"] = (roles.critic_workers, type(config.critic)(path=critic_path), False)
    for name, (workers, model_cfg, uses_lm_head) in groups.items():
        if roles.backend != "ray" or workers % model_parallel:
            raise ConfigError(f"roles.{name}: distributed.pp_size={pp} x distributed.tp_size={dist_cfg.tp_size} runs the "
                              f"stages inside a Ray role group; roles.{name} ({workers}) must be a multiple of it with "
                              f"roles.backend ray (got {roles.backend})")
        key = "model.path" if name == "actor_workers" else "critic.path"
        _check_pipeline_model(config, model_cfg, uses_lm_head=uses_lm_head, key=key)
    if config.rollout.backend != "stema":
        raise ConfigError(f"rollout.backend: with distributed.pp_size={pp} every actor rank generates with STEMA's engine, "
                          f"refit from the stages; got {config.rollout.backend!r}")
    if roles.placement != "colocated":
        raise ConfigError(f"roles.placement: with distributed.pp_size={pp} the actor's ranks refit their own engines "
                          "(colocated); disaggregated rollout workers are not refit from pipeline stages")
    if dist_cfg.pp_microbatches:
        raise ConfigError(f"distributed.pp_microbatches: PPO's stages run each minibatch in trainer.micro_batch_size rows "
                          f"per micro-batch (got {dist_cfg.pp_microbatches}); leave it 0")


def _check_pipeline_settings(config: Any) -> None:
    """What the stages cannot carry: LoRA, packing, a live DPO reference."""
    pp = config.distributed.pp_size
    if config.model.lora.enabled:
        raise ConfigError(f"model.lora: LoRA is not supported with pipeline parallel (distributed.pp_size={pp}); use pp_size 1")
    if config.data.packing:
        raise ConfigError(f"data.packing: packed rows need their own attention masks, which pipeline stages do not pass on "
                          f"(distributed.pp_size={pp}); turn packing off")
    preference = getattr(config, "preference", None)
    if preference is not None and preference.loss != "simpo" and not preference.precompute_ref_logprobs:
        raise ConfigError(f"preference.precompute_ref_logprobs: with distributed.pp_size={pp} the reference log-probs are "
                          "computed once through the reference's stages before training; set it to true")


def _check_pipeline_model(config: Any, model_cfg: Any, *, uses_lm_head: bool, key: str = "model.path") -> None:
    """A family with a seam, untied embeddings (when the LM head trains), at least a decoder layer
    per stage, for the model of `model_cfg` (named `key` in the errors)."""
    dist_cfg = config.distributed
    pp = dist_cfg.pp_size
    model_config = _model_config(model_cfg)
    family = model_config.model_type
    if family not in PIPELINE_SEAMS:
        raise ConfigError(f"distributed.pp_size={pp}: {key} {model_cfg.path} is a {family!r} model; pipeline stages "
                          f"exist for {', '.join(sorted(PIPELINE_SEAMS))}")
    if uses_lm_head and getattr(model_config, "tie_word_embeddings", False):
        raise ConfigError(f"{key}: {model_cfg.path} ties its input and output embeddings, which the first and last "
                          f"pipeline stages hold on different ranks; distributed.pp_size={pp} needs untied embeddings")
    stages = pp * stages_per_rank(dist_cfg.pp_schedule)
    if model_config.num_hidden_layers < stages:
        raise ConfigError(f"distributed.pp_schedule={dist_cfg.pp_schedule} with distributed.pp_size={pp} makes {stages} stages, "
                          f"more than the model's {model_config.num_hidden_layers} decoder layers")


def _check_pipeline_batches(config: Any, *, dp_size: int) -> None:
    """Micro-batches that divide each data-parallel rank's share (a multiple of pp_size when interleaved)."""
    dist_cfg, trainer = config.distributed, config.trainer
    pp = dist_cfg.pp_size
    per_rank, remainder = divmod(trainer.global_batch_size, dp_size)
    microbatches = pipeline_microbatches(dist_cfg, trainer, dp_size=dp_size)
    if remainder or per_rank % microbatches:
        raise ConfigError(f"distributed.pp_microbatches: {microbatches} micro-batches must divide each data-parallel rank's "
                          f"share of trainer.global_batch_size ({trainer.global_batch_size} over {dp_size} ranks)")
    if dist_cfg.pp_schedule == "interleaved_1f1b" and microbatches % pp:
        raise ConfigError(f"distributed.pp_microbatches: interleaved_1f1b needs a multiple of distributed.pp_size={pp} "
                          f"micro-batches, got {microbatches}")


class StageView(torch.nn.Module):
    """One pipeline stage's forward over modules that its rank's `PipelineRankModel` owns:
    token ids `[B, T]` (first stage) or hidden states `[B, T, H]` in; hidden states, or the
    head's outputs at every position (last stage: logits `[B, T, V]`, or a reward model's scores
    `[B, T, k]`) out."""

    def __init__(self, backbone: torch.nn.Module, head: torch.nn.Module | None, *, layers: range, first: bool, last: bool,
                 config: Any, masks: Callable):
        super().__init__()
        self.embed_tokens = backbone.embed_tokens if first else None
        self.layers = torch.nn.ModuleDict({str(index): backbone.layers[str(index)] for index in layers})
        self.norm = backbone.norm if last else None
        self.head = head if last else None
        self.rotary_emb = backbone.rotary_emb
        self.config = config
        self.masks = masks

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(inputs) if self.embed_tokens is not None else inputs  # [B, T, H]
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)  # [1, T]
        position_embeddings = self.rotary_emb(hidden, position_ids=positions)
        mask_of = self.masks(self.config, hidden, positions)
        for index, layer in self.layers.items():
            hidden = layer(hidden, attention_mask=mask_of(int(index)), position_ids=positions,
                           position_embeddings=position_embeddings)
        if self.head is None:
            return hidden
        return self.head(self.norm(hidden))  # [B, T, V] or [B, T, k]


class PipelineRankModel(torch.nn.Module):
    """The parameters of one rank's pipeline stages under the Hugging Face model's names: the
    backbone (`model`: embedding if this rank holds the first stage, its decoder layers in a
    ModuleDict keyed by their layer index, final norm if it holds the last) and the head (a causal
    LM's `lm_head`, a sequence classifier's `score`) if it holds the last.

    Attributes:
        stages: the `StageView`s of this rank, in stage order (they share these modules).
        stage_indices: their stage numbers.
        num_stages: stages in the whole pipeline.
        causal_lm_class, config, generation_config: what the Hugging Face export rebuilds.
        pipeline: the `Pipeline` that runs the schedule (set by `place_pipeline`).
    """

    def __init__(self, causal_lm: torch.nn.Module, *, stage_indices: list[int], num_stages: int):
        super().__init__()
        from .parallelize import backbone_of

        family = causal_lm.config.model_type
        backbone = backbone_of(causal_lm)
        layers = stage_layers(len(backbone.layers), num_stages)
        mine = [index for stage in stage_indices for index in layers[stage]]
        backbone.layers = torch.nn.ModuleDict({str(index): backbone.layers[index] for index in mine})
        first, last = 0 in stage_indices, num_stages - 1 in stage_indices
        if not first:
            backbone.embed_tokens = None
        if not last:
            backbone.norm = None
        self.base_model_prefix = causal_lm.base_model_prefix
        setattr(self, self.base_model_prefix, backbone)
        self.head_name = "lm_head" if causal_lm.get_output_embeddings() is not None else SCORE_HEAD
        head = getattr(causal_lm, self.head_name)
        setattr(self, self.head_name, head if last else None)
        self.head_outputs = head.out_features
        self.config = causal_lm.config
        self.causal_lm_class = type(causal_lm)
        self.generation_config = getattr(causal_lm, "generation_config", None)
        self.stage_indices = list(stage_indices)
        self.num_stages = num_stages
        self.stages = [
            StageView(backbone, head, layers=layers[stage], first=stage == 0, last=stage == num_stages - 1,
                      config=causal_lm.config, masks=PIPELINE_SEAMS[family])
            for stage in stage_indices
        ]
        self.pipeline: Pipeline | None = None

    def stage_of(self, name: str) -> int:
        """The stage that holds the weight `name` (a Hugging Face name): the embedding the first,
        a decoder layer's weights its layer's stage, the final norm and the head the last."""
        prefix = f"{self.base_model_prefix}.layers."
        if name.startswith(prefix):
            layer = int(name[len(prefix):].split(".", 1)[0])
            ranges = stage_layers(self.config.num_hidden_layers, self.num_stages)
            return next(stage for stage, layers in enumerate(ranges) if layer in layers)
        return 0 if name.startswith(f"{self.base_model_prefix}.embed_tokens.") else self.num_stages - 1

    def get_input_embeddings(self) -> torch.nn.Module | None:
        return getattr(self, self.base_model_prefix).embed_tokens

    def get_output_embeddings(self) -> torch.nn.Module | None:
        return getattr(self, "lm_head", None)

    def forward(self, *args, **kwargs):
        raise RuntimeError("a pipeline rank's model runs through its Pipeline (train_step), not by calling it")


def is_pipelined(model: torch.nn.Module) -> bool:
    return isinstance(model, PipelineRankModel)


def pad_batch(batch: dict[str, torch.Tensor], length: int, *, pad_id: int) -> dict[str, torch.Tensor]:
    """Every `[rows, T]` tensor of a collated batch right-padded to `[rows, length]`: input ids
    with `pad_id` (a reward model reads each row at its last non-pad token; causal attention keeps
    padding out of the earlier positions), attention masks with 0, labels with -100 (no loss)."""
    width = batch["input_ids"].shape[1]
    if width > length:
        raise ValueError(f"a micro-batch has {width} tokens per row, more than data.max_length={length} that the pipeline stages exchange")
    values = {"labels": -100, "input_ids": pad_id}
    padded = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[1] == width:
            value = torch.nn.functional.pad(value, (0, length - width), value=values.get(key, 0))
        padded[key] = value
    return padded


class Pipeline:
    """The schedule of one rank's stages: `train_step` runs a step's micro-batches through it.

    Stages and schedule are built at the first step, when the micro-batch rows are known; the
    activations exchanged are `[rows, length, hidden]` in the model's dtype."""

    def __init__(self, model: PipelineRankModel, *, world: World, schedule: str, microbatches: int, length: int):
        self.model = model
        self.world = world
        self.schedule_name = schedule
        self.microbatches = microbatches
        self.length = length
        self.pad_id = model.config.pad_token_id or 0
        self._schedule = None
        self._step_batches: list[dict[str, torch.Tensor]] = []
        self._loss_of: Callable | None = None
        self._totals: dict[str, float] = {}

    @property
    def is_first(self) -> bool:
        return 0 in self.model.stage_indices

    @property
    def is_last(self) -> bool:
        return self.model.num_stages - 1 in self.model.stage_indices

    def _build(self, rows: int) -> None:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

        config = self.model.config
        dtype = next(p for p in self.model.parameters()).dtype
        # requires_grad: the activations' gradients travel back between the stages
        hidden = torch.empty(rows, self.length, config.hidden_size, dtype=dtype, device="meta", requires_grad=True)
        logits = torch.empty(rows, self.length, self.model.head_outputs, dtype=dtype, device="meta", requires_grad=True)
        token_ids = torch.empty(rows, self.length, dtype=torch.long, device="meta")
        group = self.world.mesh["pp"].get_group()
        stages = [
            PipelineStage(view, index, self.model.num_stages, self.world.device,
                          input_args=token_ids if index == 0 else hidden,
                          output_args=logits if index == self.model.num_stages - 1 else hidden, group=group)
            for view, index in zip(self.model.stages, self.model.stage_indices)
        ]
        if self.schedule_name == "interleaved_1f1b":
            self._schedule = ScheduleInterleaved1F1B(stages, self.microbatches, loss_fn=self._loss, scale_grads=False)
        else:
            schedule_class = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[self.schedule_name]
            self._schedule = schedule_class(stages[0], self.microbatches, loss_fn=self._loss, scale_grads=False)

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The schedule's loss function: `target` holds the micro-batch's index into this step's batches."""
        loss, metrics = self._loss_of(logits, self._step_batches[int(target[0])])
        totals = self._totals
        totals["loss"] = totals.get("loss", 0.0) + loss.item()
        for key, value in metrics.items():
            totals[key] = totals.get(key, 0.0) + float(value)
        return loss

    def train_step(self, batches: list[dict[str, torch.Tensor]], *, loss_of: Callable, context: Any) -> dict[str, float]:
        """Forward and backward of this data-parallel rank's `batches` (one per micro-batch, on the
        device) through the schedule; `loss_of(logits, batch)` -> (loss, metrics) on the last
        stage. Returns the summed loss and metrics (on the last stage; {} elsewhere)."""
        if len(batches) != self.microbatches:
            raise ValueError(f"the pipeline runs {self.microbatches} micro-batches per step, got {len(batches)}")
        batches = [pad_batch(batch, self.length, pad_id=self.pad_id) for batch in batches]
        if self._schedule is None:
            self._build(batches[0]["input_ids"].shape[0])
        self._step_batches, self._loss_of, self._totals = batches, loss_of, {}
        args = (torch.cat([batch["input_ids"] for batch in batches]),) if self.is_first else ()
        target = torch.arange(len(batches), device=self.world.device) if self.is_last else None
        with context:
            self._schedule.step(*args, target=target, return_outputs=False)
        totals, self._step_batches, self._loss_of = self._totals, [], None
        return totals

    @torch.no_grad()
    def forward_only(self, batches: list[dict[str, torch.Tensor]], *, output_of: Callable) -> list[Any]:
        """`output_of(logits, batch)` of each batch (on the device), run through the stages one
        micro-batch after the other without gradients (point-to-point sends over the pipeline
        group); the last stage broadcasts the results (which must pickle: CPU tensors, floats) to
        its pipeline group. Used for reference log-probs and evaluation."""
        import torch.distributed as dist

        group = self.world.mesh["pp"].get_group()
        ranks = dist.get_process_group_ranks(group)
        views = dict(zip(self.model.stage_indices, self.model.stages))
        last = self.model.num_stages - 1
        dtype = next(iter(self.model.parameters())).dtype
        results = []
        for batch in batches:
            batch = pad_batch(batch, self.length, pad_id=self.pad_id)
            shape = (batch["input_ids"].shape[0], self.length, self.model.config.hidden_size)
            activation = batch["input_ids"]
            for stage, view in views.items():
                previous, following = ranks[(stage - 1) % len(ranks)], ranks[(stage + 1) % len(ranks)]
                if stage > 0 and previous != self.world.rank:
                    activation = torch.empty(shape, dtype=dtype, device=self.world.device)
                    dist.recv(activation, src=previous, group=group)
                activation = view(activation)
                if stage < last and following != self.world.rank:
                    dist.send(activation.contiguous(), dst=following, group=group)
            if self.is_last:
                results.append(output_of(activation, batch))
        holder = [results if self.is_last else None]
        dist.broadcast_object_list(holder, src=ranks[-1], group=group)
        return holder[0]

    def gathered_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model's state dict (CPU tensors, Hugging Face names) on rank 0, None on the
        others: each stage's shards gathered within its dp x tp group, then the stages' parts
        gathered to rank 0 (a collective over the world)."""
        import torch.distributed as dist

        from .role_model import whole_tensor

        part = {name: whole_tensor(tensor).cpu() for name, tensor in self.model.state_dict().items()}
        holds_stage = self.world.rank % (self.world.dp_size * self.world.tp_size) == 0  # dp and tp coordinate 0
        parts = [None] * self.world.world_size if self.world.rank == 0 else None
        dist.gather_object(part if holds_stage else None, parts, dst=0)
        if parts is None:
            return None
        return {name: tensor for stage_part in parts if stage_part for name, tensor in stage_part.items()}


def place_pipeline(model: torch.nn.Module, world: World, dist_cfg: Any, *, microbatches: int, length: int) -> PipelineRankModel:
    """This rank's stages of `model` (a Hugging Face causal LM or sequence classifier loaded whole
    on every rank), tensor parallel and FSDP2 inside each stage as `dist_cfg` (a
    `DistributedConfig`) asks, with the `Pipeline` that runs `microbatches` micro-batches per step,
    every row right-padded to `length` tokens. Every rank of the world calls it."""
    from .parallelize import apply_tensor_parallel, shard_with_fsdp

    per_rank = stages_per_rank(dist_cfg.pp_schedule)
    num_stages = dist_cfg.pp_size * per_rank
    stage_indices = [world.pp_rank + k * dist_cfg.pp_size for k in range(per_rank)]
    rank_model = PipelineRankModel(model.to(world.device), stage_indices=stage_indices, num_stages=num_stages)
    if world.tp_size > 1:
        apply_tensor_parallel(rank_model, world.mesh["tp"])
    shard_with_fsdp(rank_model, mesh=world.mesh, roots=rank_model.stages, mixed_precision=dist_cfg.mixed_precision,
                    cpu_offload=dist_cfg.cpu_offload)
    rank_model.pipeline = Pipeline(rank_model, world=world, schedule=dist_cfg.pp_schedule, length=length, microbatches=microbatches)
    return rank_model

