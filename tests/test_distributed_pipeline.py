"""Pipeline parallel (`stema.distributed.pipeline`, on torch.distributed.pipelining): torchrun runs of
`stema sft`, `stema dpo`, `stema kto` and `stema rm` with `distributed.pp_size=2` (gloo, CPU) equal the
1-process run with the same global batch, step by step (loss and pre-clipping gradient norm) and
in the exported Hugging Face weights; pp=2 x dp=2 and interleaved pp=2 x tp=2 (4 processes each) equal it too; a
pp=2 checkpoint resumes at pp=1 and at dp=2 onto the same curve; a dead or hung stage is named
with its rank and stage. Each family's seam (Llama, Qwen2 with sliding-window layers, Mistral)
chained stage by stage equals the model's own forward, and the settings that cannot run are
refused before any process starts.

Tolerances, from the arithmetic: the stages compute what the whole model computes, in the same
order within each micro-batch, but (a) the pipeline pads every row to `data.max_length` and masks
by causality alone, where the 1-process run pads to the micro-batch's longest row with a padding
mask, so attention and matmuls run over other shapes (other blockings, fp32 rounding of order
1e-7 relative per value), and (b) the losses and gradients are summed over the micro-batches in
the schedule's order. A loss of about 4 summed over ~300 tokens then differs by ~1e-6 (seen:
3e-7); hence 1e-5 on the loss and the relative grad norm (`distributed_launch.TOLERANCE`, as for
FSDP). AdamW (lr 3e-3) turns a relative gradient difference d into an update difference of about
lr * d, so most weights agree to ~1e-8; but an entry whose gradient sits within the rounding noise
of zero at some step gets a direction m / sqrt(v) that differs between the two summation orders by
much more (seen here: one entry of 1024 in DPO's last o_proj off by 1.1e-5 after 5 steps, where
training moved it by 7e-3; the sharded PPO export saw 1.3e-5 on an Intel Xeon). So the exported
weights are held, as the other sharded exports are, to 1% of the largest change training made to
any weight (here 9e-3, so 9e-5), and training must have moved them.
"""

import json
import shutil

import pytest
import torch
from distributed_launch import TOLERANCE, argv, assert_same_curve, curve, finish, gloo_available, start_ranks, torchrun_cli

from stema.cli import main
from stema.config import ConfigError, DPOConfig, KTOConfig, PPOConfig, SFTConfig, load_config
from stema.distributed.pipeline import PIPELINE_SEAMS, PipelineRankModel, check_pipeline_config, stage_layers
from stema.models import tiny
from stema.models.families import tiny_family_config
from stema.training.logging import read_metrics

pytestmark = pytest.mark.skipif(not gloo_available, reason="torch.distributed with gloo is not available")

WEIGHT_SHARE = 1e-2  # of the largest weight change training made


