"""EngineRefitter: the engine follows the trainer's weights in place (fused views, dtype casts,
LoRA merged), with one plan built once and buffers that never move."""

from __future__ import annotations

import pytest
import torch

from stema.models.families import build_family_model
from stema.models.tiny import build_tokenizer
from stema.rollout import BucketedRefitter, EngineRefitter, GenerationEngine, SamplingParams

from tiny_models import scramble

PROMPTS = [[5, 17, 30], [40, 41, 42, 43, 44, 45], [90]]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The engine multiplies by the merged W + s B A, peft computes x W + s (x A) B: other roundings.
LORA_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def train_one_step(model: torch.nn.Module, *, lr: float = 0.05) -> None:
    """One AdamW step of next-token loss on a fixed batch (parameters updated in place)."""
    input_ids = torch.tensor([[5, 17, 30, 40, 41, 42, 43, 44], [60, 9, 70, 12, 80, 33, 90, 91]])
    model.train()
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr)
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.eval()


def addresses(engine: GenerationEngine) -> dict[str, int]:
    return {name: tensor.data_ptr() for name, tensor in engine.buffers().items()}


def assert_engine_matches(engine: GenerationEngine, model: torch.nn.Module, *, tolerance: float = 1e-5) -> None:
    input_ids = torch.tensor([[5, 17, 30, 40, 41, 42, 43, 44, 45]])
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
    torch.testing.assert_close(engine.forward(input_ids).float(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_refit_after_a_training_step_in_place(family, tokenizer):
    model = scramble(build_family_model(family, tokenizer=tokenizer), seed=1)
    engine = GenerationEngine.from_hf(model, max_batch=4, max_total_len=32)
    refitter = EngineRefitter(engine, model)
    before = addresses(engine)
    train_one_step(model)
    with pytest.raises(AssertionError):  # the step changed the model; the engine still has the old weights
        assert_engine_matches(engine, model)
    refitter.refit()
    assert_engine_matches(engine, model)
    params = SamplingParams(temperature=0, max_new_tokens=8, eos_token_ids=())
    refitted = engine.generate(PROMPTS, params).token_ids
    assert refitted == GenerationEngine.from_hf(model, max_batch=4, max_total_len=32).generate(PROMPTS, params).token_ids
    train_one_step(model)
    refitter.refit()
    assert_engine_matches(engine, model)
    assert addresses(engine) == before


def test_mapping_covers_every_trainer_weight_once(tokenizer):
    for family in ("llama", "mistral"):  # tied and untied lm_head
        model = build_family_model(family, tokenizer=tokenizer)
        refitter = EngineRefitter(GenerationEngine.from_hf(model, max_batch=1, max_total_len=8), model)
        names = [entry.hf_name for entry in refitter.mapping]
        assert sorted(names) == sorted(name for name, _ in model.named_parameters())
        assert len(refitter.plan) == len(names) and not refitter.lora_merges
    slots = {entry.hf_name: entry.engine_slot for entry in refitter.mapping}
    assert slots["model.layers.1.self_attn.k_proj.weight"] == "qkv_weight[1, 32:48]"
    assert slots["model.layers.0.mlp.up_proj.weight"] == "gate_up_weight[0, 64:128]"


def test_refit_casts_into_a_bf16_engine(tokenizer):
    model = scramble(build_family_model("qwen2", tokenizer=tokenizer), seed=2)
    engine = GenerationEngine.from_hf(model, dtype=torch.bfloat16, max_batch=2, max_total_len=16)
    refitter = EngineRefitter(engine, model)
    train_one_step(model)
    refitter.refit()
    q_rows = model.model.layers[0].self_attn.q_proj.weight.shape[0]
    assert torch.equal(engine.weights.qkv_weight[0, :q_rows], model.model.layers[0].self_attn.q_proj.weight.bfloat16())
    assert torch.equal(engine.weights.qkv_bias[0, :q_rows], model.model.layers[0].self_attn.q_proj.bias.bfloat16())
    assert torch.equal(engine.weights.embed, model.model.embed_tokens.weight.bfloat16())
    assert_engine_matches(engine, model, tolerance=0.25)
    assert engine.generate(PROMPTS, SamplingParams(max_new_tokens=4, seed=0)).token_ids


def lora_model(family: str, tokenizer, *, seed: int, modules_to_save: list[str] | None = None):
    """A peft LoRA model on every linear layer, with nonzero B so the adapters matter from the start."""
    import peft

    base = scramble(build_family_model(family, tokenizer=tokenizer), seed=seed)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS,
                                                      lora_dropout=0.0, modules_to_save=modules_to_save))
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def test_lora_refit_uses_the_merged_weights(tokenizer):
    model = lora_model("llama", tokenizer, seed=3)
    engine = GenerationEngine.from_hf(model, max_batch=2, max_total_len=16)
    with model.disable_adapter(), pytest.raises(AssertionError):  # the adapters change the logits
        assert_engine_matches(engine, model, tolerance=LORA_TOLERANCE)
    assert_engine_matches(engine, model, tolerance=LORA_TOLERANCE)
    refitter = EngineRefitter(engine, model)
    assert len(refitter.lora_merges) == 2 * len(LORA_TARGETS)
    engine_storages = {tensor.untyped_storage().data_ptr() for tensor in engine.buffers().values()}
    # fp32 trainer and engine: each merge writes straight into the engine's fused view
    assert {merge.target.untyped_storage().data_ptr() for merge in refitter.lora_merges} <= engine_storages
    before = addresses(engine)
    train_one_step(model)
    refitter.refit()
    assert_engine_matches(engine, model, tolerance=LORA_TOLERANCE)
    with model.disable_adapter():
        refitter.refit()
        assert_engine_matches(engine, model, tolerance=LORA_TOLERANCE)
    refitter.refit()
    assert_engine_matches(engine, model, tolerance=LORA_TOLERANCE)
    assert addresses(engine) == before


