"""`minillm export gguf`: the file read back with the `gguf` package holds llama.cpp's metadata, tensor names
and shapes, our weights in each dtype (q and k rows permuted for Llama's RoPE), and the tokenizer with its
chat template; unsupported configs and existing files are refused."""

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from minillm.cli import main  # noqa: E402
from minillm.errors import ExportError, OutputExistsError  # noqa: E402
from minillm.export.gguf import export_gguf  # noqa: E402
from minillm.model import MiniGPT, MiniGPTConfig  # noqa: E402

TOLERANCE = {"f32": 0.0, "f16": 1e-3, "bf16": 8e-3}  # relative to the tensor's largest value


def model_for(tokenizer, **fields) -> MiniGPT:
    torch.manual_seed(0)
    config = MiniGPTConfig(**{**dict(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                     max_position_embeddings=128, initializer_range=0.1,
                                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=tokenizer.pad_token_id), **fields})
    return MiniGPT(config).eval()


def fields_of(reader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()}


def tensors_of(reader) -> dict[str, tuple[str, np.ndarray]]:
    """name -> (GGML type, the dequantised array in numpy's (rows, columns) order)."""
    out = {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape))
        data = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        out[t.name] = (t.tensor_type.name, data)
    return out


def unpermute(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's adjacent-pair row order back to ours (first half of a head with the second)."""
    d = rows.shape[0] // heads
    return rows.reshape(heads, d // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def expected(model: MiniGPT, arch: str) -> dict[str, np.ndarray]:
    config, state = model.config, {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": state["model.embed_tokens.weight"], "output_norm.weight": state["model.norm.weight"]}
    if not config.tie_word_embeddings:
        out["output.weight"] = state["lm_head.weight"]
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(config.num_hidden_layers):
        for ours, theirs in names.items():
            for kind in ("weight", "bias"):
                key = f"model.layers.{i}.{ours}.{kind}"
                if key in state:
                    out[f"blk.{i}.{theirs}.{kind}"] = state[key]
    return out


def compare(model, path, arch, dtype):
    reader = gguf.GGUFReader(path)
    tensors = tensors_of(reader)
    want = expected(model, arch)
    assert set(tensors) == set(want)
    config = model.config
    for name, (qtype, data) in tensors.items():
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            data = unpermute(data, config.num_attention_heads if ".attn_q." in name else config.num_key_value_heads)
        ref = want[name]
        assert data.shape == ref.shape, name
        if ref.ndim == 1:
            assert qtype == "F32" and np.array_equal(data, ref), name
            continue
        assert qtype == dtype.upper(), name
        scale = np.abs(ref).max()
        error = np.abs(data - ref).max()
        if dtype == "q8_0":
            assert error <= 0.01 * scale, (name, error, scale)  # one step of 127 per block of 32, at most
        else:
            assert error <= TOLERANCE[dtype] * scale, (name, error, scale)
    return reader


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "q8_0"])
def test_llama_weights_and_metadata_read_back(dtype, tokenizer, tmp_path):
    model = model_for(tokenizer)
    path = export_gguf(model, tmp_path / "model.gguf", tokenizer=tokenizer, dtype=dtype)
    reader = compare(model, path, "llama", dtype)
    fields, config = fields_of(reader), model.config
    assert fields["general.architecture"] == "llama"
    assert fields["general.file_type"] == {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}[dtype]
    assert fields["general.name"]
    for key, value in (("context_length", 128), ("embedding_length", 64), ("block_count", 2),
                       ("feed_forward_length", 128), ("attention.head_count", 4), ("attention.head_count_kv", 2),
                       ("attention.key_length", 16), ("rope.dimension_count", 16), ("vocab_size", len(tokenizer))):
        assert fields[f"llama.{key}"] == value, key
    assert fields["llama.rope.freq_base"] == pytest.approx(config.rope_theta)
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config.norm_eps)
    assert "output.weight" not in dict(tensors_of(reader))  # tied: llama.cpp reuses token_embd


