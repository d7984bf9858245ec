"""Tensor parallel (DTensor plans) for Llama and Qwen2, and the build-on-meta path of the
`parallelize` seam, in two gloo processes: the 2-rank tensor-parallel forward (logits) and
backward (every weight's gradient, gathered) equal the single-process ones, and a model built on
the meta device, sharded and loaded from rank 0's state dict computes the same logits; `stema sft`
with distributed.tp_size=2 (tensor parallel inside FSDP2) follows the 1-process loss curve."""

import json

import pytest
from distributed_launch import argv, assert_same_curve, curve, finish, gloo_available, start_ranks, torchrun_cli

from stema.cli import main
from stema.models.families import save_family_model

pytestmark = pytest.mark.skipif(not gloo_available, reason="torch.distributed with gloo is not available")

SCRIPT = """
import json, sys
import torch
from torch.distributed.device_mesh import init_device_mesh
from transformers import AutoModelForCausalLM
from stema.config import DistributedConfig
from stema.distributed import close_world, init_world
from stema.distributed.parallelize import apply_tensor_parallel, parallelize
from stema.models.families import build_family_model

world = init_world(DistributedConfig(tp_size=2, timeout_s=60), role="tp-test")
inputs = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(0))


def loss_of(model):
    logits = model(input_ids=inputs, use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), inputs[:, 1:].flatten())
    return logits.detach(), loss


def full(tensor):
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


report = {{}}
for family in ("llama", "qwen2"):
    single = build_family_model(family, seed=0)
    logits, loss = loss_of(single)
    loss.backward()
    sharded = build_family_model(family, seed=0)
    apply_tensor_parallel(sharded, world.mesh["tp"])
    assert type(sharded.model.layers[0].self_attn.q_proj.weight).__name__ == "DTensor"
    tp_logits, tp_loss = loss_of(sharded)
    tp_loss.backward()
    grads = dict(sharded.named_parameters())
    report[family] = {{
        "logits": (tp_logits - logits).abs().max().item(),
        "loss": abs(tp_loss.item() - loss.item()),
        "grads": max((full(grads[name].grad) - p.grad).abs().max().item() for name, p in single.named_parameters()),
        "sharded_weights": sum(type(p).__name__ == "DTensor" for p in sharded.parameters()),
    }}

    with torch.device("meta"):
        meta_built = AutoModelForCausalLM.from_config(single.config)
    state = single.state_dict() if world.rank == 0 else {{}}
    data_mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("dp", "tp"))
    parallelize(meta_built, mesh=data_mesh, full_state_dict=state)
    with torch.no_grad():
        report[family]["meta_logits"] = (meta_built(input_ids=inputs, use_cache=False).logits - logits).abs().max().item()
json.dump(report, open(sys.argv[1] + f".{{world.rank}}", "w"))
close_world(world)
"""


def test_tensor_parallel_llama_and_qwen2_forward_and_backward_equal_one_process(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(SCRIPT.format())
    results = finish(start_ranks(script, 2, str(tmp_path / "report")), timeout=100)
    for code, err in results:
        assert code == 0, err[-4000:]
    for rank in range(2):
        report = json.loads((tmp_path / f"report.{rank}").read_text())
        print(f"rank {rank}: {report}")
        for family, differences in report.items():
            assert differences["sharded_weights"] >= 14, family  # 7 projections per layer x 2 layers (+ vocab)
            for name in ("logits", "loss", "grads", "meta_logits"):
                assert differences[name] < 1e-5, (family, name, differences[name])


def test_tensor_parallel_sft_under_torchrun_equals_one_process(tmp_path):
    qwen2 = save_family_model(tmp_path / "qwen2", "qwen2")
    assert main(argv("sft", tmp_path / "one", qwen2, "trainer.export_hf=false")) == 0
    torchrun_cli(2, argv("sft", tmp_path / "tp", qwen2, "trainer.export_hf=false", "distributed.tp_size=2"))
    assert_same_curve(curve(tmp_path / "tp"), curve(tmp_path / "one"))
