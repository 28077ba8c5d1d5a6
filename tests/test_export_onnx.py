"""`minillm export onnx`: the graph takes any batch size and sequence length, with left padding, and
onnxruntime's logits match PyTorch's."""

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from minillm.cli import main  # noqa: E402
from minillm.export.hf import ExportError  # noqa: E402
from minillm.export.onnx import check_onnx, export_onnx  # noqa: E402
from minillm.model import MiniGPT, MiniGPTConfig  # noqa: E402


def small(tokenizer, **fields) -> MiniGPT:
    torch.manual_seed(0)
    return MiniGPT(MiniGPTConfig(**{**dict(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                           max_position_embeddings=64, initializer_range=0.1), **fields})).eval()


def test_onnxruntime_matches_pytorch_for_two_batch_sizes_and_lengths(tokenizer, tmp_path):
    model = small(tokenizer, qk_norm=True)
    out, check = export_onnx(model, tmp_path / "onnx", tokenizer=tokenizer)
    assert check.max_abs_diff <= 1e-4 and {b for b, _ in check.shapes} == {1, 3} and len(check.shapes) == 4
    session = ort.InferenceSession(str(out / "model.onnx"))
    ids = torch.randint(0, model.config.vocab_size, (5, 33))  # shapes the check did not use
    mask = torch.ones_like(ids)
    logits = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    with torch.no_grad():
        expected = model(ids).logits.numpy()
    assert logits.shape == (5, 33, model.config.vocab_size)
    assert np.abs(logits - expected).max() <= 1e-4
    assert (out / "tokenizer.json").is_file()


def test_the_check_catches_a_graph_that_differs(tokenizer, tmp_path):
    model = small(tokenizer)
    out, _ = export_onnx(model, tmp_path / "onnx", check=False)
    other = small(tokenizer)
    with torch.no_grad():
        other.model.norm.weight.mul_(1.5)
    assert check_onnx(out / "model.onnx", other).max_abs_diff > 1e-2


def test_export_onnx_command(tokenizer, tmp_path, capsys):
    checkpoint = tmp_path / "ckpt"
    small(tokenizer, norm_type="layernorm", position_embedding="learned", mlp_type="gelu").save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    assert main(["export", "onnx", str(checkpoint), "--out", str(tmp_path / "onnx")]) == 0
    assert "onnxruntime matches PyTorch within" in capsys.readouterr().out
    assert main(["export", "onnx", str(checkpoint), "--out", str(tmp_path / "onnx_kv"), "--kv-cache"]) == 0
    assert "calls through the returned KV cache" in capsys.readouterr().out
    moe = tmp_path / "moe"
    small(tokenizer, num_experts=4).save_pretrained(moe)
    assert main(["export", "onnx", str(moe), "--out", str(tmp_path / "x")]) != 0
    assert "num_experts=4" in capsys.readouterr().err
    with pytest.raises(ExportError):
        export_onnx(small(tokenizer, num_experts=4), tmp_path / "y")


def onnx_greedy(session, model, rows: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy decoding in onnxruntime through the graph's own KV cache: one call over the left-padded
    prompts with an empty past, then one call per token."""
    config = model.config
    width = max(map(len, rows))
    ids = np.array([[0] * (width - len(r)) + r for r in rows], dtype=np.int64)
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=np.int64)
    past_names = [f"past_key_values.{i}.{kind}" for i in range(config.num_hidden_layers) for kind in ("key", "value")]
    past = [np.zeros((len(rows), config.num_key_value_heads, 0, config.attention_head_dim), np.float32)] * len(past_names)
    out: list[list[int]] = [[] for _ in rows]
    for _ in range(new_tokens):
        logits, *past = session.run(None, {"input_ids": ids, "attention_mask": mask, **dict(zip(past_names, past))})
        ids = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate((mask, np.ones_like(ids)), axis=1)
        for row, token in zip(out, ids[:, 0].tolist()):
            row.append(token)
    assert past[0].shape[2] == width + new_tokens - 1  # the cache grew by one position per call
    return out


@pytest.mark.parametrize("fields", [dict(qk_norm=True, qkv_bias=True),
                                    dict(norm_type="layernorm", position_embedding="learned", mlp_type="gelu",
                                         num_key_value_heads=4, tie_word_embeddings=False)],
                         ids=["rope-gqa-qknorm", "gpt2-style"])
def test_kv_cache_graph_decodes_like_our_generator(tokenizer, tmp_path, fields):
    from minillm.inference.generator import GenerationConfig, TextGenerator

    model = small(tokenizer, **fields)
    out, check = export_onnx(model, tmp_path / "onnx", kv_cache=True)
    assert check.max_abs_diff <= 1e-4 and check.decode_steps >= 8
    session = ort.InferenceSession(str(out / "model.onnx"))
    names = [i.name for i in session.get_inputs()]
    assert names == ["input_ids", "attention_mask", "past_key_values.0.key", "past_key_values.0.value",
                     "past_key_values.1.key", "past_key_values.1.value"]
    assert [o.name for o in session.get_outputs()][1:] == ["present.0.key", "present.0.value",
                                                           "present.1.key", "present.1.value"]
    rows = [[5, 17, 42, 8, 99, 3, 61], [250, 7, 33]]  # unequal lengths: the second row is left-padded
    ours = TextGenerator(model, tokenizer).generate(rows, GenerationConfig(max_new_tokens=12, do_sample=False,
                                                                           stop_token_ids=[]))
    assert onnx_greedy(session, model, rows, 12) == ours


def test_kv_cache_graph_matches_a_full_forward_after_a_chunk(tokenizer, tmp_path):
    """Several new tokens after a cache (a chunked prefill, or speculative decoding's check) need the
    causal mask inside the new chunk: compare with PyTorch over the whole sequence, batch 2 and 4."""
    model = small(tokenizer)
    out, _ = export_onnx(model, tmp_path / "onnx", kv_cache=True, check=False)
    session = ort.InferenceSession(str(out / "model.onnx"))
    past_names = [f"past_key_values.{i}.{kind}" for i in range(2) for kind in ("key", "value")]
    for batch, first, second in ((2, 6, 4), (4, 11, 9)):
        ids = torch.randint(0, model.config.vocab_size, (batch, first + second))
        mask = torch.ones_like(ids)
        mask[1, :3] = 0
        empty = np.zeros((batch, 2, 0, 16), np.float32)
        _, *past = session.run(None, {"input_ids": ids[:, :first].numpy(), "attention_mask": mask[:, :first].numpy(),
                                      **dict.fromkeys(past_names, empty)})
        logits, *present = session.run(None, {"input_ids": ids[:, first:].numpy(), "attention_mask": mask.numpy(),
                                              **dict(zip(past_names, past))})
        with torch.no_grad():
            expected = model(ids, attention_mask=mask).logits[:, first:].numpy()
        assert np.abs(logits - expected).max() <= 1e-4
        assert present[0].shape == (batch, 2, first + second, 16)


def test_the_check_catches_a_cache_graph_that_differs(tokenizer, tmp_path):
    model = small(tokenizer)
    out, _ = export_onnx(model, tmp_path / "onnx", kv_cache=True, check=False)
    other = small(tokenizer)
    with torch.no_grad():
        other.model.layers[1].self_attn.v_proj.weight.mul_(1.5)
    assert check_onnx(out / "model.onnx", other).max_abs_diff > 1e-3
