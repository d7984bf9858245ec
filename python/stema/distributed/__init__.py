"""Multi-process training: the process group of a run (`World`), the FSDP2 / tensor-parallel seam
(`parallelize`) and sharded checkpoints (`torch.distributed.checkpoint`) with Hugging Face export.

A single process is world size 1 of the same code: `init_world` then makes no process group and
`parallelize` is not called.
"""

from .world import CollectiveError, World, close_world, init_world

__all__ = ["CollectiveError", "World", "close_world", "init_world"]
