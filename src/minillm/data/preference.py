"""Preference data for DPO and reward models: a shared prompt, a chosen and a rejected reply."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from minillm.data.formats import DataError, Message, PreferencePair, load_records
from minillm.data.loader import BatchLoader, pad_collate
from minillm.tokenizer.chat import encode_chat


def _encode_reply(tokenizer: Any, prompt: tuple[Message, ...], reply: str,
                  template: str | None) -> tuple[list[int], list[int]]:
    return encode_chat(tokenizer, (*prompt, Message("assistant", reply)), template=template)


def _truncate(ids: list[int], mask: list[int], max_length: int, max_prompt_length: int) -> tuple[list[int], list[int]]:
    """Keep the end of the prompt (at most `max_prompt_length` tokens) and the start of the reply."""
    if len(ids) <= max_length:
        return ids, mask
    start = mask.index(1) if 1 in mask else len(ids)  # first reply token
    keep_prompt = min(start, max_prompt_length)
    room = max_length - keep_prompt
    return ids[start - keep_prompt:start + room], mask[start - keep_prompt:start + room]


class PreferenceDataset(Dataset):
    """Each pair as two chat-template sequences (prompt + chosen, prompt + rejected) with labels on the
    reply tokens only: DPO sums the policy's log-probabilities over those labels, and a reward model
    scores each sequence at its last token."""

    def __init__(self, data: Sequence[PreferencePair] | str | Path, tokenizer: Any, max_length: int = 512,
                 max_prompt_length: int | None = None, template: str | None = None, skip_bad: bool = False) -> None:
        pairs = (load_records(data, kind="preference", skip_bad=skip_bad).records
                 if isinstance(data, (str, Path)) else list(data))
        if not pairs:
            raise DataError(f"no preference pair in {data if isinstance(data, (str, Path)) else 'the data'}")
        max_prompt_length = max_length // 2 if max_prompt_length is None else max_prompt_length
        if not 0 < max_prompt_length < max_length:
            raise ValueError(f"max_prompt_length must be in (0, max_length={max_length}), got {max_prompt_length}")
        self.items = []
        for pair in pairs:
            item = {}
            for side, reply in (("chosen", pair.chosen), ("rejected", pair.rejected)):
                ids, mask = _truncate(*_encode_reply(tokenizer, pair.prompt, reply, template), max_length,
                                      max_prompt_length)
                ids_t = torch.tensor(ids, dtype=torch.long)
                item[f"{side}_input_ids"] = ids_t
                item[f"{side}_labels"] = torch.where(torch.tensor(mask, dtype=torch.bool), ids_t, -100)
            self.items.append(item)
        self.lengths = [max(len(i["chosen_input_ids"]), len(i["rejected_input_ids"])) for i in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.items[index]


class DPODataLoader(BatchLoader):
    """Padded, length-grouped batches of preference pairs: `chosen_input_ids`, `chosen_labels`,
    `chosen_attention_mask` and the same for `rejected_`, in a seeded, resumable order."""

    def __init__(self, data: PreferenceDataset | Sequence[PreferencePair] | str | Path, tokenizer: Any,
                 batch_size: int = 8, max_length: int = 512, max_prompt_length: int | None = None,
                 shuffle: bool = True, seed: int = 0, template: str | None = None, group_by_length: bool = True,
                 skip_bad: bool = False) -> None:
        dataset = data if isinstance(data, PreferenceDataset) else PreferenceDataset(
            data, tokenizer, max_length, max_prompt_length, template, skip_bad)
        super().__init__(dataset, batch_size, pad_collate(tokenizer.pad_token_id), shuffle=shuffle, seed=seed,
                         lengths=dataset.lengths if group_by_length else None)
