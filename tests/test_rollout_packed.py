"""Engines that keep their linear weights only oneDNN-packed (`stema.rollout.packed`): the layout
learned from oneDNN's own bytes, refits writing straight into the packed buffers (every refitter),
bit-identical to oneDNN repacking the same weights, and the fallback where the layout is not a
row-block one."""

from __future__ import annotations

import pytest
import torch

from stema.rollout import BucketedRefitter, EngineRefitter, GenerationEngine, SamplingParams
from stema.rollout.packed import can_prepack, learn_layout, packed_bytes
from stema_kernels import pack_rows_

from tiny_models import block_sized_llama

DTYPES = [torch.float32, torch.bfloat16]
PROMPTS = [[5, 17, 30], [40, 41, 42, 43, 44, 45], [90]]
INPUT_IDS = torch.tensor([[5, 17, 30, 40, 41, 42, 43, 44, 45], [1, 127, 64, 63, 0, 2, 100, 101, 102]])


def packable(dtype: torch.dtype) -> None:
    if not can_prepack(device=torch.device("cpu"), dtype=dtype):
        pytest.skip(f"oneDNN has no {dtype} linear kernels on this CPU (or torch has no oneDNN)")


def in_place_or_skip(engine: GenerationEngine) -> None:
    """fp32 engines of block-sized models are packed in row blocks on every x86 CPU measured (AVX2,
    AVX-512); bf16's layout is the ISA's choice (AMX may block columns too): skip where it is not
    a row-block one (the fallback is the padded-layout test's)."""
    if engine.dtype == torch.bfloat16 and not engine.decoder.packed.in_place:
        pytest.skip("oneDNN packs bf16 weights in another layout than row blocks on this CPU")
    assert engine.decoder.packed.in_place


def train_one_step(model: torch.nn.Module, *, lr: float = 0.05, input_ids: torch.Tensor = INPUT_IDS) -> None:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    optimizer.step()
    model.eval()


def onednn_packed(weight: torch.Tensor, dtype: torch.dtype, batch_hint: int) -> torch.Tensor:
    """oneDNN's own packing of `weight` cast to `dtype`, as bytes (a copy)."""
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype).contiguous(), batch_hint)
    return packed_bytes(packed).clone()


def expected_packed(model: torch.nn.Module, dtype: torch.dtype, batch_hint: int) -> dict[str, torch.Tensor]:
    """What an in-place engine's packed buffers must hold for `model`: oneDNN's packing of each fused weight."""
    expected = {}
    for index, layer in enumerate(model.model.layers):
        attention, mlp = layer.self_attn, layer.mlp
        fused = {
            "qkv": torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight]),
            "o": attention.o_proj.weight,
            "gate_up": torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
            "down": mlp.down_proj.weight,
        }
        for name, weight in fused.items():
            expected[f"packed_{name}.{index}"] = onednn_packed(weight, dtype, batch_hint)
    expected["packed_lm_head.0"] = onednn_packed(model.lm_head.weight, dtype, batch_hint)
    return expected


def assert_packed_as_onednn(engine: GenerationEngine, model: torch.nn.Module) -> None:
    buffers = engine.buffers()
    for name, expected in expected_packed(model, engine.dtype, engine.max_batch).items():
        assert torch.equal(buffers[name].view(torch.uint8), expected), f"{name} differs from oneDNN's packing"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(192, 64), (64, 64), (256, 64), (64, 128), (128, 64), (512, 1408)])
