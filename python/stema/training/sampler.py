"""Seeded epoch sampler whose position is part of the checkpoint, so a resumed run sees the same
examples in the same order as an uninterrupted one."""

from __future__ import annotations

import torch


class EpochSampler:
    """Hands out global batches of example indices: a fresh seeded permutation each epoch (or the
    natural order), the last incomplete batch of an epoch dropped."""

    def __init__(self, num_examples: int, *, batch_size: int, seed: int, shuffle: bool):
        if num_examples < batch_size:
            raise ValueError(f"{num_examples} training examples are fewer than one global batch of {batch_size}")
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0  # batches already taken in this epoch
        self._order = self._permutation(0)

    @property
    def batches_per_epoch(self) -> int:
        return self.num_examples // self.batch_size

    def _permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_examples))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_examples, generator=generator).tolist()

    def next_batch(self) -> list[int]:
        if self.position == self.batches_per_epoch:
            self.epoch += 1
            self.position = 0
            self._order = self._permutation(self.epoch)
        start = self.position * self.batch_size
        self.position += 1
        return self._order[start : start + self.batch_size]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "num_examples": self.num_examples}

    def load_state_dict(self, state: dict) -> None:
        if state["num_examples"] != self.num_examples:
            raise ValueError(
                f"the checkpoint was taken over {state['num_examples']} training examples but the data now has "
                f"{self.num_examples}: resume needs the same data"
            )
        self.epoch = state["epoch"]
        self.position = state["position"]
        self._order = self._permutation(self.epoch)
