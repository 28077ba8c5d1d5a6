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
    moe = tmp_path / "moe"
    small(tokenizer, num_experts=4).save_pretrained(moe)
    assert main(["export", "onnx", str(moe), "--out", str(tmp_path / "x")]) != 0
    assert "num_experts=4" in capsys.readouterr().err
    with pytest.raises(ExportError):
        export_onnx(small(tokenizer, num_experts=4), tmp_path / "y")
