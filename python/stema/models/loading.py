"""Loading and exporting Hugging Face models: policies, reward models, LoRA adapters.

Models come from a local folder only (`local_files_only=True` everywhere; STEMA never downloads)
or from the built-in tiny model, which is written once into a cache folder and then loaded like any
other checkpoint. Exports are ordinary Hugging Face folders (safetensors + tokenizer) written
atomically, so a crash never leaves a half-written model where a finished one is expected.

    model, tokenizer = load_policy(cfg.model, cache_dir=cache)
    reward_model, _ = load_reward_model(cfg.model, num_labels=1, cache_dir=cache, seed=cfg.trainer.seed)
    with disable_adapters(model):        # the LoRA policy's frozen base is the reference model
        reference_logits = model(**batch).logits
    export_hf(model, tokenizer, out / "hf")
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import torch

from stema.config import ConfigError, LoraConfig, ModelConfig
from stema.models import tiny

logger = logging.getLogger(__name__)

TINY = "tiny"
SCORE_HEAD = "score"  # the reward head's attribute in every supported family's *ForSequenceClassification


# ---------------------------------------------------------------------------------------------
# Paths and atomic folders
# ---------------------------------------------------------------------------------------------


def _new_temporary_folder(path: Path, tag: str) -> Path:
    """An empty folder `<path>.<tag>-XXXX` beside `path` (same file system, so renames are atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{path.name}.{tag}-", dir=path.parent))


@contextlib.contextmanager
def _atomic_folder(path: Path) -> Iterator[Path]:
    """Yields an empty temporary folder beside `path`; when the block succeeds the folder replaces
    `path` (a previous folder there is moved aside first, then deleted). On error it is removed."""
    staging = _new_temporary_folder(path, "tmp")
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if path.exists():
        previous = _new_temporary_folder(path, "old")
        os.replace(path, previous / path.name)
        os.replace(staging, path)
        shutil.rmtree(previous, ignore_errors=True)
    else:
        os.replace(staging, path)


def _write_tiny_model_once(target: Path) -> None:
    """Write the built-in tiny model into `target` unless it is already there. Concurrent callers
    (several ranks sharing a cache) each write a private copy; the first rename wins."""
    if (target / "config.json").is_file():
        return
    staging = _new_temporary_folder(target, "tmp")
    try:
        tiny.save_tiny_model(staging)
        os.rename(staging, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise ConfigError(
                f"model.path: could not write the built-in tiny model to {target}; "
                f"if an incomplete folder is there, remove it"
            ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def resolve_model_path(model_cfg: ModelConfig, *, cache_dir: str | Path) -> Path:
    """The local folder that `model_cfg.path` names.

    'tiny' writes the built-in tiny model into `cache_dir/tiny` the first time and returns that
    folder; any other value must be an existing folder holding a config.json.
    """
    if model_cfg.path == TINY:
        target = Path(cache_dir).expanduser() / TINY
        _write_tiny_model_once(target)
        return target
    path = Path(model_cfg.path).expanduser()
    if not path.is_dir():
        raise ConfigError(
            f"model.path: {path} is not a folder; give 'tiny' for the built-in model or a local "
            f"Hugging Face model folder (STEMA never downloads models)"
        )
    if not (path / "config.json").is_file():
        if (path / "adapter_config.json").is_file():
            raise ConfigError(
                f"model.path: {path} holds only LoRA adapters (adapter_config.json, no config.json); "
                f"give the base model folder, or export with model.lora.merge_on_export=true"
            )
        raise ConfigError(f"model.path: {path} has no config.json, so it is not a Hugging Face model folder")
    return path


WEIGHT_FILES = ("*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin")


def model_folders(config) -> list[tuple[str, str]]:
    """(dotted key, path) of every local model folder `config` names (the built-in 'tiny' and
    PPO's critic 'auto' are not folders)."""
    candidates = [("model.path", getattr(getattr(config, "model", None), "path", ""))]
    critic = getattr(config, "critic", None)
    if critic is not None:
        candidates.append(("critic.path", critic.path))
    reward = getattr(config, "reward", None)
    candidates.append(("reward.model", getattr(reward, "model", "")))
    return [(key, path) for key, path in candidates if path and path not in (TINY, "auto")]


def check_model_folder(key: str, path: str | Path) -> None:
    """A ConfigError naming `key` and the file unless `path` is a complete Hugging Face model
    folder: config.json that parses, a tokenizer that loads, weights. Loads no weights."""
    import json

    try:
        folder = resolve_model_path(ModelConfig(path=str(path)), cache_dir="").resolve()
    except ConfigError as error:
        raise ConfigError(str(error).replace("model.path:", f"{key}:", 1)) from None
    config_file = folder / "config.json"
    try:
        json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        where = f"{config_file}:{error.lineno}" if isinstance(error, json.JSONDecodeError) else str(config_file)
        raise ConfigError(f"{key}: {where}: not a valid config.json ({str(error).splitlines()[0]})") from None
    if not any(next(folder.glob(pattern), None) for pattern in WEIGHT_FILES):
        raise ConfigError(f"{key}: {folder} has no weights (model.safetensors, its index, or pytorch_model.bin)")
    try:
        load_tokenizer(folder)
    except ConfigError as error:
        raise ConfigError(str(error).replace("model.path:", f"{key}:", 1)) from None
    except Exception as error:  # transformers raises OSError, ValueError, TypeError, ... for a missing or broken tokenizer
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise ConfigError(f"{key}: {folder} has no usable tokenizer ({reason})") from None


def check_model_folders(config) -> None:
    """`check_model_folder` on every folder of `model_folders(config)`, before anything is written or loaded."""
    for key, path in model_folders(config):
        check_model_folder(key, path)


# ---------------------------------------------------------------------------------------------
# Tokenizer and models
# ---------------------------------------------------------------------------------------------


def load_tokenizer(path: str | Path):
    """The folder's tokenizer, right-padded for training; its EOS token doubles as the pad token
    when it has none (logged)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"model.path: the tokenizer in {path} has neither a pad token nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("tokenizer in %s has no pad token; padding with its EOS token %r", path, tokenizer.eos_token)
    tokenizer.padding_side = "right"
    return tokenizer


def _from_pretrained(auto_class, path: Path, model_cfg: ModelConfig, **options):
    """`auto_class.from_pretrained` from the local `path` in `model_cfg`'s dtype and attention
    implementation. Weights missing from the folder are initialized by transformers from the global
    RNG; that happens on a forked RNG so loading leaves the caller's seeded stream as it was."""
    with torch.random.fork_rng(devices=[]):
        return auto_class.from_pretrained(
            path,
            dtype=getattr(torch, model_cfg.dtype),
            attn_implementation=model_cfg.attn_implementation,
            local_files_only=True,
            **options,
        )


def _linear_module_names(model: torch.nn.Module) -> list[str]:
    """The distinct last name parts of the model's linear layers (what LoRA can target)."""
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, (torch.nn.Linear, Conv1D))})


