"""Set-up and wrap-up that every trainer shares: output folder, saved config, device, seeds,
data reports and the final Hugging Face export."""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stema.config import to_yaml


@dataclass
class Run:
    command: str
    output_dir: Path
    device: torch.device

    @property
    def cache_dir(self) -> Path:
        """Where the built-in tiny model is written when model.path is 'tiny'."""
        return self.output_dir / "cache"

    @property
    def export_dir(self) -> Path:
        return self.output_dir / "hf"

    def say(self, message: str) -> None:
        print(f"[stema {self.command}] {message}", file=sys.stderr, flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def start_run(config: Any, *, command: str) -> Run:
    """Create the output folder, save the resolved config beside the results, seed, pick the device."""
    output_dir = Path(config.trainer.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(to_yaml(config))
    seed_everything(config.trainer.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run = Run(command=command, output_dir=output_dir, device=device)
    run.say(f"output in {output_dir}, device {device}")
    return run


def report_data(run: Run, split: str, examples: list, report: Any) -> None:
    """Print how many examples were kept and how over-long ones were handled (never silent)."""
    run.say(f"{split} data: {len(examples)} examples; {report.summary()}")
    if not examples:
        raise ValueError(f"{split} data: no example is left after length handling ({report.summary()})")