def test_the_tokenizer_and_chat_template_come_along(tokenizer, tmp_path):
    path = export_gguf(model_for(tokenizer), tmp_path / "model.gguf", tokenizer=tokenizer, dtype="f32")
    fields = fields_of(gguf.GGUFReader(path))
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "qwen2"
    vocab = tokenizer.get_vocab()
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == len(vocab) and all(tokens[i] == t for t, i in vocab.items())
    types = fields["tokenizer.ggml.token_type"]
    control = {i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL}
    assert control == {tokenizer.token_to_id(t) for t in tokenizer.special_tokens}
    assert all(t == gguf.TokenType.NORMAL for i, t in enumerate(types) if i not in control)
    merges = fields["tokenizer.ggml.merges"]
    assert merges and all(len(m.split(" ")) == 2 for m in merges)
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert fields["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert fields["tokenizer.ggml.padding_token_id"] == tokenizer.pad_token_id
    assert fields["tokenizer.ggml.eot_token_id"] == tokenizer.im_end_id
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template


@pytest.mark.parametrize(("arch", "fields"), [
    ("llama", dict(qkv_bias=True, out_bias=True, mlp_bias=True, tie_word_embeddings=False)),
    ("qwen2", dict(qkv_bias=True, out_bias=False)),
    ("qwen3", dict(qk_norm=True, head_dim=24)),
])
def test_other_architectures_and_biases(arch, fields, tokenizer, tmp_path):
    model = model_for(tokenizer, **fields)
    path = export_gguf(model, tmp_path / "model.gguf", tokenizer=tokenizer, dtype="f32")
    reader = compare(model, path, arch, "f32")
    assert fields_of(reader)["general.architecture"] == arch
    assert fields_of(reader)[f"{arch}.attention.key_length"] == model.config.attention_head_dim


def test_q8_0_keeps_rows_of_another_length_in_f16(tokenizer, tmp_path):
    model = model_for(tokenizer, intermediate_size=80)  # ffn_down rows are 80 long: no whole blocks of 32
    path = export_gguf(model, tmp_path / "model.gguf", tokenizer=tokenizer, dtype="q8_0")
    types = {name: qtype for name, (qtype, _) in tensors_of(gguf.GGUFReader(path)).items()}
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.ffn_up.weight"] == "Q8_0"


@pytest.mark.parametrize(("fields", "field"), [
    (dict(norm_type="layernorm", position_embedding="learned", mlp_type="gelu", qkv_bias=True, out_bias=True,
          mlp_bias=True, num_key_value_heads=4), "GPT-2"),
    (dict(num_experts=4, moe_intermediate_size=48), "num_experts=4"),
    (dict(qk_norm=True, qkv_bias=True, out_bias=True), "qkv_bias=True, out_bias=True"),
    (dict(qkv_bias=True, out_bias=False, head_dim=24), "head_dim=24"),
])
def test_unsupported_configs_are_refused_by_field(fields, field, tokenizer, tmp_path):
    with pytest.raises(ExportError, match=field):
        export_gguf(model_for(tokenizer, **fields), tmp_path / "model.gguf", tokenizer=tokenizer)
    assert not list(tmp_path.iterdir())


def test_export_gguf_command_refuses_an_existing_file_without_overwrite(tokenizer, tmp_path, capsys):
    checkpoint = tmp_path / "ckpt"
    model_for(tokenizer).save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    out = tmp_path / "model.gguf"
    assert main(["export", "gguf", str(checkpoint), "--out", str(out), "--dtype", "q8_0"]) == 0
    assert "q8_0" in capsys.readouterr().out
    assert fields_of(gguf.GGUFReader(out))["general.file_type"] == 7
    with pytest.raises(OutputExistsError, match="--overwrite"):
        export_gguf(checkpoint, out)
    assert main(["export", "gguf", str(checkpoint), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", "gguf", str(checkpoint), "--out", str(out), "--overwrite"]) == 0
    assert fields_of(gguf.GGUFReader(out))["general.file_type"] == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    bad = tmp_path / "bad"
    model_for(tokenizer, num_experts=4).save_pretrained(bad)
    tokenizer.save_pretrained(bad)
    assert main(["export", "gguf", str(bad), "--out", str(tmp_path / "bad.gguf")]) != 0
    assert "num_experts=4" in capsys.readouterr().err
