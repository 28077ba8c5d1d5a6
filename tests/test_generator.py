"""Behaviour of TextGenerator: cached decoding equals full recomputation, batching equals one prompt at a
time, sampling is reproducible, and the stop / length rules hold."""

import logging

import pytest
import torch

from minillm.inference import GenerationConfig, TextGenerator
from minillm.inference.generator import apply_repetition_penalty, top_k_filter, top_p_filter
from minillm.model import MiniGPT, MiniGPTConfig

SMALL = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
             initializer_range=0.3)  # wide weights: a random model whose greedy output does not just repeat
VARIANTS = {
    "gqa_rope": dict(),
    "learned_layernorm_gelu": dict(position_embedding="learned", norm_type="layernorm", mlp_type="gelu"),
    "moe": dict(num_experts=4, num_experts_per_tok=2),
}
GREEDY = dict(temperature=0, stop_token_ids=[])


class ByteTokenizer:
    """Ids 0-255 are UTF-8 bytes, each decoded as one character (so any prefix decodes stably)."""

    eos_token_id, pad_token_id, bos_token_id = 256, 257, 258

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return ([self.bos_token_id] if add_special_tokens else []) + list(text.encode("utf-8"))

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        names = {256: "<eos>", 257: "<pad>", 258: "<bos>"}
        return "".join(chr(i) if i < 256 else "" if skip_special_tokens else names.get(i, "") for i in ids)


def build(seed: int = 0, **overrides) -> MiniGPT:
    torch.manual_seed(seed)
    return MiniGPT(MiniGPTConfig(**{**SMALL, **overrides})).eval()


