"""Generation beyond greedy/sampling basics: streaming, min-p, OpenAI penalties, beam search, chat helpers."""

import math

import pytest
import torch

from minillm.inference.generator import (
    GenerationConfig,
    TextGenerator,
    _IncrementalDetokenizer,
    min_p_filter,
)
from minillm.model import MiniGPT, MiniGPTConfig


@pytest.fixture(scope="module")
def model(tokenizer) -> MiniGPT:
    torch.manual_seed(3)
    return MiniGPT(MiniGPTConfig(vocab_size=len(tokenizer), hidden_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                                 max_position_embeddings=256)).eval()


@pytest.fixture(scope="module")
def generator(model, tokenizer) -> TextGenerator:
    return TextGenerator(model, tokenizer)


PROMPTS = ["从前有一只小猫，", "Once upon a time", "小明有3个苹果"]


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("options", [dict(do_sample=False), dict(temperature=0.9, top_p=0.95, seed=7),
                                     dict(do_sample=False, stop_strings=["的", "e "])])
def test_streamed_chunks_join_to_the_generated_text(generator, prompt, options):
    whole = generator.generate(prompt, max_new_tokens=40, **options)
    chunks = list(generator.stream(prompt, max_new_tokens=40, **options))
    assert "".join(c.text for c in chunks) == whole
    assert chunks[-1].finish_reason in ("stop", "length") and all(c.finish_reason is None for c in chunks[:-1])
    # never half a character mid-stream (a random model can emit invalid byte runs; then the text has them too)
    assert all("\ufffd" not in c.text for c in chunks[:-1]) or "\ufffd" in whole
    if options.get("stop_strings"):
        assert not any(s in whole for s in options["stop_strings"])


def test_incremental_detokenizer_never_splits_a_chinese_character(tokenizer):
    text = "模型训练完成了，我们来聊天吧！Mini-LLM 你好。"
    ids = tokenizer.encode(text)
    pieces = [tokenizer.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces)  # the fixture tokenizer does split characters into bytes
    detok = _IncrementalDetokenizer(tokenizer)
    released = [detok.add(i) for i in ids]
    assert "".join(released) + detok.flush() == text
    assert all("\ufffd" not in r for r in released)


def test_closing_a_stream_stops_decoding(generator, monkeypatch):
    calls = []
    original = generator._next_logits
    monkeypatch.setattr(generator, "_next_logits", lambda *a, **k: calls.append(1) or original(*a, **k))
    stream = generator.stream("Once upon a time", max_new_tokens=50, do_sample=False, stop_token_ids=[])
    for _ in range(3):
        next(stream)
    stream.close()
    assert len(calls) == 3


def test_stream_reports_length_and_stop(generator, tokenizer):
    chunks = list(generator.stream("Once", max_new_tokens=5, do_sample=False, stop_token_ids=[]))
    assert chunks[-1].finish_reason == "length" and sum(len(c.token_ids) for c in chunks) == 5
    first = generator.generate(tokenizer.encode("Once", add_special_tokens=True), max_new_tokens=20, seed=5,
                               stop_token_ids=[])
    at = next(i for i in range(1, len(first)) if first[i] not in first[:i])  # a token not seen before
    chunks = list(generator.stream("Once", max_new_tokens=20, seed=5, stop_token_ids=[first[at]]))
    assert chunks[-1].finish_reason == "stop" and [t for c in chunks for t in c.token_ids] == first[:at]


def test_chat_helpers_use_the_template_and_stop_at_end_of_turn(generator, tokenizer):
    messages = [{"role": "system", "content": "简短回答。"}, {"role": "user", "content": "你好"}]
    assert generator.chat_prompt_ids(messages) == tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert tokenizer.im_end_id in generator.chat_stop_ids()
    reply = generator.chat(messages, max_new_tokens=30, do_sample=False)
    ids = generator.generate(generator.chat_prompt_ids(messages), max_new_tokens=30, do_sample=False,
                             stop_token_ids=generator.chat_stop_ids())
    if ids and ids[-1] in generator.chat_stop_ids():
        ids = ids[:-1]
    assert reply == tokenizer.decode(ids, skip_special_tokens=True)


def test_min_p_keeps_tokens_above_the_scaled_top_probability():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(min_p_filter(logits, 0.2))  # threshold 0.1
    assert kept.tolist() == [[True, True, True, False]]
    assert torch.equal(min_p_filter(logits, 0.0), logits)


