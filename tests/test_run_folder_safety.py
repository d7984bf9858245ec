"""Run folders and checkpoints under misuse and faults: a checkpoint never runs code from its files,
a run never mixes with another run's state, resume refuses settings that cannot apply and reports
those that do, the learning rate does not jump when the step count changes, metrics.jsonl holds
each step once, a kill -9 at any point of a checkpoint write resumes onto the uninterrupted loss
curve exactly, and a folder that cannot be written (read-only, full) stops the run with one line."""

import json
import os
import pathlib
import pickle
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from stema.cli import main
from stema.config import DemoConfig, OptimConfig, TrainerConfig
from stema.training import train
from stema.training.checkpoint import SHARDED_DIR, STATE_FILE, list_checkpoints
from stema.training.folder import RunFolderError
from stema.training.logging import read_metrics
from stema.training.optim import lr_multiplier

from checkpoint_kill import KILL_POINTS
from test_training_loop import Regression, losses, make_data, make_model, run

TESTS = Path(__file__).parent
SFT = ["data.train=builtin", "data.builtin_size=16", "data.max_length=48", "trainer.global_batch_size=4", "trainer.micro_batch_size=4",
       "trainer.progress_bar=false", "trainer.tensorboard=false", "trainer.export_hf=false"]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    from stema.models.tiny import TinyModelSpec, save_tiny_model

    spec = TinyModelSpec(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny", spec)


def sft(capsys, out, tiny_path, *overrides) -> tuple[int, str]:
    code = main(["sft", f"model.path={tiny_path}", f"trainer.output_dir={out}", *SFT, *overrides])
    return code, capsys.readouterr().err


def error_line(err: str, command: str = "sft") -> str:
    lines = [line for line in err.splitlines() if line.startswith(f"stema {command}:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


class RunsCode:
    """Unpickling this calls `Path.touch(marker)`: code run from a checkpoint file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


# -- safe checkpoints ------------------------------------------------------------------------------


def test_a_tampered_state_file_is_refused_and_runs_nothing(tmp_path):
    run(tmp_path / "run", max_steps=2)
    (step, folder), = list_checkpoints(tmp_path / "run" / "checkpoints")
    state = torch.load(folder / STATE_FILE, weights_only=True)  # what stema writes loads safely
    marker = tmp_path / "code-ran"
    torch.save({**state, "scheduler": RunsCode(marker)}, folder / STATE_FILE)
    with pytest.raises(RunFolderError) as refused:
        run(tmp_path / "run", max_steps=4, resume=True)
    message = str(refused.value)
    assert message.startswith(f"{folder / STATE_FILE}: refused:") and "nothing in it was run" in message and "\n" not in message
    assert not marker.exists()


def test_tampered_sharded_metadata_is_refused_and_runs_nothing(tmp_path):
    run(tmp_path / "run", max_steps=2)
    (step, folder), = list_checkpoints(tmp_path / "run" / "checkpoints")
    marker = tmp_path / "code-ran"
    (folder / SHARDED_DIR / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(RunFolderError, match=r"\.metadata: refused: it holds GLOBAL pathlib.Path.touch"):
        run(tmp_path / "run", max_steps=4, resume=True)
    assert not marker.exists()


def test_a_tampered_checkpoint_stops_the_cli_with_one_line(tmp_path, tiny_path, capsys):
    out = tmp_path / "run"
    assert sft(capsys, out, tiny_path, "trainer.max_steps=1")[0] == 0
    (step, folder), = list_checkpoints(out / "checkpoints")
    marker = tmp_path / "code-ran"
    torch.save({"scheduler": RunsCode(marker)}, folder / STATE_FILE)
    code, err = sft(capsys, out, tiny_path, "trainer.max_steps=2", "trainer.resume=true")
    assert code == 2 and "refused" in error_line(err) and not marker.exists()


# -- runs that reuse a folder -----------------------------------------------------------------------


def test_a_new_run_into_a_used_folder_is_refused_before_writing_and_overwrite_moves_it_aside(tmp_path, tiny_path, capsys):
    out = tmp_path / "run"
    assert sft(capsys, out, tiny_path, "trainer.max_steps=2")[0] == 0
    before = snapshot(out)
    code, err = sft(capsys, out, tiny_path, "trainer.max_steps=2", "optim.lr=1e-3")
    assert code == 2 and f"trainer.output_dir: {out} is not empty" in error_line(err)
    assert snapshot(out) == before  # nothing written, nothing deleted
    code, err = sft(capsys, out, tiny_path, "trainer.max_steps=2", "trainer.overwrite=true")
    assert code == 0 and f"moved the previous content of {out} to {out}.old-1" in err
    assert snapshot(out.with_name("run.old-1")) == {key.replace(str(out), str(out) + ".old-1"): value for key, value in before.items()}
    assert [r["step"] for r in read_metrics(out, "train")] == [1, 2]


def test_the_loop_refuses_a_new_run_over_another_runs_checkpoints(tmp_path):
    run(tmp_path, max_steps=2)
    with pytest.raises(RunFolderError, match="holds another run's checkpoints; set trainer.resume=true"):
        run(tmp_path, max_steps=4)


def test_resume_refuses_settings_that_cannot_apply_and_reports_those_that_do(tmp_path, tiny_path, capsys):
    out = tmp_path / "run"
    assert sft(capsys, out, tiny_path, "trainer.max_steps=2")[0] == 0
    before = snapshot(out)
    code, err = sft(capsys, out, tiny_path, "trainer.max_steps=3", "trainer.resume=true", "optim.lr=0.5", "trainer.seed=7")
    line = error_line(err)
    assert code == 2 and "cannot change on resume: optim.lr: 1e-05 in the checkpoint, now 0.5; trainer.seed: 0 in the checkpoint, now 7" in line
    assert snapshot(out) == before
    code, err = sft(capsys, out, tiny_path, "trainer.max_steps=3", "trainer.resume=true", "trainer.save_every=1")
    assert code == 0
    assert "applied on resume: trainer.max_steps: 2 -> 3; trainer.save_every: 0 -> 1" in err
    assert "resumed from step 2 of 3" in err
    assert [r["step"] for r in read_metrics(out, "train")] == [1, 2, 3]


def test_resume_with_different_data_is_refused(tmp_path, tiny_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "completion": str(i + 1)}) + "\n" for i in range(8)))
    out = tmp_path / "run"
    assert sft(capsys, out, tiny_path, f"data.train={data}", "trainer.max_steps=1")[0] == 0
    data.write_text(data.read_text().replace('"3+1="', '"3+2="'))
    code, err = sft(capsys, out, tiny_path, f"data.train={data}", "trainer.max_steps=2", "trainer.resume=true")
    assert code == 2 and "data.train_sha256" in error_line(err)


def test_raising_max_steps_on_resume_continues_the_learning_rate_without_a_jump(tmp_path):
    """Cosine decay over 6 steps, checkpoint at 4, resumed with max_steps 10: the lr of step 5
    is what the 6-step run used, then it decays on to the floor at step 10."""
    straight = tmp_path / "straight"
    run(straight, save_every=2)
    resumed = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run(resumed, save_every=2, crash_on_call=5)
    run(resumed, save_every=2, max_steps=10, resume=True)
    lrs = [r["lr"] for r in read_metrics(resumed, "train")]
    straight_lrs = [r["lr"] for r in read_metrics(straight, "train")]
    assert len(lrs) == 10 and lrs[:5] == straight_lrs[:5]
    assert all(later < earlier for earlier, later in zip(lrs[4:], lrs[5:]))  # decaying on, no jump up
    assert lrs[-1] > 0
    # Without the anchor the 10-step schedule would have put step 5 higher: the test can fail.
    cfg = OptimConfig(lr=0.05, warmup_steps=2, schedule="cosine")
    assert 0.05 * lr_multiplier(4, total_steps=10, cfg=cfg) > straight_lrs[4] * 1.2


def test_metrics_are_cut_back_to_the_resumed_checkpoint(tmp_path):
    """Killed during step 6, after step 5 was logged but checkpointed only at 4, with a torn line
    at the end: after the resume every step appears once and the curve is the uninterrupted one."""
    run(tmp_path / "straight", dropout=0.2, save_every=2, eval_every=1)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", dropout=0.2, save_every=2, eval_every=1, crash_on_call=6)
    with open(tmp_path / "resumed" / "metrics.jsonl", "a") as file:
        file.write('{"split": "train", "st')
    assert [r["step"] for r in read_metrics_lenient(tmp_path / "resumed")] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    run(tmp_path / "resumed", dropout=0.2, save_every=2, eval_every=1, resume=True)
    assert [r["step"] for r in read_metrics(tmp_path / "resumed", "train")] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in read_metrics(tmp_path / "resumed", "eval")] == [1, 2, 3, 4, 5, 6]
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")


def test_tensorboard_holds_each_step_once_after_a_resume(tmp_path):
    """Killed during step 6 after logging step 5, checkpointed at 4: the resumed run's event file
    purges the first one's steps after 4 (purge_step), so TensorBoard shows steps 1-6 once each."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def train_with_events(*, resume: bool, crash_on_call: int | None = None):
        trainer_cfg = TrainerConfig(output_dir=str(tmp_path), max_steps=6, global_batch_size=8, micro_batch_size=8, save_every=2,
                                    resume=resume, progress_bar=False, tensorboard=True)
        train(model=make_model(), algorithm=Regression(crash_on_call), train_examples=make_data(), eval_examples=None,
              trainer_cfg=trainer_cfg, optim_cfg=OptimConfig())

    with pytest.raises(KeyboardInterrupt):
        train_with_events(resume=False, crash_on_call=6)
    train_with_events(resume=True)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]


def read_metrics_lenient(folder: Path) -> list[dict]:
    records = []
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return records


def test_demo_refuses_a_used_out_folder_and_overwrite_moves_it_aside(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "results.json").write_text("{}")
    assert main(["demo", "--out", str(out)]) == 2
    assert "already holds a demo run" in error_line(capsys.readouterr().err, "demo")
    from stema.demo import Demo

    Demo(DemoConfig(out=str(out), overwrite=True, num_heldout=4))
    assert (tmp_path / "demo.old-1" / "results.json").exists() and list(out.iterdir()) == []


# -- kill -9 during a checkpoint write ----------------------------------------------------------------


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    run(out, dropout=0.2, save_every=2, eval_every=1)
    return out


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory):
    """One folder per kill point, each left by a run SIGKILLed there (`checkpoint_kill.py`)."""
    root = tmp_path_factory.mktemp("killed")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(TESTS / "checkpoint_kill.py"), str(root), *KILL_POINTS], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return root, json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("point", KILL_POINTS)