def _add_lora(model: torch.nn.Module, lora_cfg: LoraConfig, *, task_type: str, modules_to_save: list[str] | None = None):
    """`model` wrapped by peft with LoRA adapters on `lora_cfg.target_modules`; all other weights
    frozen except `modules_to_save`. Every target must name at least one module (peft's own rule:
    a module matches when its full name equals the target or ends with '.<target>')."""
    import peft

    module_names = [name for name, _ in model.named_modules()]
    unmatched = [
        target
        for target in lora_cfg.target_modules
        if not any(name == target or name.endswith(f".{target}") for name in module_names)
    ]
    if unmatched:
        raise ConfigError(
            f"model.lora.target_modules: {', '.join(unmatched)} match no module of this "
            f"{model.config.model_type} model; its linear modules are: {', '.join(_linear_module_names(model))}"
        )
    config = peft.LoraConfig(
        task_type=task_type,
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=list(lora_cfg.target_modules),
        modules_to_save=modules_to_save,
    )
    return peft.get_peft_model(model, config)


def _prepare_for_training(model, model_cfg: ModelConfig, *, task_type: str, modules_to_save: list[str] | None = None):
    """Gradient checkpointing when asked, then LoRA when enabled; returns the (maybe wrapped) model."""
    if model_cfg.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input gradients, so it also works with a frozen base.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if model_cfg.lora.enabled:
        model = _add_lora(model, model_cfg.lora, task_type=task_type, modules_to_save=modules_to_save)
    return model


def load_policy(model_cfg: ModelConfig, *, cache_dir: str | Path):
    """(causal LM, tokenizer) for `model_cfg`: weights in `model_cfg.dtype`, its attention
    implementation, gradient checkpointing and LoRA adapters as configured."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(model_cfg, cache_dir=cache_dir)
    tokenizer = load_tokenizer(path)
    model = _from_pretrained(AutoModelForCausalLM, path, model_cfg)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model = _prepare_for_training(model, model_cfg, task_type="CAUSAL_LM")
    return model, tokenizer


def is_sequence_classifier(config) -> bool:
    """Whether a saved model's config (transformers' `PretrainedConfig`) is a sequence classifier's:
    a reward model with its trained head, not a causal LM."""
    return any(name.endswith("ForSequenceClassification") for name in (config.architectures or []))


def _check_saved_head(path: Path, num_labels: int) -> None:
    """A saved reward model must have the asked-for number of outputs (a causal LM has none yet)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if is_sequence_classifier(config) and config.num_labels != num_labels:
        raise ConfigError(
            f"model.path: {path} is a reward model with {config.num_labels} outputs, "
            f"but {num_labels} were asked for (reward.num_attributes)"
        )


