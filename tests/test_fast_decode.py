"""The fast decode path (a static KV cache and a compiled fixed-shape step) gives the eager loop's outputs,
compiles once per shape, and is chosen by the "auto" policy only once a compile pays for itself.

Compiling with inductor takes seconds on a CPU, so one compiled generator (batch 1) is shared by the
module; the other shapes trace with the `aot_eager` backend (the same graph, run by eager kernels), and
their inductor versions are marked slow."""

import dataclasses

import pytest
import torch
from torch._dynamo.utils import counters

from minillm.inference import GenerationConfig, TextGenerator
from minillm.inference.generator import FastDecodePolicy
from minillm.model import MiniGPT, MiniGPTConfig
from minillm.model.layers import StaticKVCache

SMALL = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=128, max_position_embeddings=100,
             initializer_range=0.3)  # context 100: the static cache (capacity 100) is filled to its end
ROPE_GQA_QKNORM = dict(qk_norm=True)
GPT2_STYLE = dict(position_embedding="learned", norm_type="layernorm", mlp_type="gelu", qkv_bias=True,
                  out_bias=True, mlp_bias=True, num_key_value_heads=4, tie_word_embeddings=True)
GREEDY = GenerationConfig(max_new_tokens=30, temperature=0, stop_token_ids=[])
TRACE_ONLY = {"backend": "aot_eager"}


class ByteTokenizer:
    """Ids 0-255 are UTF-8 bytes, each decoded as one character."""

    eos_token_id, pad_token_id, bos_token_id = 256, 257, 258

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return ([self.bos_token_id] if add_special_tokens else []) + list(text.encode("utf-8"))

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(i) for i in ids if i < 256)


def build(seed: int = 0, **overrides) -> MiniGPT:
    torch.manual_seed(seed)
    return MiniGPT(MiniGPTConfig(**{**SMALL, **overrides})).eval()


def prompts(lengths: list[int], seed: int = 1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=generator).tolist() for n in lengths]


@pytest.fixture(autouse=True, scope="module")
def roomy_recompile_limit():
    """Many models and shapes compile in this one process; keep dynamo from giving up on them."""
    with torch._dynamo.config.patch(recompile_limit=64):
        yield


@pytest.fixture(scope="module")
def rope_model() -> MiniGPT:
    return build(**ROPE_GQA_QKNORM)


@pytest.fixture(scope="module")
def compiled(rope_model) -> TextGenerator:
    """One inductor-compiled generator shared by the module (batch 1, capacity 100)."""
    return TextGenerator(rope_model, ByteTokenizer(), fast_decode=True, policy=FastDecodePolicy())


@pytest.fixture(scope="module")
def eager(rope_model) -> TextGenerator:
    return TextGenerator(rope_model, ByteTokenizer(), fast_decode=False)


