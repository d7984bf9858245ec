"""The shared loop: micro-batching does not change the result, an interrupted run resumes onto the
same loss curve, checkpoints are atomic and pruned, metrics land in JSONL."""

from pathlib import Path

import pytest
import torch

from stema.config import OptimConfig, TrainerConfig
from stema.training import train
from stema.training.checkpoint import list_checkpoints
from stema.training.logging import read_metrics
from stema.training.optim import lr_multiplier


class Regression:
    """A small real task for the loop: fit y = w.x with an MLP (dropout exercises the RNG)."""

    name = "regression"

    def __init__(self, crash_on_call: int | None = None):
        self.calls = 0
        self.crash_on_call = crash_on_call

    def denominators(self, examples):
        return {"examples": len(examples)}

    def collate(self, examples):
        return {"x": torch.stack([x for x, _ in examples]), "y": torch.stack([y for _, y in examples])}

    def loss(self, model, batch, denominators):
        self.calls += 1
        if self.crash_on_call is not None and self.calls == self.crash_on_call:
            raise KeyboardInterrupt("simulated kill")
        error = model(batch["x"]).squeeze(-1) - batch["y"]
        loss = error.square().sum() / denominators["examples"]
        return loss, {"abs_error": error.detach().abs().sum() / denominators["examples"]}

    def num_tokens(self, batch):
        return batch["x"].shape[0]

    def evaluate(self, model, examples):
        batch = self.collate(examples)
        torch.rand(3)  # evaluation that draws random numbers must not disturb training
        return {"mse": (model(batch["x"]).squeeze(-1) - batch["y"]).square().mean().item()}


def make_data(n=48, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=generator)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
    return [(x[i], y[i]) for i in range(n)]


def make_model(dropout=0.0):
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Dropout(dropout), torch.nn.Linear(16, 1))


def run(tmp_path: Path, *, micro=8, dropout=0.0, max_steps=6, save_every=0, resume=False, crash_on_call=None, eval_every=0):
    trainer_cfg = TrainerConfig(
        output_dir=str(tmp_path), max_steps=max_steps, global_batch_size=8, micro_batch_size=micro,
        save_every=save_every, resume=resume, progress_bar=False, tensorboard=False, eval_every=eval_every, seed=3,
    )
    optim_cfg = OptimConfig(lr=0.05, warmup_steps=2, schedule="cosine")
    data = make_data()
    return train(model=make_model(dropout), algorithm=Regression(crash_on_call), train_examples=data,
                 eval_examples=data[:8], trainer_cfg=trainer_cfg, optim_cfg=optim_cfg)


def losses(path):
    return [record["loss"] for record in read_metrics(path, "train")]


def test_micro_batching_gives_the_full_batch_result(tmp_path):
    run(tmp_path / "full", micro=8)
    run(tmp_path / "micro", micro=2)
    assert losses(tmp_path / "micro") == pytest.approx(losses(tmp_path / "full"), rel=1e-5, abs=1e-7)
    assert len(losses(tmp_path / "full")) == 6


def test_interrupted_then_resumed_run_continues_the_same_loss_curve(tmp_path):
    run(tmp_path / "straight", dropout=0.2, save_every=2, eval_every=1)
    with pytest.raises(KeyboardInterrupt):
        # one micro-batch per step: call 5 is step 5, after the checkpoint at step 4
        run(tmp_path / "resumed", dropout=0.2, save_every=2, eval_every=1, crash_on_call=5)
    assert [step for step, _ in list_checkpoints(tmp_path / "resumed" / "checkpoints")] == [2, 4]
    result = run(tmp_path / "resumed", dropout=0.2, save_every=2, eval_every=1, resume=True)
    assert result.resumed_from == 4
    straight = losses(tmp_path / "straight")
    resumed = losses(tmp_path / "resumed")  # steps 1-4, then 5-6 after the resume
    assert resumed == straight  # bit-for-bit
    assert straight[0] != straight[-1]


def test_checkpoints_are_pruned_and_leave_no_temporary_folders(tmp_path):
    run(tmp_path, save_every=1, max_steps=5)
    root = tmp_path / "checkpoints"
    assert [step for step, _ in list_checkpoints(root)] == [4, 5]
    assert sorted(p.name for p in root.iterdir()) == ["step-00000004", "step-00000005"]


def test_metrics_jsonl_has_one_record_per_step_with_lr_and_throughput(tmp_path):
    run(tmp_path, max_steps=4)
    records = read_metrics(tmp_path, "train")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for record in records:
        assert {"loss", "lr", "grad_norm", "tokens", "tokens_per_s", "abs_error"} <= set(record)
    assert records[0]["lr"] == pytest.approx(0.025)  # warmup: step 1 of 2
    assert read_metrics(tmp_path, "eval")[-1]["step"] == 4


def test_lr_schedule_warmup_then_decay_to_the_floor():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    assert lr_multiplier(0, total_steps=14, cfg=cfg) == pytest.approx(0.25)
    assert lr_multiplier(3, total_steps=14, cfg=cfg) == pytest.approx(1.0)
    assert lr_multiplier(9, total_steps=14, cfg=cfg) == pytest.approx(0.55)
    assert lr_multiplier(14, total_steps=14, cfg=cfg) == pytest.approx(0.1)
    linear = OptimConfig(lr=1.0, schedule="linear")
    assert lr_multiplier(5, total_steps=10, cfg=linear) == pytest.approx(0.5)


def test_too_little_data_is_a_clear_error(tmp_path):
    trainer_cfg = TrainerConfig(output_dir=str(tmp_path), global_batch_size=64, micro_batch_size=8, progress_bar=False, tensorboard=False)
    with pytest.raises(ValueError, match="no full global batch of 64"):
        train(model=make_model(), algorithm=Regression(), train_examples=make_data(), eval_examples=None,
              trainer_cfg=trainer_cfg, optim_cfg=OptimConfig())


def test_tensorboard_events_are_written_when_enabled(tmp_path):
    pytest.importorskip("tensorboard")
    trainer_cfg = TrainerConfig(output_dir=str(tmp_path), max_steps=2, global_batch_size=8, micro_batch_size=8,
                                progress_bar=False, tensorboard=True)
    train(model=make_model(), algorithm=Regression(), train_examples=make_data(), eval_examples=None,
          trainer_cfg=trainer_cfg, optim_cfg=OptimConfig())
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("train/loss")] == [1, 2]
