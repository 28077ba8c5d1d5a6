"""Supervised fine-tuning data: conversations → chat-template ids with loss only on assistant tokens."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from minillm.data.formats import Conversation, DataError, load_records
from minillm.data.loader import BatchLoader, pad_collate
from minillm.tokenizer.chat import encode_chat

logger = logging.getLogger("minillm.data")


class ConversationDataset(Dataset):
    """Each conversation rendered with the tokenizer's chat template; `labels` are the ids on assistant
    tokens (contents and their end token) and -100 elsewhere, so only the replies are learned.

    Conversations longer than `max_length` are cut on the right; one left with no assistant token is
    dropped and counted in `dropped`.
    """

    def __init__(self, data: Sequence[Conversation] | str | Path, tokenizer: Any, max_length: int = 512,
                 template: str | None = None, skip_bad: bool = False) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        conversations = (load_records(data, kind="conversation", skip_bad=skip_bad).records
                         if isinstance(data, (str, Path)) else list(data))
        self.items: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.dropped = 0
        for conversation in conversations:
            ids, mask = encode_chat(tokenizer, conversation.messages, template=template)
            ids, mask = ids[:max_length], mask[:max_length]
            if not any(mask):
                self.dropped += 1
                continue
            ids_t = torch.tensor(ids, dtype=torch.long)
            self.items.append((ids_t, torch.where(torch.tensor(mask, dtype=torch.bool), ids_t, -100)))
        if self.dropped:
            logger.warning("dropped %d conversation(s) with no assistant token within max_length=%d",
                           self.dropped, max_length)
        if not self.items:
            raise DataError(f"no usable conversation in {data if isinstance(data, (str, Path)) else 'the data'}")
        self.lengths = [len(ids) for ids, _ in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def num_tokens(self) -> int:
        return sum(self.lengths)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids, labels = self.items[index]
        return {"input_ids": ids, "labels": labels}


class ConversationDataLoader(BatchLoader):
    """Padded, length-grouped batches of `ConversationDataset` items (`input_ids`, `labels`,
    `attention_mask`), in a seeded, resumable order."""

    def __init__(self, data: ConversationDataset | Sequence[Conversation] | str | Path, tokenizer: Any,
                 batch_size: int = 8, max_length: int = 512, shuffle: bool = True, seed: int = 0,
                 template: str | None = None, group_by_length: bool = True, skip_bad: bool = False) -> None:
        dataset = data if isinstance(data, ConversationDataset) else ConversationDataset(
            data, tokenizer, max_length, template, skip_bad)
        super().__init__(dataset, batch_size, pad_collate(tokenizer.pad_token_id), shuffle=shuffle, seed=seed,
                         lengths=dataset.lengths if group_by_length else None)