def test_kill_9_at_any_point_of_a_checkpoint_write_resumes_onto_the_same_curve(point, straight_run, killed_runs):
    root, signals = killed_runs
    assert signals[point] == signal.SIGKILL
    out = root / point
    result = run(out, dropout=0.2, save_every=2, eval_every=1, resume=True)
    assert result.resumed_from in (2, 4, 6)
    for split in ("train", "eval"):
        assert [r["step"] for r in read_metrics(out, split)] == [1, 2, 3, 4, 5, 6]  # none lost, none twice
    assert losses(out) == losses(straight_run)  # bit for bit
    assert not [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp")]


# -- folders that cannot be written ------------------------------------------------------------------


@pytest.fixture
def mount_tmpfs(tmp_path):
    """Mount a small tmpfs (options given) under tmp_path; skips where mounting is not permitted
    (it needs root or CAP_SYS_ADMIN), and unmounts afterwards."""
    mounted = []

    def mount(options: str) -> Path:
        target = tmp_path / f"mnt-{uuid.uuid4().hex[:8]}"
        target.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")
        mounted.append(target)
        return target

    yield mount
    for target in mounted:
        subprocess.run(["umount", "-l", str(target)], check=False)


def test_a_read_only_output_folder_stops_the_run_before_training(tmp_path, tiny_path, capsys, mount_tmpfs):
    read_only = mount_tmpfs("ro,size=1m")
    code, err = sft(capsys, read_only / "run", tiny_path, "trainer.max_steps=1")
    assert code == 2 and f"trainer.output_dir: cannot create {read_only / 'run'}: Read-only file system" in error_line(err)
    assert "train data" not in err  # stopped before the data and the model


def test_a_full_disk_stops_the_run_with_no_space_left_naming_the_file(tmp_path, capsys, mount_tmpfs):
    """The loop's checkpoint does not fit a 64 KiB tmpfs: one line naming the file and 'No space
    left on device'; no half-written checkpoint stays behind."""
    small = mount_tmpfs("size=64k")
    model = torch.nn.Sequential(torch.nn.Linear(4, 4096), torch.nn.Tanh(), torch.nn.Linear(4096, 1))  # 24,577 weights: ~290 KiB with AdamW state
    trainer_cfg = TrainerConfig(output_dir=str(small / "run"), max_steps=1, global_batch_size=8, micro_batch_size=8,
                                progress_bar=False, tensorboard=False)
    with pytest.raises(RunFolderError) as full:
        train(model=model, algorithm=Regression(), train_examples=make_data(), eval_examples=None, trainer_cfg=trainer_cfg,
              optim_cfg=OptimConfig())
    message = str(full.value)
    assert "No space left on device" in message and str(small / "run" / "checkpoints" / ".tmp-step-00000001") in message
    assert "\n" not in message
    assert not list((small / "run" / "checkpoints").iterdir())


def test_a_full_disk_during_a_cli_run_exits_2_with_one_line(tmp_path, tiny_path, capsys, mount_tmpfs):
    small = mount_tmpfs("size=128k")
    code, err = sft(capsys, small / "run", tiny_path, "trainer.max_steps=1")
    assert code == 2 and "No space left on device" in error_line(err)
