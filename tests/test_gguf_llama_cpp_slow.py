"""The GGUF files of `minillm export gguf` run in llama.cpp (through llama-cpp-python) as in PyTorch: the
same logits (within each dtype's rounding), the same greedy continuation, and the same token ids for
English text and our chat template (slow: llama-cpp-python builds llama.cpp from source, and each file is
loaded in a fresh llama.cpp context)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")

from minillm.export.gguf import export_gguf  # noqa: E402
from minillm.inference.generator import GenerationConfig, TextGenerator  # noqa: E402
from minillm.model import MiniGPT, MiniGPTConfig  # noqa: E402

PROMPT = "Tom has 5 apples and gives 2 of them to Amy. How many apples does Tom have now?"
NEW_TOKENS = 24
# Largest |logit difference| allowed, relative to the largest |logit| of our model.
TOLERANCE = {"f32": 1e-3, "f16": 1e-2, "bf16": 4e-2, "q8_0": 4e-2}
GGML_TYPE_F32 = 0
ARCHITECTURES = {"llama": dict(), "llama_head_dim_48": dict(head_dim=48),
                 "llama_biases_untied": dict(qkv_bias=True, out_bias=True, mlp_bias=True, tie_word_embeddings=False),
                 "qwen2": dict(qkv_bias=True, out_bias=False), "qwen3": dict(qk_norm=True, head_dim=48)}


def model_for(tokenizer, **fields) -> MiniGPT:
    torch.manual_seed(0)
    config = MiniGPTConfig(**{**dict(vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=3,
                                     num_attention_heads=4, num_key_value_heads=2, intermediate_size=256,
                                     max_position_embeddings=256, initializer_range=0.08,
                                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=tokenizer.pad_token_id), **fields})
    return MiniGPT(config).eval()


def load(path) -> llama_cpp.Llama:
    """The file in llama.cpp with f32 keys and values in the cache (an f32 file is compared without the default
    f16 cache rounding) and without the CPU's repacked weight layouts (`--no-repack`): with them, llama.cpp
    0.3.36's build crashes on q8_0 weights on AVX-512/AMX CPUs, llama.cpp's own quantised files included."""
    low_level = llama_cpp.llama.llama_cpp
    default_params = low_level.llama_model_default_params

    def no_repack():
        params = default_params()
        params.use_extra_bufts = False
        return params

    low_level.llama_model_default_params = no_repack
    try:
        return llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=256, n_batch=256, n_threads=2,
                               type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, verbose=False)
    finally:
        low_level.llama_model_default_params = default_params


def llama_cpp_greedy(llm: llama_cpp.Llama, ids: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    """Greedy continuation in llama.cpp, one token per call, and the logits of every position."""
    llm.reset()
    llm.eval(ids)
    new = []
    for _ in range(steps):
        new.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([new[-1]])
    return new, np.array(llm.scores[:llm.n_tokens], dtype=np.float32)


def measure(model, tokenizer, path) -> dict:
    ids = tokenizer.encode(PROMPT)
    llm = load(path)
    theirs_new, theirs_logits = llama_cpp_greedy(llm, ids, NEW_TOKENS)
    ours_new = TextGenerator(model, tokenizer, fast_decode=False).generate(
        ids, GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, stop_token_ids=[]))
    with torch.no_grad():  # our logits over the same sequence llama.cpp evaluated
        ours_logits = model(torch.tensor([ids + theirs_new[:-1]])).logits[0].numpy()
    error = float(np.abs(ours_logits - theirs_logits[:len(ids) + NEW_TOKENS - 1]).max())
    return {"ours": ours_new, "theirs": theirs_new, "max_abs": error, "scale": float(np.abs(ours_logits).max()),
            "llm": llm}


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "q8_0"])
def test_llama_cpp_logits_and_greedy_match(dtype, tokenizer, tmp_path):
    model = model_for(tokenizer)
    path = export_gguf(model, tmp_path / f"model-{dtype}.gguf", tokenizer=tokenizer, dtype=dtype)
    result = measure(model, tokenizer, path)
    print(f"\n{dtype}: max |logit difference| {result['max_abs']:.2e} (largest |logit| {result['scale']:.2f}); "
          f"greedy {'equal' if result['ours'] == result['theirs'] else 'DIFFERENT'} over {NEW_TOKENS} tokens")
    assert result["max_abs"] <= TOLERANCE[dtype] * result["scale"], result["max_abs"]
    if dtype in ("f32", "f16"):
        assert result["theirs"] == result["ours"]


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_every_architecture_runs_in_llama_cpp(name, tokenizer, tmp_path):
    model = model_for(tokenizer, **ARCHITECTURES[name])
    path = export_gguf(model, tmp_path / "model.gguf", tokenizer=tokenizer, dtype="f32")
    result = measure(model, tokenizer, path)
    print(f"\n{name} f32: max |logit difference| {result['max_abs']:.2e}")
    assert result["max_abs"] <= TOLERANCE["f32"] * result["scale"], result["max_abs"]
    assert result["theirs"] == result["ours"]


def test_llama_cpp_tokenizes_english_and_chat_turns_as_we_do(tokenizer, tmp_path):
    path = export_gguf(model_for(tokenizer), tmp_path / "model.gguf", tokenizer=tokenizer, dtype="f16")
    llm = load(path)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                         tokenize=False)
    for text in (PROMPT, "It's 12:30 -- isn't it?\n\n  Done.", chat):
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == tokenizer.encode(text), text
    for text in ("小明有3个苹果，Tom给了他5个。", "你好"):
        theirs = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        assert llm.detokenize(theirs).decode("utf-8") == text  # other ids at most, never other text