def save_untied(path, family, *, layers=4, seed=0):
    """A tiny `family` causal LM with untied embeddings and `layers` decoder layers, saved with the
    character tokenizer (pipeline stages need untied embeddings)."""
    from transformers import AutoModelForCausalLM

    tokenizer = tiny.build_tokenizer()
    config = tiny_family_config(family, vocab_size=len(tokenizer), num_layers=layers, bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config.tie_word_embeddings = False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def untied_llama(tmp_path_factory):
    return save_untied(tmp_path_factory.mktemp("models") / "llama", "llama")


def pp(size=2, schedule="1f1b", *extra):
    return (f"distributed.pp_size={size}", f"distributed.pp_schedule={schedule}", *extra)


def exported(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def assert_same_weights(gathered, single, initial):
    """Every entry within WEIGHT_SHARE of the largest change training made to the weights that
    `initial` holds (see the module docstring)."""
    assert gathered.keys() == single.keys()
    worst = max((gathered[name] - single[name]).abs().max().item() for name in single)
    moved = max((single[name] - initial[name]).abs().max().item() for name in single if name in initial)
    print(f"largest weight difference {worst:.2e}; largest change by training {moved:.2e}")
    assert moved > 1e-3
    assert worst <= WEIGHT_SHARE * moved


EVALUATION = ("data.eval=builtin", "data.builtin_eval_size=12", "trainer.eval_every=2")


@pytest.fixture(scope="module")
def sft_runs(untied_llama, tmp_path_factory):
    """The same SFT run in 1 process and with 2 pipeline stages (1f1b, checkpoint at step 3,
    evaluation at steps 2, 4 and the end)."""
    root = tmp_path_factory.mktemp("pipeline_sft")
    assert main(argv("sft", root / "one", untied_llama, "trainer.save_every=3", *EVALUATION)) == 0
    torchrun_cli(2, argv("sft", root / "pp2", untied_llama, "trainer.save_every=3", *EVALUATION, *pp()))
    return root / "one", root / "pp2"


def test_pipeline_sft_two_stages_equal_one_process_and_export_the_same_model(sft_runs, untied_llama):
    """Also the evaluations (run through the stages without gradients): the same loss and perplexity
    within the curve's tolerance."""
    one, two = sft_runs
    assert_same_curve(curve(two), curve(one))
    assert_same_weights(exported(two / "hf"), exported(one / "hf"), exported(untied_llama))
    evaluations = [[(record["step"], record["loss"], record["perplexity"]) for record in read_metrics(out, "eval")] for out in (one, two)]
    assert [step for step, _, _ in evaluations[0]] == [2, 4, 5]
    for (step, loss_1, perplexity_1), (_, loss_2, perplexity_2) in zip(*evaluations):
        assert abs(loss_2 - loss_1) <= TOLERANCE and abs(perplexity_2 - perplexity_1) <= TOLERANCE * perplexity_1, step


def test_pipeline_sft_interleaved_stages_with_tensor_parallel_equal_one_process(sft_runs, untied_llama, tmp_path):
    """4 processes: interleaved 1f1b over 2 pipeline ranks (stages 0 and 2 on the first, 1 and 3 on
    the second, one decoder layer each), each stage tensor parallel over 2 ranks."""
    one, _ = sft_runs
    torchrun_cli(4, argv("sft", tmp_path, untied_llama, "trainer.export_hf=false", "distributed.tp_size=2",
                         *pp(2, "interleaved_1f1b")), timeout=240)
    assert_same_curve(curve(tmp_path), curve(one))


def test_pipeline_sft_two_stages_by_two_data_parallel_ranks_equal_one_process(sft_runs, untied_llama, tmp_path):
    """4 processes: 2 stages x 2 data-parallel ranks (FSDP2 inside each stage), gpipe schedule
    (all forwards, then all backwards)."""
    one, _ = sft_runs
    torchrun_cli(4, argv("sft", tmp_path, untied_llama, "trainer.export_hf=false", *pp(2, "gpipe")), timeout=240)
    assert_same_curve(curve(tmp_path), curve(one))


def resumed_from(two, folder, step):
    """A run folder holding `two`'s checkpoint of `step` and its metrics up to it."""
    name = f"step-{step:08d}"
    shutil.copytree(two / "checkpoints" / name, folder / "checkpoints" / name)
    records = [record for record in read_metrics(two) if record["step"] <= step]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    return folder


def test_pipeline_checkpoint_resumes_in_one_process_onto_the_same_curve(sft_runs, untied_llama, tmp_path):
    one, two = sft_runs
    resumed = resumed_from(two, tmp_path / "resumed", 3)
    assert main(argv("sft", resumed, untied_llama, "trainer.save_every=3", "trainer.resume=true")) == 0
    assert_same_curve(curve(resumed), curve(one))
    assert_same_weights(exported(resumed / "hf"), exported(one / "hf"), exported(untied_llama))


def test_pipeline_checkpoint_resumes_with_two_data_parallel_ranks_onto_the_same_curve(sft_runs, untied_llama, tmp_path):
    one, two = sft_runs
    resumed = resumed_from(two, tmp_path / "resumed", 3)
    torchrun_cli(2, argv("sft", resumed, untied_llama, "trainer.export_hf=false", "trainer.resume=true"))
    assert_same_curve(curve(resumed), curve(one))


def test_pipeline_dpo_two_stages_equal_one_process(untied_llama, tmp_path):
    """DPO with the reference's log-probs computed once through the reference's own stages."""
    extra = ("preference.beta=0.5", "preference.precompute_ref_logprobs=true")
    assert main(argv("dpo", tmp_path / "one", untied_llama, *extra)) == 0
    torchrun_cli(2, argv("dpo", tmp_path / "pp2", untied_llama, *extra, *pp()))
    assert_same_curve(curve(tmp_path / "pp2"), curve(tmp_path / "one"))
    assert_same_weights(exported(tmp_path / "pp2" / "hf"), exported(tmp_path / "one" / "hf"), exported(untied_llama))


def test_pipeline_kto_two_stages_equal_one_process(untied_llama, tmp_path):
    """KTO on stages: the reference's log-probs of the examples computed once through its stages,
    each global batch's KL baseline z0 (policy and reference over the mismatched pairs) through the
    stages without gradients, the loss on the last stage. The run must reach a positive z0 (the
    clamp at 0 does not hide it) and the pipeline's z0 (logged as `kl`) must equal the 1-process
    one, as must the evaluations (z0 over the held-out set). Same tolerances as SFT: z0 is a mean
    of differences of sequence log-probs of order 15 (sums over ~10 completion tokens), each off by
    ~1e-7 relative per token on the other padded shapes, so z0 moves by ~1e-6 (seen: 3e-7)."""
    from stema.data import builtin

    def unpaired(name, count, seed):
        rows = [{"prompt": pair["prompt"], "completion": pair[side], "label": side == "chosen"}
                for pair in builtin.preference_records(count, seed=seed) for side in ("chosen", "rejected")]
        (tmp_path / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
        return tmp_path / name

    extra = (f"data.train={unpaired('train.jsonl', 16, 1)}", f"data.eval={unpaired('eval.jsonl', 4, 2)}", "trainer.eval_every=2",
             "kto.beta=0.5")
    assert main(argv("kto", tmp_path / "one", untied_llama, *extra)) == 0
    torchrun_cli(2, argv("kto", tmp_path / "pp2", untied_llama, *extra, *pp()))
    assert_same_curve(curve(tmp_path / "pp2"), curve(tmp_path / "one"))
    for kind in ("train", "eval"):
        one, two = ([(record["step"], record["kl"], record["loss"]) for record in read_metrics(out, kind)]
                    for out in (tmp_path / "one", tmp_path / "pp2"))
        assert [step for step, _, _ in two] == [step for step, _, _ in one]
        assert max(kl for _, kl, _ in one) > 1e-3, one
        for (step, kl_1, loss_1), (_, kl_2, loss_2) in zip(one, two):
            assert abs(kl_2 - kl_1) <= TOLERANCE * max(1.0, kl_1) and abs(loss_2 - loss_1) <= TOLERANCE, (kind, step)
        print(kind, "largest z0 difference", max(abs(a[1] - b[1]) for a, b in zip(one, two)), "z0 values", [kl for _, kl, _ in one])
    assert_same_weights(exported(tmp_path / "pp2" / "hf"), exported(tmp_path / "one" / "hf"), exported(untied_llama))


def test_pipeline_reward_model_two_stages_equal_one_process(llama_path, tmp_path):
    """`stema rm` (Bradley-Terry): the last stage holds the score head and reads each row at its last
    non-pad token, as the sequence classifier does. The session's Llama ties its embeddings, which
    a reward model does not use (no LM head), so it runs on stages. Same tolerances as SFT."""
    from transformers import AutoModelForSequenceClassification

    assert main(argv("rm", tmp_path / "one", llama_path)) == 0
    torchrun_cli(2, argv("rm", tmp_path / "pp2", llama_path, *pp()))
    assert_same_curve(curve(tmp_path / "pp2"), curve(tmp_path / "one"))
    single = AutoModelForSequenceClassification.from_pretrained(tmp_path / "one" / "hf", num_labels=1).state_dict()
    gathered = AutoModelForSequenceClassification.from_pretrained(tmp_path / "pp2" / "hf", num_labels=1).state_dict()
    assert_same_weights(gathered, single, exported(llama_path))  # the backbone's change (the score head starts new)


@pytest.mark.parametrize("family", sorted(PIPELINE_SEAMS))
def test_pipeline_seam_stages_chained_equal_the_model(tmp_path, family):
    """Each family's stages (3 stages over 4 layers: 2, 1, 1) run one after the other in one process
    give the model's own logits. Qwen2 with a sliding window on its last layers checks that each
    layer gets its own kind of mask (the sequence is longer than the window). The same fp32
    operations on the same shapes: equal up to a few ulps."""
    from transformers import AutoModelForCausalLM

    path = save_untied(tmp_path / family, family)
    model = AutoModelForCausalLM.from_pretrained(path)
    if family == "qwen2":
        kinds = ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]
        model = AutoModelForCausalLM.from_pretrained(path, use_sliding_window=True, sliding_window=4, layer_types=kinds)
        assert model.config.layer_types == kinds
    tokens = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=tokens).logits
        staged = PipelineRankModel(model, stage_indices=[0, 1, 2], num_stages=3)
        activation = tokens
        for view in staged.stages:
            activation = view(activation)
    assert [list(view.layers) for view in staged.stages] == [["0", "1"], ["2"], ["3"]]
    assert (activation - expected).abs().max().item() < 1e-5


def test_pipeline_stage_layers_split_evenly():
    assert stage_layers(4, 2) == [range(0, 2), range(2, 4)]
    assert stage_layers(5, 2) == [range(0, 3), range(3, 5)]
    assert stage_layers(4, 4) == [range(0, 1), range(1, 2), range(2, 3), range(3, 4)]


ROLE_STAGES = ["roles.backend=ray", "roles.actor_workers=2", "roles.critic_workers=2"]


@pytest.mark.parametrize("cls, command, overrides, keys", [
    (SFTConfig, "sft", ["distributed.pp_size=3"], ["distributed.pp_size=3", "world size 4"]),
    (SFTConfig, "sft", ["distributed.pp_size=2", "model.lora.enabled=true"], ["model.lora", "distributed.pp_size=2"]),
    (SFTConfig, "sft", ["distributed.pp_size=2", "data.packing=true"], ["data.packing", "distributed.pp_size=2"]),
    (SFTConfig, "sft", ["distributed.pp_size=2", "trainer.global_batch_size=6", "trainer.micro_batch_size=1",
                        "distributed.pp_microbatches=4"], ["distributed.pp_microbatches", "trainer.global_batch_size"]),
    (SFTConfig, "sft", ["distributed.pp_size=2", "distributed.pp_schedule=interleaved_1f1b", "distributed.pp_microbatches=3",
                        "trainer.micro_batch_size=1", "trainer.global_batch_size=6"], ["interleaved_1f1b", "distributed.pp_size=2"]),
    (SFTConfig, "sft", ["distributed.pp_size=4", "distributed.pp_schedule=interleaved_1f1b"],
     ["distributed.pp_schedule=interleaved_1f1b", "8 stages", "4 decoder layers"]),
    (DPOConfig, "dpo", ["distributed.pp_size=2"], ["preference.precompute_ref_logprobs", "distributed.pp_size=2"]),
    (KTOConfig, "kto", ["distributed.pp_size=2", "model.lora.enabled=true"], ["model.lora", "distributed.pp_size=2"]),
    (PPOConfig, "ppo", ["distributed.pp_size=2", "reward.function=builtin"], ["distributed.pp_size=2", "roles.actor_workers"]),
    (PPOConfig, "ppo", ["distributed.pp_size=2", "reward.function=builtin", *ROLE_STAGES, "roles.critic_workers=1"],
     ["roles.critic_workers", "distributed.pp_size=2"]),
    (PPOConfig, "grpo", ["distributed.pp_size=2", "reward.function=builtin", *ROLE_STAGES, "ppo.advantage=grpo",
                         "rollout.samples_per_prompt=2", "roles.placement=disaggregated"], ["roles.placement"]),
    (PPOConfig, "grpo", ["distributed.pp_size=2", "reward.function=builtin", *ROLE_STAGES, "ppo.advantage=grpo",
                         "rollout.samples_per_prompt=2", "distributed.pp_microbatches=2"], ["distributed.pp_microbatches"]),
    (PPOConfig, "grpo", ["distributed.pp_size=2", "reward.function=builtin", *ROLE_STAGES, "ppo.advantage=grpo",
                         "rollout.samples_per_prompt=2", "rollout.backend=hf"], ["rollout.backend"]),
])
def test_pipeline_settings_that_cannot_run_are_refused_naming_the_keys(untied_llama, cls, command, overrides, keys):
    config = load_config(cls, overrides=[f"model.path={untied_llama}", *overrides])
    with pytest.raises(ConfigError) as error:
        check_pipeline_config(config, command=command, world_size=4)
    for key in keys:
        assert key in str(error.value)


@pytest.mark.parametrize("path, family_key", [("tiny", "ties its input and output embeddings"), ("gpt2", "'gpt2' model")])
def test_pipeline_refuses_tied_embeddings_and_families_without_a_seam(tmp_path, path, family_key):
    from stema.models.families import save_family_model

    if path != "tiny":
        path = save_family_model(tmp_path / path, path)
    config = load_config(SFTConfig, overrides=[f"model.path={path}", "distributed.pp_size=2"])
    with pytest.raises(ConfigError, match=family_key):
        check_pipeline_config(config, command="sft", world_size=2)


def test_pipeline_refusal_comes_before_any_process_group(untied_llama, tmp_path, capsys):
    """The CLI's exit code 2 and one line naming the key, from a single process that would need 2."""
    assert main(argv("sft", tmp_path, untied_llama, "distributed.pp_size=2")) == 2
    assert "distributed.pp_size=2" in capsys.readouterr().err
    assert not (tmp_path / "config.yaml").exists()


def test_grpo_role_group_refusal_comes_before_any_role_starts(untied_llama, tmp_path, capsys):
    """PPO's check runs in `start_run` too: local roles cannot hold stages (exit code 2, one line
    naming the keys, no run folder)."""
    argv = ["grpo", f"trainer.output_dir={tmp_path / 'run'}", f"model.path={untied_llama}", "data.train=builtin",
            "reward.function=builtin", "distributed.pp_size=2"]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "roles.actor_workers" in error and "distributed.pp_size=2" in error
    assert not (tmp_path / "run").exists()


TIMEOUT_S = 4

STAGE_SCRIPT = """
import os, sys, time
import torch
from stema.config import SFTConfig, load_config
from stema.distributed import init_world
from stema.distributed.pipeline import place_pipeline
from stema.training.logprobs import logits_token_logprobs
from transformers import AutoModelForCausalLM

behaviour, path = sys.argv[1], sys.argv[2]
config = load_config(SFTConfig, overrides=[f"model.path={{path}}", "distributed.pp_size=2", "distributed.timeout_s={timeout}",
                                           "trainer.global_batch_size=2", "trainer.micro_batch_size=1", "data.max_length=8"])
world = init_world(config.distributed, role="sft")
model = place_pipeline(AutoModelForCausalLM.from_pretrained(path), world, config.distributed, microbatches=2, length=8)
ids = torch.arange(3, 11).reshape(1, 8)
batches = [dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)] * 2
loss_of = lambda logits, batch: (-logits_token_logprobs(logits, batch)[0].sum() / 14, {{}})
try:
    with world.failures_named():
        for step in range(1, 4):
            if world.rank == 1 and step == 2:
                if behaviour == "exit":
                    os._exit(3)
                time.sleep(120)
            model.pipeline.train_step(batches, loss_of=loss_of, context=torch.enable_grad())
            world.mark(step)
            finished = time.monotonic()
finally:
    print(f"stopped {{time.monotonic() - finished:.2f}}s after step 1", file=sys.stderr, flush=True)
"""


@pytest.mark.parametrize("behaviour", ["hang", "exit"])
def test_pipeline_dead_or_hung_stage_is_named_with_its_rank_and_stage(untied_llama, tmp_path, behaviour):
    """Stage 1 (rank 1) dies or hangs before its second step: rank 0 (stage 0), whose activations
    it no longer takes, stops within the timeout naming rank 1 and its stage."""
    script = tmp_path / "stages.py"
    script.write_text(STAGE_SCRIPT.format(timeout=TIMEOUT_S))
    rank_0, rank_1 = start_ranks(script, 2, behaviour, str(untied_llama))
    ((code_0, err_0),) = finish([rank_0], timeout=TIMEOUT_S + 120)
    if behaviour == "hang":
        rank_1.kill()
    finish([rank_1], timeout=10)
    assert code_0 not in (0, None, -9), err_0[-2000:]
    message = next((line for line in err_0.splitlines() if "CollectiveError:" in line), None)
    assert message is not None, err_0[-3000:]
    print(f"{behaviour}: {message}")
    assert "sft rank 0 (pipeline stage 0) of 2" in message
    assert "waits on the stages of its pipeline: rank 1 (pipeline stage 1), last finished step 1" in message
    waited = float(next(line for line in err_0.splitlines() if line.startswith("stopped ")).split()[1].rstrip("s"))
    assert waited < TIMEOUT_S + 10  # the timeout, then the error; slack for a loaded machine
