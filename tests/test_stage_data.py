"""Built-in stage tasks and the SFT / preference / labelled-sequence datasets and loaders."""

import numpy as np
import pytest
import torch

from minillm.data.builtin import (
    Identity,
    builtin_labelled_sequences,
    builtin_preference_pairs,
    builtin_rl_prompts,
    builtin_sft_conversations,
    check_answer,
    extract_answer,
    labelled_vocab,
)
from minillm.data.formats import Conversation, Message, PreferencePair
from minillm.data.labelled import LabelledSequenceDataset, WordLevelTokenizer, labelled_data_loader
from minillm.data.loader import BatchLoader, pad_collate
from minillm.data.preference import DPODataLoader, PreferenceDataset
from minillm.data.sft import ConversationDataLoader, ConversationDataset

IM_END = "<|im_end|>"


# ------------------------------------------------------------------------------ built-in tasks
def test_sft_conversations_mix_problems_stories_and_identity():
    conversations = builtin_sft_conversations(400, seed=3, identity=Identity(name="小星", maker="Acme",
                                                                            maker_zh="极客实验室"))
    assert len(conversations) == 400
    assert conversations == builtin_sft_conversations(400, seed=3, identity=Identity(name="小星", maker="Acme",
                                                                                    maker_zh="极客实验室"))
    replies = [c.messages[-1].content for c in conversations]
    assert all(c.messages[0].role == "user" and c.messages[1].role == "assistant" for c in conversations)
    solved = sum(extract_answer(r) is not None and ("答案" in r or "answer is" in r) for r in replies)
    identity = [r for r in replies if "小星" in r]
    assert 0.6 < solved / 400 < 0.8
    assert 20 < len(identity) < 60 and any("极客实验室" in r or "Acme" in r for r in identity)
    assert not any("Mini-LLM" in r for r in replies)  # the identity is a parameter


def test_preference_pairs_prefer_the_right_answer():
    pairs = builtin_preference_pairs(300, seed=4)
    for pair in pairs:
        question = pair.prompt[-1].content
        assert pair.prompt[-1].role == "user"
        expected = extract_answer(pair.chosen)
        assert check_answer(expected, pair.chosen) and not check_answer(expected, pair.rejected), question
    unhelpful = sum(extract_answer(p.rejected) is None for p in pairs)
    assert 30 < unhelpful < 100  # ~20% refusals, the rest wrong answers


def test_rl_prompts_reward_the_checker():
    prompt = builtin_rl_prompts(5, seed=2)[0]
    assert prompt.reward(prompt.problem.solution) == 1.0
    assert prompt.reward(f"答案：{prompt.answer + 1}") == 0.0
    heldout = builtin_rl_prompts(50, heldout=True)
    training = {p.problem.question for p in builtin_rl_prompts(2000, seed=0)}
    assert sum(p.problem.question in training for p in heldout) < 10


