"""Data: the built-in corpus, pretraining token shards and the datasets built on them."""

from minillm.data.pretrain import DataError, LanguageModelingDataset, PretrainDataLoader, TokenShards

__all__ = ["DataError", "LanguageModelingDataset", "PretrainDataLoader", "TokenShards"]
