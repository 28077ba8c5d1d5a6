"""Data: the built-in corpus and tasks, one normaliser for every common schema, and the datasets and
loaders of each stage."""

from minillm.data.formats import (
    Conversation,
    DataError,
    LabelledSequence,
    Message,
    PreferencePair,
    load_records,
)
from minillm.data.labelled import LabelledSequenceDataset, WordLevelTokenizer
from minillm.data.loader import BatchLoader
from minillm.data.preference import DPODataLoader, PreferenceDataset
from minillm.data.pretrain import LanguageModelingDataset, PretrainDataLoader, TokenShards
from minillm.data.sft import ConversationDataLoader, ConversationDataset

__all__ = ["BatchLoader", "Conversation", "ConversationDataLoader", "ConversationDataset", "DPODataLoader",
           "DataError", "LabelledSequence", "LabelledSequenceDataset", "LanguageModelingDataset", "Message",
           "PreferenceDataset", "PreferencePair", "PretrainDataLoader", "TokenShards", "WordLevelTokenizer",
           "load_records"]