def test_labelled_sequences_carry_a_learnable_label():
    vocab = labelled_vocab(num_codes=64, num_classes=4)
    sequences = builtin_labelled_sequences(500, seed=1)
    assert all(t in vocab for s in sequences for t in s.tokens)
    assert all(s.tokens[-3:] == ("<CLS>", f"<CLS_{s.label}>", "<EOS>") for s in sequences)
    # An independent classifier: the band (16 codes per class) most codes fall in.
    correct = 0
    for s in sequences:
        bands = [int(t[3:6]) // 16 for t in s.tokens if t.startswith("<Z_")]
        correct += np.bincount(bands, minlength=4).argmax() == s.label
    assert correct / len(sequences) > 0.95
    assert len({s.label for s in sequences}) == 4


# ------------------------------------------------------------------------------ the loader
def test_length_grouping_cuts_padding_and_keeps_every_item_once():
    lengths = list(np.random.default_rng(0).integers(1, 200, size=400))
    dataset = [{"input_ids": torch.ones(n, dtype=torch.long)} for n in lengths]

    def padding(loader):
        seen, pad = 0, 0
        for batch in loader:
            seen += batch["input_ids"].shape[0]
            pad += int((batch["attention_mask"] == 0).sum())
        return seen, pad

    grouped = BatchLoader(dataset, 8, pad_collate(0), seed=1, lengths=lengths)
    plain = BatchLoader(dataset, 8, pad_collate(0), seed=1)
    (n_grouped, pad_grouped), (n_plain, pad_plain) = padding(grouped), padding(plain)
    assert n_grouped == n_plain == 400
    assert pad_grouped < 0.2 * pad_plain
    order = [len(b["input_ids"][0]) for b in BatchLoader(dataset, 8, pad_collate(0), seed=1, lengths=lengths)]
    assert order != sorted(order, reverse=True)  # batches are still shuffled


def test_pad_collate_pads_ids_labels_and_builds_the_mask():
    batch = pad_collate(7)([{"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor([-100, 2, 3]),
                             "label": torch.tensor(1)},
                            {"input_ids": torch.tensor([4]), "labels": torch.tensor([4]), "label": torch.tensor(0)}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["label"].tolist() == [1, 0]


# ------------------------------------------------------------------------------ SFT
MULTI_TURN = Conversation((
    Message("system", "你是一个乐于助人的助手。"),
    Message("user", "小明有3个苹果，又买了5个，现在有几个？"),
    Message("assistant", "3 + 5 = 8。答案：8"),
    Message("user", "Tell me a short story."),
    Message("assistant", "Tom went to the park. He found a red ball."),
    Message("user", "谢谢！"),
    Message("assistant", "不客气 😊"),
))


def test_masked_in_sft_tokens_decode_to_exactly_the_assistant_turns(tokenizer):
    dataset = ConversationDataset([MULTI_TURN], tokenizer, max_length=512)
    item = dataset[0]
    kept = item["input_ids"][item["labels"] != -100]
    assistant = [m.content for m in MULTI_TURN.messages if m.role == "assistant"]
    assert tokenizer.decode(kept.tolist()) == "".join(a + IM_END for a in assistant)
    assert torch.equal(item["labels"][item["labels"] != -100], kept)


def test_sft_truncation_and_loader(tokenizer):
    conversations = builtin_sft_conversations(64, seed=5)
    dataset = ConversationDataset(conversations + [MULTI_TURN], tokenizer, max_length=64)
    assert max(dataset.lengths) == 64 and len(dataset) + dataset.dropped == 65 and len(dataset) > 30
    loader = ConversationDataLoader(dataset, tokenizer, batch_size=8, seed=0)
    batches = list(loader)
    assert sum(b["input_ids"].shape[0] for b in batches) == len(dataset)
    for batch in batches:
        assert batch["attention_mask"].shape == batch["input_ids"].shape
        assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    # A conversation whose first reply starts after max_length is dropped and counted.
    long_prompt = Conversation((Message("user", "很长的问题" * 40), Message("assistant", "好")))
    short = Conversation((Message("user", "hi"), Message("assistant", "ok")))
    assert ConversationDataset([long_prompt, short], tokenizer, max_length=64).dropped == 1


# ------------------------------------------------------------------------------ preferences
def test_preference_items_share_the_prompt_and_label_only_the_replies(tokenizer):
    pair = PreferencePair((Message("system", "简洁作答。"), Message("user", "2 + 2 = ?")), "2 + 2 = 4。答案：4",
                          "我不知道。")
    item = PreferenceDataset([pair], tokenizer, max_length=256)[0]
    chosen, rejected = item["chosen_input_ids"], item["rejected_input_ids"]
    start = int((item["chosen_labels"] != -100).nonzero()[0])
    assert start == int((item["rejected_labels"] != -100).nonzero()[0])
    assert torch.equal(chosen[:start], rejected[:start])  # the shared prompt
    assert tokenizer.decode(chosen[item["chosen_labels"] != -100].tolist()) == pair.chosen + IM_END
    assert tokenizer.decode(rejected[item["rejected_labels"] != -100].tolist()) == pair.rejected + IM_END


def test_preference_truncation_keeps_the_prompt_end_and_the_reply_start(tokenizer):
    pair = PreferencePair((Message("user", "背景" * 100 + "问题？"),), "回答" * 50, "不")
    item = PreferenceDataset([pair], tokenizer, max_length=40, max_prompt_length=20)[0]
    ids, labels = item["chosen_input_ids"], item["chosen_labels"]
    assert len(ids) == 40
    start = int((labels != -100).nonzero()[0])
    assert start == 20
    assert "问题？" in tokenizer.decode(ids[:start].tolist())
    batch = next(iter(DPODataLoader([pair, *builtin_preference_pairs(5)], tokenizer, batch_size=6, max_length=40)))
    assert {"chosen_input_ids", "chosen_labels", "chosen_attention_mask", "rejected_input_ids",
            "rejected_labels", "rejected_attention_mask"} <= set(batch)


# ------------------------------------------------------------------------------ labelled sequences
def test_labelled_dataset_keeps_the_tail_and_trains_the_label_token():
    tokenizer = WordLevelTokenizer(labelled_vocab())
    sequences = builtin_labelled_sequences(20, seed=2, length=(30, 40))
    dataset = LabelledSequenceDataset(sequences, tokenizer, max_length=16)
    for sequence, item in zip(sequences, dataset):
        assert len(item["input_ids"]) == 16
        assert tokenizer.decode(item["input_ids"][-3:].tolist()) == f"<CLS> <CLS_{sequence.label}> <EOS>"
        trained = item["labels"][item["labels"] != -100].tolist()
        assert trained == tokenizer.label_token_ids(4)[sequence.label:sequence.label + 1]
    batch = next(iter(labelled_data_loader(dataset, tokenizer, batch_size=4)))
    assert batch["label"].shape == (4,)
    with pytest.raises(Exception, match="not in the vocabulary"):
        WordLevelTokenizer({"<A>": 0}).encode("<B>")