def test_learned_layout_packs_bit_for_bit_as_onednn(shape, dtype):
    packable(dtype)
    rows, cols = shape
    layout = learn_layout(rows, cols, dtype, 8)
    if layout is None and dtype == torch.bfloat16:
        pytest.skip("oneDNN packs bf16 weights in another layout than row blocks on this CPU")
    assert layout is not None, f"{shape} {dtype}: no row-block layout matched oneDNN's"
    block, pair = layout
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(3))
    ours = torch.empty(rows * cols, dtype=dtype)
    pack_rows_([ours], [weight], blocks=[block], pairs=[pair])  # casting fp32 -> dtype on the way
    assert torch.equal(ours.view(torch.uint8), onednn_packed(weight, dtype, 8))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_padded_layout_is_not_taken_for_a_row_block_one(dtype):
    """oneDNN pads 100 rows to whole blocks: not a layout `pack_rows_` writes, so none is learned."""
    packable(dtype)
    assert learn_layout(100, 64, dtype, 8) is None


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_refit_writes_the_packed_weights_in_place(dtype, tied):
    packable(dtype)
    model = block_sized_llama(tied=tied, seed=1)
    engine = GenerationEngine.from_hf(model, dtype=dtype, max_batch=4, max_total_len=32)
    in_place_or_skip(engine)
    weights = engine.weights
    assert weights.qkv_weight is None and weights.o_weight is None and weights.gate_up_weight is None
    assert weights.down_weight is None and weights.lm_head is None and (weights.embed is None) == tied
    assert_packed_as_onednn(engine, model)
    refitter = EngineRefitter(engine, model)
    before = {name: tensor.data_ptr() for name, tensor in engine.buffers().items()}
    train_one_step(model)
    refitter.refit()
    assert_packed_as_onednn(engine, model)
    assert {name: tensor.data_ptr() for name, tensor in engine.buffers().items()} == before
    # Same weights, same packed bytes: the refitted engine computes what a new one computes, bit for bit.
    fresh = GenerationEngine.from_hf(model, dtype=dtype, max_batch=4, max_total_len=32)
    assert torch.equal(engine.forward(INPUT_IDS), fresh.forward(INPUT_IDS))
    # ... and what the trainer computes, up to the dtype's rounding.
    with torch.no_grad():
        expected = model.to(dtype)(input_ids=INPUT_IDS).logits.float()
    tolerance = 1e-4 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(engine.forward(INPUT_IDS).float(), expected, rtol=tolerance, atol=tolerance)
    params = SamplingParams(temperature=0, max_new_tokens=6, eos_token_ids=())
    assert engine.generate(PROMPTS, params).token_ids == fresh.generate(PROMPTS, params).token_ids


def test_bucketed_refits_and_bucket_receivers_write_packed_weights():
    """The other refitters (from FSDP shards bucket by bucket; from another process) take the same
    packed destinations."""
    packable(torch.float32)
    model = block_sized_llama(tied=True, seed=2)
    bucketed = GenerationEngine.from_hf(model, max_batch=2, max_total_len=16)
    received = GenerationEngine.from_hf(model, max_batch=2, max_total_len=16)
    in_place_or_skip(bucketed)
    in_place_or_skip(received)
    refitter = BucketedRefitter(bucketed, model, bucket_bytes=20_000)
    assert len(refitter.weights.buckets) > 2
    receiver = received.bucket_receiver(model)
    train_one_step(model)
    refitter.refit()
    weights = dict(model.named_parameters())
    names = [name for name, _ in receiver.layout]
    receiver.load({name: weights[name].detach() for name in names[:3]})
    receiver.load({name: weights[name].detach() for name in names[3:]})
    assert_packed_as_onednn(bucketed, model)
    assert_packed_as_onednn(received, model)


def test_lora_refit_packs_the_merged_weights():
    """LoRA layers are merged (W + s B A) into a buffer which the plan packs: the packed bytes are
    oneDNN's packing of the merged weights that an engine without packing holds."""
    packable(torch.float32)
    from peft import LoraConfig, get_peft_model

    base = block_sized_llama(tied=False, seed=3)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.2)
    engine = GenerationEngine.from_hf(model, max_batch=2, max_total_len=16)
    plain = GenerationEngine.from_hf(model, max_batch=2, max_total_len=16, prepack=False)
    in_place_or_skip(engine)
    EngineRefitter(engine, model).refit()
    buffers = engine.buffers()
    for name in ("qkv", "o", "gate_up", "down"):
        for index, weight in enumerate(getattr(plain.weights, f"{name}_weight")):
            assert torch.equal(buffers[f"packed_{name}.{index}"].view(torch.uint8), onednn_packed(weight, torch.float32, 2))
    with torch.no_grad():
        expected = model.merge_and_unload()(input_ids=INPUT_IDS).logits
    torch.testing.assert_close(engine.forward(INPUT_IDS), expected, rtol=1e-4, atol=1e-4)


def test_engines_whose_layout_is_padded_keep_plain_weights_and_repack():
    """A vocabulary that is not a multiple of the block: oneDNN pads the lm_head, so the engine keeps
    its plain buffers and repacks them with oneDNN after each refit (and still follows the trainer)."""
    packable(torch.float32)
    from transformers import LlamaConfig, LlamaForCausalLM

    from tiny_models import scramble

    config = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = scramble(LlamaForCausalLM(config).eval(), seed=4)
    engine = GenerationEngine.from_hf(model, max_batch=2, max_total_len=16)
    assert engine.prepacked and not engine.decoder.packed.in_place and engine.weights.qkv_weight is not None
    refitter = EngineRefitter(engine, model)
    ids = INPUT_IDS % 100
    train_one_step(model, input_ids=ids)
    refitter.refit()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    torch.testing.assert_close(engine.forward(ids), expected, rtol=1e-4, atol=1e-4)
