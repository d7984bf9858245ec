"""The training loop every trainer shares: optimizer and schedule, gradient accumulation with
global denominators, evaluation, atomic checkpoints with exact resume, metrics and progress."""

from .loop import Algorithm, TrainResult, train

__all__ = ["Algorithm", "TrainResult", "train"]