def init_score_head(head: torch.nn.Linear, *, seed: int) -> None:
    """Fresh reward-head weights ~ N(0, 1/(hidden_size + 1)) from a fixed `seed`, bias zero.

    The scale follows Stiennon et al. 2020 (https://arxiv.org/abs/2009.01325, reward-head init
    from OpenAI's lm-human-preferences): initial rewards have about unit variance over normalized
    hidden states, whatever the hidden size. The global RNG is untouched.
    """
    generator = torch.Generator().manual_seed(seed)
    std = 1.0 / math.sqrt(head.in_features + 1)
    with torch.no_grad():
        weight = torch.randn(head.weight.shape, generator=generator, dtype=torch.float32) * std
        head.weight.copy_(weight)
        if head.bias is not None:
            head.bias.zero_()


def load_reward_model(model_cfg: ModelConfig, *, num_labels: int, cache_dir: str | Path, seed: int = 0):
    """(sequence classifier with `num_labels` outputs, tokenizer) for `model_cfg`.

    From a causal-LM folder the `score` head [num_labels, hidden] is new and initialized by
    `init_score_head(seed=seed)`; from a saved reward model it is loaded. `config.pad_token_id` is
    set to the tokenizer's pad token, which makes the model pool the last non-pad token of each row
    (with EOS as pad, trailing EOS tokens count as padding). With LoRA the head stays fully
    trainable (peft `modules_to_save`).
    """
    from transformers import AutoModelForSequenceClassification

    path = resolve_model_path(model_cfg, cache_dir=cache_dir)
    tokenizer = load_tokenizer(path)
    _check_saved_head(path, num_labels)
    from transformers.utils import logging as transformers_logging

    # transformers reports the new head as "MISSING" on every load from a causal LM; STEMA checks
    # the loading info itself below, so silence that report for this one call.
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        model, loading_info = _from_pretrained(
            AutoModelForSequenceClassification, path, model_cfg, num_labels=num_labels, output_loading_info=True
        )
    finally:
        transformers_logging.set_verbosity(verbosity)
    missing_backbone = [key for key in loading_info["missing_keys"] if not key.startswith(f"{SCORE_HEAD}.")]
    if missing_backbone:
        raise ConfigError(
            f"model.path: {path} lacks {len(missing_backbone)} backbone weight(s) the reward model needs "
            f"(first: {missing_backbone[:3]}); they would start random"
        )
    head = getattr(model, SCORE_HEAD, None)
    if not isinstance(head, torch.nn.Linear):
        raise ConfigError(
            f"model.path: {type(model).__name__} from {path} has no linear '{SCORE_HEAD}' head; "
            f"STEMA's reward models need one (Llama, Qwen2, Mistral, GPT-2, Gemma and Phi-3 have it)"
        )
    if any(key.startswith(f"{SCORE_HEAD}.") for key in loading_info["missing_keys"]):
        init_score_head(head, seed=seed)
        logger.info("reward head '%s' %s is new: initialized with seed %d", SCORE_HEAD, list(head.weight.shape), seed)
    model.config.pad_token_id = tokenizer.pad_token_id
    model = _prepare_for_training(model, model_cfg, task_type="SEQ_CLS", modules_to_save=[SCORE_HEAD])
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# LoRA helpers and export
# ---------------------------------------------------------------------------------------------


def is_lora_model(model: torch.nn.Module) -> bool:
    """Whether `model` is wrapped by peft. A peft model exists only once peft is imported, so
    plain models are told apart without importing it."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def unwrap_lora(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside a peft wrapper (adapters still in place), or `model` itself."""
    return model.get_base_model() if is_lora_model(model) else model


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Inside the block `model` is in eval mode (no dropout); afterwards it is back in the mode it
    was in, also when the block raises."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextlib.contextmanager
def disable_adapters(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Inside the block the LoRA `model` computes as its frozen base model (peft's
    `disable_adapter()`; `modules_to_save` copies fall back to the originals too), which serves as
    the DPO/PPO reference model without a second copy of the weights."""
    if not is_lora_model(model):
        raise ValueError(
            "disable_adapters needs a LoRA (peft) model; without LoRA the reference model must be a separate frozen copy"
        )
    with model.disable_adapter():
        yield model


def export_hf(model: torch.nn.Module, tokenizer, path: str | Path, *, merge_lora: bool = True) -> Path:
    """Write `model` and `tokenizer` as a Hugging Face folder at `path` (replacing one there) and
    return the path. The folder is written beside `path` and renamed into place when complete.

    A LoRA model is merged into its base weights on a copy (the trained model is unchanged and
    training can go on; it costs one more copy of the weights in memory), so the folder loads with
    `AutoModelForCausalLM` / `AutoModelForSequenceClassification`. With `merge_lora=False` the
    folder holds the adapters only (peft's adapter_config.json + adapter_model.safetensors,
    including a reward model's trained head), loaded with `peft.PeftModel.from_pretrained(base, path)`.
    """
    path = Path(path)
    if is_lora_model(model) and merge_lora:
        model = copy.deepcopy(model).merge_and_unload()
    with _atomic_folder(path) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return path