def test_static_cache_forward_matches_the_growing_cache(rope_model):
    ids = torch.tensor(prompts([12])[0])[None]
    reference = rope_model(ids).logits
    cache = StaticKVCache(2, 1, rope_model.config.num_key_value_heads, 32, rope_model.config.attention_head_dim)
    with torch.no_grad():
        prefill = rope_model(ids[:, :8], past_key_values=cache, cache_position=torch.arange(8)).logits
        steps = [rope_model(ids[:, i:i + 1], past_key_values=cache, cache_position=torch.tensor([i])).logits
                 for i in range(8, 12)]
    torch.testing.assert_close(torch.cat([prefill, *steps], dim=1), reference, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cache_position"):
        rope_model(ids, past_key_values=cache)


def test_greedy_fast_equals_eager_up_to_the_context(compiled, eager):
    for prompt in prompts([5, 17, 1]):
        assert compiled.generate(prompt, GREEDY) == eager.generate(prompt, GREEDY)
    # prompt + new tokens = the model's context: the last step attends over the whole static cache
    long = dict(max_new_tokens=500, temperature=0, stop_token_ids=[])
    prompt = prompts([40], seed=2)[0]
    out = compiled.generate(prompt, **long)
    assert len(out) == SMALL["max_position_embeddings"] - 40
    assert out == eager.generate(prompt, **long)
    assert compiled.fast_stats.fast_generations >= 4 and compiled.fast_stats.eager_generations == 0


def test_second_call_reuses_the_compiled_step(compiled):
    prompt = prompts([9], seed=3)[0]
    compiled.generate(prompt, GREEDY)  # compiled here at the latest
    graphs, compiles = counters["stats"]["unique_graphs"], compiled.fast_stats.compiles
    compiled.generate(prompts([23], seed=4)[0], GREEDY)  # another prompt length, same shape
    compiled.generate(prompt, max_new_tokens=3, temperature=0)
    assert counters["stats"]["unique_graphs"] == graphs
    assert compiled.fast_stats.compiles == compiles == 1
    assert compiled.fast_stats.compile_seconds > 0
    assert compiled.policy.compile_seconds["cpu"] == pytest.approx(compiled.fast_stats.compile_seconds)


def test_seeded_sampling_and_penalties_match_eager(compiled, eager):
    config = GenerationConfig(max_new_tokens=25, temperature=0.9, top_k=50, top_p=0.95, min_p=0.01, seed=7,
                              repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.3,
                              stop_token_ids=[])
    prompt = prompts([11], seed=5)[0]
    first = compiled.generate(prompt, config)
    assert first == compiled.generate(prompt, config)  # reproducible
    assert first == eager.generate(prompt, config)


def test_stop_strings_stop_tokens_and_streaming_on_the_fast_path(compiled, eager):
    text = eager.generate("ab", GREEDY)
    stop = text[5:7]  # a string the greedy continuation contains
    config = GenerationConfig(max_new_tokens=30, temperature=0, stop_strings=[stop])
    expected = eager.generate("ab", config)
    assert compiled.generate("ab", config) == expected == text[:text.find(stop)]
    assert "".join(chunk.text for chunk in compiled.stream("ab", config)) == expected
    stop_id = ord(text[3])  # a stop token: the output ends with it
    ids = [ord(c) for c in "ab"]
    assert compiled.generate(ids, max_new_tokens=30, temperature=0, stop_token_ids=[stop_id]) == \
        eager.generate(ids, max_new_tokens=30, temperature=0, stop_token_ids=[stop_id])


def test_interleaved_streams_share_nothing(compiled, eager):
    """A second generation on a shape whose cache is in use decodes eagerly instead of overwriting it."""
    config = GenerationConfig(max_new_tokens=12, temperature=0, stop_token_ids=[])
    first, second = compiled.stream("xy", config), compiled.stream("hello", config)
    texts = ["", ""]
    for a, b in zip(first, second):
        texts[0] += a.text
        texts[1] += b.text
    assert texts == [eager.generate("xy", config), eager.generate("hello", config)]


@pytest.mark.parametrize("options", [TRACE_ONLY, pytest.param(None, marks=pytest.mark.slow)],
                         ids=["aot_eager", "inductor"])
@pytest.mark.parametrize("variant", [ROPE_GQA_QKNORM, GPT2_STYLE], ids=["rope_gqa_qknorm", "gpt2_style"])
def test_left_padded_batch_fast_equals_eager(variant, options):
    model = build(seed=3, **variant)
    fast = TextGenerator(model, fast_decode=True, compile_options=options)
    batch = prompts([3, 14, 8], seed=6)
    expected = TextGenerator(model, fast_decode=False).generate(batch, GREEDY)
    assert fast.generate(batch, GREEDY) == expected
    assert fast.generate(batch, GREEDY) == expected  # a second call reuses the cache and the graph
    assert fast.fast_stats.fast_generations == 2 and fast.fast_stats.compiles == 1
    assert [fast.generate(p, GREEDY) for p in batch] == expected  # a row alone decodes as in the batch


def test_fast_decode_false_is_the_eager_loop(rope_model):
    generator = TextGenerator(rope_model, fast_decode=False)
    prompt = prompts([6], seed=8)[0]
    reference = generator.generate(prompt, dataclasses.replace(GREEDY, use_cache=False))
    assert generator.generate(prompt, GREEDY) == reference
    assert generator.fast_stats.fast_generations == 0 and not generator._decoders
    with pytest.raises(ValueError, match="fast_decode"):
        TextGenerator(rope_model, fast_decode="yes")


def test_unsupported_options_fall_back_to_eager(rope_model):
    generator = TextGenerator(rope_model, fast_decode=True, compile_options=TRACE_ONLY)
    prompt = prompts([6], seed=9)[0]
    generator.generate(prompt, max_new_tokens=5, num_beams=2, temperature=0)
    generator.generate(prompt, max_new_tokens=5, temperature=0, use_cache=False)
    moe = TextGenerator(build(num_experts=4, num_experts_per_tok=2), fast_decode=True, compile_options=TRACE_ONLY)
    moe.generate(prompt, max_new_tokens=5, temperature=0)
    assert generator.fast_stats.fast_generations == moe.fast_stats.fast_generations == 0
    assert moe.fast_stats.eager_generations == 1


def test_policy_compiles_once_savings_cover_the_compile():
    policy = FastDecodePolicy(compile_seconds={"cpu": 10.0}, speedup={"cpu": 2.0})
    assert not policy.should_compile(0.0, "cpu")
    assert not policy.should_compile(19.9, "cpu")  # would have saved 9.95 s < 10 s
    assert policy.should_compile(20.0, "cpu")
    assert not FastDecodePolicy(compile_seconds={"cpu": 10.0}, speedup={"cpu": 1.0}).should_compile(1e6, "cpu")
    assert FastDecodePolicy(compile_seconds={"cuda": 30.0}, speedup={"cuda": 4.0}).should_compile(40.0, "cuda")


def test_auto_stays_eager_for_one_off_generations_then_switches(rope_model):
    policy = FastDecodePolicy(compile_seconds={"cpu": 5.0}, speedup={"cpu": 2.0})
    generator = TextGenerator(rope_model, fast_decode="auto", policy=policy, compile_options=TRACE_ONLY)
    prompt = prompts([7], seed=10)[0]
    expected = generator.generate(prompt, GREEDY)
    stats = generator.fast_stats
    assert stats.eager_generations == 1 and stats.fast_generations == 0
    shape = (1, SMALL["max_position_embeddings"])
    assert stats.eager_steps[shape] == GREEDY.max_new_tokens - 1  # every step after the prefill is timed
    stats.eager_seconds[shape] = 9.0  # as if it had decoded for 9 s: 4.5 s saved < 5 s
    generator.generate(prompt, GREEDY)
    assert stats.fast_generations == 0
    stats.eager_seconds[shape] = 11.0  # 5.5 s saved ≥ 5 s: compile
    assert generator.generate(prompt, GREEDY) == expected
    assert stats.fast_generations == 1 and stats.compiles == 1
    assert policy.compile_seconds["cpu"] == 5.0  # a test backend's compile does not teach the policy
    other = (3, SMALL["max_position_embeddings"])  # time spent on one shape does not buy another
    generator.generate(prompts([4, 5, 6]), GREEDY)
    assert other in stats.eager_seconds and stats.fast_generations == 1


def test_capacity_buckets():
    generator = TextGenerator(build(max_position_embeddings=1000))
    assert [generator._capacity(n) for n in (1, 128, 129, 300, 999)] == [128, 128, 256, 512, 1000]


def test_under_autocast_the_cache_takes_the_autocast_dtype(rope_model):
    """RL rollouts of a bf16 run generate inside autocast: keys and values come in bf16 while the weights
    are fp32, and the fast path must decode there as the eager loop does."""
    fast = TextGenerator(rope_model, ByteTokenizer(), fast_decode=True, compile_options=TRACE_ONLY)
    slow = TextGenerator(rope_model, ByteTokenizer(), fast_decode=False)
    rows = prompts([7, 12], seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fast.generate(rows, GREEDY)
        expected = slow.generate(rows, GREEDY)
    assert got == expected
    assert fast.fast_stats.fast_generations == 1
    assert fast._decoders and all(key[-1] == torch.bfloat16 for key in fast._decoders)
