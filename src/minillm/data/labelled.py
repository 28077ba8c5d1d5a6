"""Labelled token sequences (`<IMG> <Z_001> … </IMG> <CLS> <CLS_3> <EOS>`, label 3) with a word-level
vocabulary from a `vocab.json`: the data for label-token classification."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from minillm.data.formats import DataError, LabelledSequence, load_records, load_word_vocab
from minillm.data.loader import BatchLoader, pad_collate


class WordLevelTokenizer:
    """Whitespace-separated words to ids and back, from a fixed vocabulary."""

    def __init__(self, vocab: dict[str, int], unk_token: str = "<UNK>", pad_token: str = "<PAD>",
                 eos_token: str = "<EOS>") -> None:
        self.vocab = dict(vocab)
        self.id_to_token = {i: t for t, i in self.vocab.items()}
        self.unk_token_id = self.vocab.get(unk_token)
        self.pad_token_id = self.vocab.get(pad_token, 0)
        self.eos_token_id = self.vocab.get(eos_token)

    @classmethod
    def from_file(cls, path: str | Path) -> WordLevelTokenizer:
        return cls(load_word_vocab(path))

    def __len__(self) -> int:
        return max(self.vocab.values()) + 1

    def encode(self, tokens: str | Sequence[str]) -> list[int]:
        words = tokens.split() if isinstance(tokens, str) else tokens
        ids = []
        for word in words:
            if word in self.vocab:
                ids.append(self.vocab[word])
            elif self.unk_token_id is not None:
                ids.append(self.unk_token_id)
            else:
                raise DataError(f"token {word!r} is not in the vocabulary (and it has no <UNK>)")
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.id_to_token.get(int(i), "<UNK>") for i in ids)

    def label_token_ids(self, num_classes: int, prefix: str = "<CLS_") -> list[int]:
        """Ids of `<CLS_0>` … `<CLS_{num_classes-1}>`: the tokens label-token classification compares."""
        missing = [f"{prefix}{k}>" for k in range(num_classes) if f"{prefix}{k}>" not in self.vocab]
        if missing:
            raise DataError(f"label tokens missing from the vocabulary: {', '.join(missing)}")
        return [self.vocab[f"{prefix}{k}>"] for k in range(num_classes)]


class LabelledSequenceDataset(Dataset):
    """Sequences as ids for a causal LM. Longer than `max_length`: the head is cut, so the tail
    `… <CLS> <CLS_k> <EOS>` that carries the label always survives. `loss_on="label"` trains only the
    label token (classification); `"all"` trains every next token."""

    def __init__(self, data: Sequence[LabelledSequence] | str | Path, tokenizer: WordLevelTokenizer,
                 max_length: int = 64, loss_on: str = "label", skip_bad: bool = False) -> None:
        if loss_on not in ("label", "all"):
            raise ValueError(f"loss_on must be 'label' or 'all', got {loss_on!r}")
        if max_length < 3:
            raise ValueError(f"max_length must be at least 3, got {max_length}")
        records = (load_records(data, kind="labelled", skip_bad=skip_bad).records
                   if isinstance(data, (str, Path)) else list(data))
        if not records:
            raise DataError("no labelled sequence given")
        self.items = []
        for record in records:
            ids = torch.tensor(tokenizer.encode(record.tokens)[-max_length:], dtype=torch.long)
            if loss_on == "all":
                labels = ids.clone()
            else:
                labels = torch.full_like(ids, -100)
                label_token = tokenizer.vocab.get(f"<CLS_{record.label}>")
                positions = (ids == label_token).nonzero()
                if label_token is None or len(positions) == 0:
                    raise DataError(f"sequence with label {record.label} has no <CLS_{record.label}> token")
                labels[positions[-1]] = label_token
            self.items.append({"input_ids": ids, "labels": labels, "label": torch.tensor(record.label)})
        self.lengths = [len(item["input_ids"]) for item in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.items[index]


def labelled_data_loader(dataset: LabelledSequenceDataset, tokenizer: WordLevelTokenizer, batch_size: int = 32,
                         shuffle: bool = True, seed: int = 0) -> BatchLoader:
    return BatchLoader(dataset, batch_size, pad_collate(tokenizer.pad_token_id), shuffle=shuffle, seed=seed,
                       lengths=dataset.lengths)