def test_presence_and_frequency_penalties_match_openai_formula(generator, model):
    """With the penalties, each greedy step picks argmax(logits - freq·count - presence·[count > 0]) over
    the counts of the tokens generated so far, computed here from full forwards."""
    prompt = [1, 40, 41, 42]
    freq, presence = 0.7, 0.4
    out = generator.generate(prompt, max_new_tokens=12, do_sample=False, stop_token_ids=[],
                             frequency_penalty=freq, presence_penalty=presence)
    seq, counts = list(prompt), torch.zeros(model.config.vocab_size)
    with torch.no_grad():
        for _ in range(12):
            logits = model(torch.tensor([seq])).logits[0, -1]
            token = int((logits - freq * counts - presence * (counts > 0).float()).argmax())
            seq.append(token)
            counts[token] += 1
    assert out == seq[len(prompt):]
    plain = generator.generate(prompt, max_new_tokens=12, do_sample=False, stop_token_ids=[])
    assert len(set(out)) > len(set(plain))  # the penalties do spread the choices here


def test_beam_search_with_one_beam_equals_greedy(generator):
    prompts = [[1, 5, 6, 7], [1, 9]]
    greedy = generator.generate(prompts, max_new_tokens=15, do_sample=False, stop_token_ids=[])
    stop = greedy[0][4]
    greedy = generator.generate(prompts, max_new_tokens=15, do_sample=False, stop_token_ids=[stop])
    width = 4
    ids = torch.tensor([[0, 0, 1, 9], [1, 5, 6, 7]][::-1])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    out = generator._beam_search(ids, mask, GenerationConfig(max_new_tokens=15, num_beams=1, early_stopping=True,
                                                             stop_token_ids=[stop]))
    for row, expected in zip(out[:, width:].tolist(), greedy):
        end = row.index(stop) + 1 if stop in row else len(row)
        assert row[:end] == expected


def test_beam_search_batch_equals_each_prompt_alone(generator):
    prompts = [[1, 5, 6, 7, 8, 9], [1, 9], [1, 30, 31]]
    config = GenerationConfig(max_new_tokens=12, num_beams=3, stop_token_ids=[7, 12])
    batched = generator.generate(prompts, config)
    assert batched == [generator.generate(p, config) for p in prompts]


def test_beam_search_finds_a_sequence_at_least_as_likely_as_greedy(generator, model):
    prompt = [1, 20, 21]

    def log_prob(new: list[int]) -> float:
        seq = torch.tensor([prompt + new])
        with torch.no_grad():
            logp = model(seq).logits[0, :-1].log_softmax(-1)
        return float(sum(logp[len(prompt) - 1 + i, t] for i, t in enumerate(new)))

    greedy = generator.generate(prompt, max_new_tokens=8, do_sample=False, stop_token_ids=[])
    beam = generator.generate(prompt, max_new_tokens=8, num_beams=4, stop_token_ids=[])
    assert len(beam) == len(greedy) == 8
    assert log_prob(beam) >= log_prob(greedy) - 1e-5
    assert math.isfinite(log_prob(beam))


def test_invalid_generation_options_are_refused():
    for bad in (dict(min_p=1.5), dict(presence_penalty=3.0), dict(num_beams=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            GenerationConfig(**bad)


@pytest.mark.parametrize(("beams", "length_penalty", "early_stopping"), [(3, 1.0, False), (4, 0.5, True), (2, 2.0, False)])
def test_beam_search_equals_transformers_on_the_same_weights(beams, length_penalty, early_stopping):
    """transformers' beam search on our weights (as a LlamaForCausalLM) picks the same sequences, with stop
    tokens that end some hypotheses early, in a left-padded batch."""
    pytest.importorskip("transformers")
    from minillm.model.hf import to_transformers

    torch.manual_seed(11)
    model = MiniGPT(MiniGPTConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)).eval()
    generator = TextGenerator(model)
    prompts = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12]]
    # stop tokens the model does produce, so hypotheses finish at different lengths
    free = generator.generate(prompts, max_new_tokens=12, num_beams=beams, length_penalty=length_penalty,
                              early_stopping=early_stopping, stop_token_ids=[])
    stops = sorted({free[0][3], free[1][5]})
    ours = generator.generate(prompts, max_new_tokens=12, num_beams=beams, length_penalty=length_penalty,
                              early_stopping=early_stopping, stop_token_ids=stops)
    hf = to_transformers(model)
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=12, num_beams=beams, do_sample=False,
                      length_penalty=length_penalty, early_stopping=early_stopping, eos_token_id=stops,
                      pad_token_id=0)
    theirs = []
    for row in out[:, width:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        theirs.append(row[:end])
    assert ours == theirs
    if length_penalty <= 1.0:  # (a strong length penalty rightly prefers the hypotheses that run to the end)
        assert any(row and row[-1] in stops for row in ours)  # some hypothesis did end on a stop token
