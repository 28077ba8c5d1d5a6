"""One batch loader for every dataset: a seeded order that is a function of (seed, epoch) alone, optional
length grouping, and a position that can be saved and restored.

Because the order depends on no global RNG, a resumed run continues from (`epoch`, `batch_index`) and
sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

Batch = dict[str, torch.Tensor]


def stack_collate(items: list[dict[str, torch.Tensor]]) -> Batch:
    """Stack equal-length items (packed pretraining windows)."""
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def pad_collate(pad_id: int) -> Callable[[list[dict[str, Any]]], Batch]:
    """Right-pad variable-length items: `*input_ids` with `pad_id`, `*labels` with -100, and add the
    matching `*attention_mask`; non-sequence values (e.g. a class label) are stacked."""

    def collate(items: list[dict[str, Any]]) -> Batch:
        batch: Batch = {}
        for key in items[0]:
            values = [item[key] for item in items]
            if not torch.is_tensor(values[0]) or values[0].dim() == 0:
                batch[key] = torch.as_tensor(values)
                continue
            width = max(v.numel() for v in values)
            fill = -100 if key.endswith("labels") else pad_id
            padded = torch.full((len(values), width), fill, dtype=values[0].dtype)
            for row, v in enumerate(values):
                padded[row, :v.numel()] = v
            batch[key] = padded
            if key.endswith("input_ids"):
                mask = torch.zeros((len(values), width), dtype=torch.long)
                for row, v in enumerate(values):
                    mask[row, :v.numel()] = 1
                batch[key.removesuffix("input_ids") + "attention_mask"] = mask
        return batch

    return collate


class BatchLoader:
    """Batches of `dataset` items in a seeded order.

    With `lengths`, batches are length-grouped: the shuffled indices are cut into windows of
    `group_size` batches, each window is sorted by length and split into batches, and the batches are
    shuffled again — so a batch holds items of similar length (little padding) while the order stays
    random from batch to batch.
    """

    def __init__(self, dataset: Dataset, batch_size: int, collate: Callable[[list[Any]], Batch] = stack_collate,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                 lengths: Sequence[int] | None = None, group_size: int = 50) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if lengths is not None and len(lengths) != len(dataset):
            raise ValueError(f"lengths has {len(lengths)} entries for a dataset of {len(dataset)}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.collate = collate
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.lengths = None if lengths is None else torch.as_tensor(lengths)
        self.group_size = group_size
        self.epoch = 0
        self.batch_index = 0

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _batches(self) -> list[torch.Tensor]:
        n = len(self.dataset)
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        if self.lengths is not None:
            window = self.batch_size * self.group_size
            groups = [order[i:i + window] for i in range(0, n, window)]
            order = torch.cat([g[torch.argsort(self.lengths[g], descending=True, stable=True)] for g in groups])
        batches = list(order.split(self.batch_size))
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.lengths is not None and self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator)]
        return batches

    def __iter__(self) -> Iterator[Batch]:
        batches = self._batches()
        while self.batch_index < len(batches):
            indices = batches[self.batch_index]
            self.batch_index += 1
            yield self.collate([self.dataset[int(i)] for i in indices])
        self.epoch += 1
        self.batch_index = 0

    def state_dict(self) -> dict[str, int]:
        """The position: after the last batch of an epoch (the iterator has not run past it yet) that is
        the start of the next epoch, so a checkpoint saved there resumes with the next batch."""
        if self.batch_index >= len(self):
            return {"epoch": self.epoch + 1, "batch_index": 0, "seed": self.seed}
        return {"epoch": self.epoch, "batch_index": self.batch_index, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batch_index, self.seed = state["epoch"], state["batch_index"], state["seed"]