def test_lora_merges_into_dtype_buffers_for_a_bf16_engine(tokenizer):
    model = lora_model("qwen2", tokenizer, seed=4)
    engine = GenerationEngine.from_hf(model, dtype=torch.bfloat16, max_batch=2, max_total_len=16)
    refitter = EngineRefitter(engine, model)
    merge_targets = {merge.target.dtype for merge in refitter.lora_merges}
    assert merge_targets == {torch.float32}  # fp32 merge buffers, cast into the engine by the plan
    buffer_addresses = [merge.target.data_ptr() for merge in refitter.lora_merges]
    train_one_step(model)
    refitter.refit()
    effective = model.base_model.model.model.layers[1].mlp.down_proj
    expected = effective.base_layer.weight + effective.scaling["default"] * (
        effective.lora_B["default"].weight @ effective.lora_A["default"].weight)
    torch.testing.assert_close(engine.weights.down_weight[1], expected.detach().bfloat16(), rtol=0, atol=0.02)
    assert [merge.target.data_ptr() for merge in refitter.lora_merges] == buffer_addresses
    assert_engine_matches(engine, model, tolerance=0.25)


def test_lora_modules_to_save_copy_is_refitted(tokenizer):
    """peft's trainable copy of lm_head (modules_to_save) is what the engine follows."""
    model = lora_model("mistral", tokenizer, seed=5, modules_to_save=["lm_head"])
    engine = GenerationEngine.from_hf(model, max_batch=2, max_total_len=16)
    refitter = EngineRefitter(engine, model)
    lm_head = model.base_model.model.lm_head
    before = lm_head.modules_to_save["default"].weight.detach().clone()
    train_one_step(model)
    assert not torch.equal(before, lm_head.modules_to_save["default"].weight)
    refitter.refit()
    assert torch.equal(engine.weights.lm_head, lm_head.modules_to_save["default"].weight)
    assert_engine_matches(engine, model, tolerance=LORA_TOLERANCE)


def test_refitter_rejects_another_architecture_and_moved_storage(tokenizer):
    model = build_family_model("llama", tokenizer=tokenizer)
    engine = GenerationEngine.from_hf(model, max_batch=1, max_total_len=8)
    with pytest.raises(ValueError, match="qkv_bias"):
        EngineRefitter(engine, build_family_model("qwen2", tokenizer=tokenizer))
    refitter = EngineRefitter(engine, model)
    model.model.norm.weight.data = model.model.norm.weight.data.clone()
    with pytest.raises(ValueError, match="storage moved"):
        refitter.refit()


@pytest.mark.parametrize(
    ("options", "message"),
    [(dict(target_modules=["q_proj"], use_dora=True), "LoRA variants"),
     (dict(target_modules=["embed_tokens"]), "LoRA on the embeddings")],
    ids=["dora", "embedding"],
)
def test_unsupported_lora_is_rejected(options, message, tokenizer):
    import peft

    model = peft.get_peft_model(build_family_model("llama", tokenizer=tokenizer), peft.LoraConfig(r=2, **options))
    with pytest.raises(ValueError, match=message):
        GenerationEngine.from_hf(model, max_batch=1, max_total_len=8)


def test_lora_is_refused_where_several_ranks_cannot_carry_the_adapters(tokenizer):
    """The three places a LoRA model meets a limit of the multi-rank paths, each refused before
    anything collective runs: the bucketed refit (its buckets carry base weights), the rs/spin
    refitter of a world with several ranks (ConfigError naming model.lora), and tensor parallel."""
    from stema.config import ConfigError
    from stema.distributed.role_model import place_on_world
    from stema.distributed.world import World

    model = lora_model("llama", tokenizer, seed=6)
    engine = GenerationEngine.from_hf(model, max_batch=1, max_total_len=16)
    with pytest.raises(ValueError, match="not merged LoRA adapters"):
        BucketedRefitter(engine, model, bucket_bytes=1 << 20)
    with pytest.raises(ConfigError, match=r"model\.lora: stema rs with LoRA runs in one process only"):
        engine.refitter(model, world=World(role="rs", world_size=2))
    with pytest.raises(ConfigError, match=r"model\.lora: LoRA is not supported with tensor parallel \(distributed\.tp_size 2\)"):
        place_on_world(model, World(role="sft", world_size=2, tp_size=2), distributed_cfg=None)
    assert isinstance(engine.refitter(model, world=World(role="rs")), EngineRefitter)  # one rank: merged refit


def test_bucket_receiver_repacks_once_every_weight_arrived(tokenizer):
    """`EngineSlots` (the engine side of a refit from another process) fills the engine bucket by
    bucket; a prepacked engine multiplies with the new weights once the last bucket is in, and
    its plain buffers match the trainer's either way."""
    model = scramble(build_family_model("llama", tokenizer=tokenizer), seed=1)
    engine = GenerationEngine.from_hf(model, max_batch=2, max_total_len=16)
    receiver = engine.bucket_receiver(model)
    train_one_step(model)
    weights = dict(model.named_parameters())
    names = [name for name, _ in receiver.layout]
    half = len(names) // 2
    receiver.load({name: weights[name].detach() for name in names[:half]})
    assert receiver.arrived == set(names[:half])
    receiver.load({name: weights[name].detach() for name in names[half:]})
    assert receiver.arrived == set()
    assert_engine_matches(engine, model)