def reference_greedy(model: MiniGPT, prompt: list[int], steps: int, penalty: float = 1.0) -> list[int]:
    """Full forward over the whole sequence, argmax, append; penalty applied by hand (CTRL rule)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids])).logits[0, -1].clone()
            for token in set(ids):
                value = logits[token]
                logits[token] = value / penalty if value > 0 else value * penalty
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_greedy_equals_full_recomputation(variant):
    model = build(**VARIANTS[variant])
    generator = TextGenerator(model)
    prompt = torch.randint(0, 300, (9,)).tolist()
    expected = reference_greedy(model, prompt, 25)
    assert len(set(expected)) > 5  # a degenerate repeat-one-token model would prove little
    assert generator.generate(prompt, max_new_tokens=25, **GREEDY) == expected
    assert generator.generate(prompt, max_new_tokens=25, use_cache=False, **GREEDY) == expected


@pytest.mark.parametrize("variant", VARIANTS)
def test_batch_of_different_lengths_equals_each_prompt_alone(variant):
    generator = TextGenerator(build(**VARIANTS[variant]))
    prompts = [torch.randint(0, 300, (n,)).tolist() for n in (3, 11, 6)]
    batched = generator.generate(prompts, max_new_tokens=15, **GREEDY)
    assert batched == [generator.generate(p, max_new_tokens=15, **GREEDY) for p in prompts]
    assert batched == generator.generate(prompts, max_new_tokens=15, use_cache=False, **GREEDY)


def test_repetition_penalty_counts_prompt_and_output_but_not_padding():
    model = build()
    generator = TextGenerator(model)
    prompts = [torch.randint(0, 300, (n,)).tolist() for n in (4, 10)]
    batched = generator.generate(prompts, max_new_tokens=12, repetition_penalty=1.8, **GREEDY)
    assert batched == [reference_greedy(model, p, 12, penalty=1.8) for p in prompts]


def test_seeded_sampling_is_reproducible_and_leaves_global_rng_alone():
    generator = TextGenerator(build())
    prompt = [1, 2, 3]
    rng_before = torch.random.get_rng_state()
    first = generator.generate(prompt, max_new_tokens=30, seed=123, stop_token_ids=[])
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert generator.generate(prompt, max_new_tokens=30, seed=123, stop_token_ids=[]) == first
    assert generator.generate(prompt, max_new_tokens=30, seed=124, stop_token_ids=[]) != first


def test_top_k_1_sampling_equals_greedy():
    generator = TextGenerator(build())
    prompt = [10, 20, 30, 40]
    sampled = generator.generate(prompt, max_new_tokens=20, top_k=1, seed=0, stop_token_ids=[])
    assert sampled == generator.generate(prompt, max_new_tokens=20, **GREEDY)


def test_top_p_filter_keeps_the_smallest_set_reaching_p():
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log()  # sorted: 0.5, 0.3, 0.15, 0.05
    kept = lambda p: torch.isfinite(top_p_filter(logits, p))[0].tolist()  # noqa: E731
    assert kept(0.4) == [False, True, False, False]
    assert kept(0.55) == [False, True, False, True]  # 0.5 alone falls short: one more token
    assert kept(0.7) == [False, True, False, True]
    assert kept(0.9) == [False, True, True, True]
    assert kept(1.0) == [True, True, True, True]
    kept_logits = top_p_filter(logits, 0.7)
    assert torch.equal(kept_logits[0, [1, 3]], logits[0, [1, 3]])


def test_top_k_filter_and_repetition_penalty_on_hand_made_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 1.0]])
    assert torch.isfinite(top_k_filter(logits, 2)).tolist() == [[True, False, False, False, True]]
    assert torch.equal(top_k_filter(logits, 0), logits)
    seen = torch.tensor([[True, True, False, True, False]])
    expected = torch.tensor([[1.0, -2.0, 0.5, -6.0, 1.0]])
    assert torch.equal(apply_repetition_penalty(logits, seen, 2.0), expected)


def test_stop_token_ends_its_row_and_other_rows_continue():
    tokenizer = ByteTokenizer()
    generator = TextGenerator(build(), tokenizer)
    prompts = [torch.randint(0, 300, (n,)).tolist() for n in (5, 8)]
    free = generator.generate(prompts, max_new_tokens=20, **GREEDY)
    stop = free[0][4]
    stopped = generator.generate(prompts, max_new_tokens=20, temperature=0, stop_token_ids=[stop])
    for row_free, row_stopped in zip(free, stopped):
        end = row_free.index(stop) + 1 if stop in row_free else len(row_free)
        assert row_stopped == row_free[:end]
    assert len(stopped[0]) <= 5 and any(len(r) == 20 for r in stopped)

    batch = torch.tensor([prompts[0][:5], prompts[1][:5]])
    config = GenerationConfig(max_new_tokens=20, temperature=0, stop_token_ids=[stop])
    out = generator.sample_generate(batch, config)
    first_stop = out[0, 5:].tolist().index(stop) + 5
    assert (out[0, first_stop + 1:] == tokenizer.pad_token_id).all()


def test_stop_string_cuts_the_text_and_stops_early():
    model = build()
    generator = TextGenerator(model, ByteTokenizer())
    free = generator.generate("hello", max_new_tokens=30, **GREEDY)
    stop_string = free[12:14]
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    text = generator.generate("hello", max_new_tokens=30, stop_strings=[stop_string], **GREEDY)
    assert text == free[:free.index(stop_string)]
    assert len(forwards) < 30


def test_max_length_counts_the_prompt():
    generator = TextGenerator(build())
    config = GenerationConfig(max_length=12, max_new_tokens=100, top_p=0.9, stop_token_ids=[])
    out = generator.sample_generate(torch.tensor([[1, 2, 3, 4, 5]]), config)
    assert out.shape == (1, 12) and out[0, :5].tolist() == [1, 2, 3, 4, 5]


def test_budget_is_clamped_to_the_context_and_too_long_prompts_fail(caplog):
    generator = TextGenerator(build())
    with caplog.at_level(logging.WARNING, logger="minillm.inference"):
        new = generator.generate(list(range(120)), max_new_tokens=20, **GREEDY)
    assert len(new) == 8
    assert "context of 128" in caplog.text
    with pytest.raises(ValueError, match="129 tokens.*context of 128"):
        generator.generate(list(range(129)), max_new_tokens=1)


def test_text_prompts_return_text():
    generator = TextGenerator(build(), ByteTokenizer())
    single = generator.generate("hello", max_new_tokens=10, temperature=0)
    assert isinstance(single, str)
    batch = generator.generate(["hello", "a longer prompt"], max_new_tokens=10, temperature=0)
    assert isinstance(batch, list) and len(batch) == 2 and batch[0] == single


def test_eos_stops_by_default_and_is_not_in_the_text():
    tokenizer = ByteTokenizer()
    generator = TextGenerator(build(), tokenizer)
    ids = tokenizer.encode("hi", add_special_tokens=True)
    free = generator.generate(ids, max_new_tokens=40, **GREEDY)
    tokenizer.eos_token_id = free[3]  # make the model "emit eos" by step 4
    end = free.index(free[3])
    assert generator.generate(ids, max_new_tokens=40, temperature=0) == free[:end + 1]
    assert generator.generate("hi", max_new_tokens=40, temperature=0) == tokenizer.decode(free[:end], True)


def test_model_mode_is_restored():
    model = build()
    model.train()
    TextGenerator(model).generate([1, 2], max_new_tokens=3)
    assert model.training


@pytest.mark.parametrize("field, value", [("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5),
                                          ("max_new_tokens", -1), ("repetition_penalty", 0.0), ("top_k", -1)])
def test_invalid_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        GenerationConfig(**{field: value})
    with pytest.raises(ValueError, match=field):
        TextGenerator(build()).generate([1], **{field: value})


def test_unknown_option_is_rejected():
    with pytest.raises(TypeError, match="top_q"):
        TextGenerator(build()).generate([1], top_q=0.5)
