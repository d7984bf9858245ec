"""STEMA: aligning language models with human preferences.

The training library grows here (configs, data, models, losses, trainers, rollout, distributed);
its compiled hot paths live in the sibling package `stema_kernels`.
"""

__version__ = "0.1.0"
