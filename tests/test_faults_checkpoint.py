"""Corrupt and missing checkpoint files: every command that reads a checkpoint (generate, chat, eval, export
hf|onnx, serve) exits with status 2 and one line on stderr naming the culprit file (and the field or tensor),
and `MiniGPT.from_pretrained` / `BPETokenizer.from_pretrained` raise a `CheckpointError` with the same
message. Also: the export commands refuse to write into a non-empty or non-directory `--out` unless asked."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from minillm.cli import main
from minillm.data.builtin import builtin_corpus
from minillm.errors import CheckpointError
from minillm.model import MiniGPT, MiniGPTConfig
from minillm.tokenizer import BPETokenizer
from minillm.training.checkpoint import save_checkpoint

HIDDEN = 32


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A whole tiny checkpoint (model, tokenizer, configs), saved once; each row corrupts a copy."""
    tokenizer = BPETokenizer(vocab_size=300)
    tokenizer.train(builtin_corpus(200, seed=3))
    torch.manual_seed(0)
    config = MiniGPTConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=1, intermediate_size=64, max_position_embeddings=64,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)
    return save_checkpoint(tmp_path_factory.mktemp("pristine") / "ckpt", MiniGPT(config), tokenizer)


@pytest.fixture
def ckpt(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "ckpt"))


# ------------------------------------------------------------------------------------------------ faults
def _edit_config(**changes) -> Callable[[Path], None]:
    def apply(ck: Path) -> None:
        data = json.loads((ck / "config.json").read_text())
        data.update(changes)
        (ck / "config.json").write_text(json.dumps(data, indent=2))
    return apply


def _edit_weights(edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def apply(ck: Path) -> None:
        state = load_file(str(ck / "model.safetensors"))
        edit(state)
        save_file(state, str(ck / "model.safetensors"))
    return apply


def _write(name: str, content: bytes | str) -> Callable[[Path], None]:
    def apply(ck: Path) -> None:
        (ck / name).write_bytes(content.encode() if isinstance(content, str) else content)
    return apply


def _delete(name: str) -> Callable[[Path], None]:
    return lambda ck: (ck / name).unlink()


def _cut_in_half(name: str) -> Callable[[Path], None]:
    def apply(ck: Path) -> None:
        data = (ck / name).read_bytes()
        (ck / name).write_bytes(data[:len(data) // 2])
    return apply


def _shard(ck: Path) -> list[Path]:
    """Replace model.safetensors by two shards and a model.safetensors.index.json."""
    state = load_file(str(ck / "model.safetensors"))
    names = sorted(state)
    shards = [ck / "model-00001-of-00002.safetensors", ck / "model-00002-of-00002.safetensors"]
    weight_map = {}
    for path, part in zip(shards, (names[:len(names) // 2], names[len(names) // 2:])):
        save_file({n: state[n] for n in part}, str(path))
        weight_map.update(dict.fromkeys(part, path.name))
    (ck / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (ck / "model.safetensors").unlink()
    return shards


def _missing_shard(ck: Path) -> None:
    _shard(ck)[1].unlink()


def _remove_directory(ck: Path) -> None:
    shutil.rmtree(ck)


def _replace_by_file(ck: Path) -> None:
    shutil.rmtree(ck)
    ck.write_text("not a directory\n")


def _config_is_directory(ck: Path) -> None:
    (ck / "config.json").unlink()
    (ck / "config.json").mkdir()


def _drop(name_part: str) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(state: dict[str, torch.Tensor]) -> None:
        for name in [n for n in state if name_part in n]:
            del state[name]
    return edit


def _resize_up_proj(state: dict[str, torch.Tensor]) -> None:
    name = next(n for n in state if "up_proj" in n)
    state[name] = torch.zeros(48, HIDDEN)


def _adapter_without_base(ck: Path) -> None:
    (ck / "model.safetensors").unlink()
    (ck / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(ck / "no_base")}))


def _llama_config(**changes) -> Callable[[Path], None]:
    """A Hugging Face Llama config.json in place of ours, with `changes` (None: the field is left out)."""
    def apply(ck: Path) -> None:
        data = dict(model_type="llama", vocab_size=300, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, rope_theta=10000.0)
        data.update(changes)
        (ck / "config.json").write_text(json.dumps({k: v for k, v in data.items() if v is not None}))
    return apply


# name -> (fault, culprit file relative to the checkpoint ("" = the checkpoint itself), what the message says)
FAULTS: dict[str, tuple[Callable[[Path], None], str, tuple[str, ...]]] = {
    "dir_missing": (_remove_directory, "", ("no such directory",)),
    "dir_is_file": (_replace_by_file, "", ("it is a file",)),
    "config_missing": (_delete("config.json"), "config.json", ("missing",)),
    "config_is_directory": (_config_is_directory, "config.json", ("is a directory",)),
    "config_empty": (_write("config.json", ""), "config.json", ("empty file",)),
    "config_not_json": (_write("config.json", '{\n  "vocab_size": 300,\n  "hidden_size": ,\n}'), "config.json",
                        ("not valid JSON", "line 3 column 18")),
    "config_not_utf8": (_write("config.json", b'{"vocab_size": "\xff\xfe"}'), "config.json", ("not UTF-8",)),
    "config_array": (_write("config.json", "[1, 2, 3]"), "config.json", ("expected a JSON object, got an array",)),
    "config_hidden_size_text": (_edit_config(hidden_size="abc"), "config.json", ("hidden_size", "'abc'")),
    "config_zero_heads": (_edit_config(num_attention_heads=0), "config.json", ("num_attention_heads", "0")),
    "config_rope_theta_text": (_edit_config(rope_theta="1e4"), "config.json", ("rope_theta", "'1e4'")),
    "config_bad_norm_type": (_edit_config(norm_type="batchnorm"), "config.json", ("norm_type='batchnorm'",)),
    "config_unknown_model_type": (_edit_config(model_type="mamba"), "config.json", ("model_type='mamba'",)),
    "config_unknown_field": (_edit_config(hiden_size=64), "config.json", ("hiden_size",)),
    "hf_config_text_size": (_llama_config(intermediate_size="64"), "config.json", ("intermediate_size", "'64'")),
    "hf_config_text_rope_theta": (_llama_config(rope_theta="1e4"), "config.json", ("rope_theta", "'1e4'")),
    "hf_config_missing_field": (_llama_config(hidden_size=None), "config.json", ("'hidden_size'", "missing")),
    "config_vocab_mismatch": (_edit_config(vocab_size=400), "model.safetensors",
                              ("model.embed_tokens.weight", f"(400, {HIDDEN})")),  # both shapes: see below
    "config_more_layers": (_edit_config(num_hidden_layers=2), "model.safetensors",
                           ("missing", "model.layers.1.")),
    "weights_missing": (_delete("model.safetensors"), "model.safetensors", ("missing",)),
    "weights_truncated": (_cut_in_half("model.safetensors"), "model.safetensors", ("truncated",)),
    "weights_garbage": (_write("model.safetensors", b"\x89garbage, not weights" * 40), "model.safetensors",
                        ("not a safetensors file",)),
    "weights_header_cut": (lambda ck: _write("model.safetensors", (ck / "model.safetensors").read_bytes()[:100])(ck),
                           "model.safetensors", ("truncated", "the file has 100 bytes")),
    "torch_weights_garbage": (lambda ck: (_delete("model.safetensors")(ck), _write("pytorch_model.bin", "junk")(ck)),
                              "pytorch_model.bin", ("not a readable PyTorch weights file",)),
    "weights_zero_bytes": (_write("model.safetensors", b""), "model.safetensors", ("empty file", "0 bytes")),
    "weights_wrong_shape": (_edit_weights(_resize_up_proj), "model.safetensors",
                            ("model.layers.0.mlp.up_proj.weight", f"(48, {HIDDEN})", f"(64, {HIDDEN})")),
    "weights_missing_tensors": (_edit_weights(_drop("norm")), "model.safetensors",
                                ("missing 3 tensor(s)", "model.layers.0.input_layernorm.weight")),
    "weights_unexpected_tensors": (_edit_weights(lambda s: s.update({"model.layers.9.extra.weight": torch.zeros(2)})),
                                   "model.safetensors", ("unexpected 1 tensor(s)", "model.layers.9.extra.weight")),
    "shard_missing": (_missing_shard, "model-00002-of-00002.safetensors",
                      ("missing", "model.safetensors.index.json")),
    "shard_index_garbage": (lambda ck: (_shard(ck), _write("model.safetensors.index.json", "{weight_map")(ck)),
                            "model.safetensors.index.json", ("not valid JSON",)),
    "shard_index_no_map": (lambda ck: (_shard(ck), _write("model.safetensors.index.json", "{}")(ck)),
                           "model.safetensors.index.json", ("weight_map",)),
    "tokenizer_missing": (_delete("tokenizer.json"), "tokenizer.json", ("missing",)),
    "tokenizer_garbage": (_write("tokenizer.json", "this is not a tokenizer"), "tokenizer.json",
                          ("not a valid tokenizer.json",)),
    "tokenizer_truncated": (_cut_in_half("tokenizer.json"), "tokenizer.json", ("not a valid tokenizer.json",)),
    "tokenizer_config_broken": (_write("tokenizer_config.json", '{"eos_token": "<|endoftext|>",'),
                                "tokenizer_config.json", ("not valid JSON",)),
    "tokenizer_config_bad_eos": (_write("tokenizer_config.json", '{"eos_token": 5}'), "tokenizer_config.json",
                                 ("eos_token",)),
    "adapter_without_base": (_adapter_without_base, "adapter_config.json", ("base_model_name_or_path",)),
}


# ------------------------------------------------------------------------------------------------ commands
def _commands(ck: Path, tmp: Path) -> dict[str, list[str]]:
    text = tmp / "eval.txt"
    if not text.exists():
        text.write_text("小明有3个苹果。Tom has 5 apples.\n" * 4, encoding="utf-8")
    return {"generate": ["generate", str(ck), "--prompt", "hi", "--max-new-tokens", "2"],
            "chat": ["chat", str(ck)],
            "eval": ["eval", str(ck), "--perplexity", str(text), "--max-length", "16"],
            "export hf": ["export", "hf", str(ck), "--out", str(tmp / "out_hf")],
            "export onnx": ["export", "onnx", str(ck), "--out", str(tmp / "out_onnx")],
            "serve": ["serve", str(ck), "--port", "8765"]}


ALL = ("generate", "chat", "eval", "export hf", "export onnx", "serve")
# Which commands meet each fault (export reads the tokenizer only when tokenizer.json is there).
ROWS = [
    *[(fault, command) for fault in ("dir_missing", "dir_is_file", "config_missing") for command in ALL],
    *[(fault, command) for fault in ("config_empty", "config_not_json", "config_hidden_size_text")
      for command in ("generate", "eval", "export hf")],
    *[(fault, "generate") for fault in ("config_is_directory", "config_not_utf8", "config_array",
                                        "config_zero_heads", "config_rope_theta_text", "config_bad_norm_type",
                                        "config_unknown_field", "config_more_layers", "adapter_without_base",
                                        "hf_config_text_size", "hf_config_text_rope_theta", "hf_config_missing_field")],
    ("config_unknown_model_type", "generate"), ("config_unknown_model_type", "export hf"),
    *[(fault, command) for fault in ("weights_missing", "weights_truncated", "weights_garbage", "weights_zero_bytes",
                                     "weights_wrong_shape", "config_vocab_mismatch", "weights_missing_tensors",
                                     "weights_unexpected_tensors")
      for command in ("generate", "eval", "export hf")],
    *[(fault, command) for fault in ("weights_truncated", "weights_wrong_shape") for command in ("export onnx", "serve")],
    *[(fault, command) for fault in ("weights_header_cut", "torch_weights_garbage") for command in ("generate", "chat")],
    *[(fault, command) for fault in ("shard_missing", "shard_index_garbage", "shard_index_no_map")
      for command in ("generate", "export hf")],
    *[(fault, command) for fault in ("tokenizer_missing", "tokenizer_garbage", "tokenizer_truncated",
                                     "tokenizer_config_broken", "tokenizer_config_bad_eos")
      for command in ("generate", "eval", "serve")],
    *[(fault, command) for fault in ("tokenizer_garbage", "tokenizer_config_broken") for command in ("export hf", "chat")],
]


@pytest.fixture
def no_server(monkeypatch):
    """`minillm serve` must fail while loading: starting a server is a test failure."""
    import minillm.serving

    def refuse(*args, **kwargs):
        raise AssertionError("the server started although the checkpoint is corrupt")

    monkeypatch.setattr(minillm.serving, "run_server", refuse)


def _one_error_line(capsys, command: str) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"minillm {command}: error: "), lines[0]
    assert "Traceback" not in captured.err and "internal error" not in captured.err
    return lines[0]


@pytest.mark.parametrize(("fault", "command"), ROWS, ids=[f"{f}-{c.replace(' ', '_')}" for f, c in ROWS])
def test_a_corrupt_checkpoint_is_one_line_naming_the_file(fault, command, pristine, ckpt, tmp_path, capsys,
                                                           no_server):
    apply, culprit, needles = FAULTS[fault]
    apply(ckpt)
    argv = _commands(ckpt, tmp_path)[command]
    assert main(argv) == 2
    line = _one_error_line(capsys, command)
    assert str(ckpt / culprit if culprit else ckpt) in line
    for needle in needles:
        assert needle in line
    if fault == "config_vocab_mismatch":  # both shapes: the file's and the one config.json implies
        vocab = json.loads((pristine / "config.json").read_text())["vocab_size"]
        assert f"({vocab}, {HIDDEN})" in line
    if command.startswith("export"):
        assert not (tmp_path / f"out_{command.split()[1]}").exists()


def test_rows_cover_every_fault_and_command():
    assert len(ROWS) >= 30
    assert {f for f, _ in ROWS} == set(FAULTS)
    assert {c for _, c in ROWS} == set(ALL)


# ------------------------------------------------------------------------------------------------ library
LIBRARY_FAULTS = ("dir_missing", "dir_is_file", "config_missing", "config_not_json", "config_hidden_size_text",
                  "config_unknown_model_type", "weights_truncated", "weights_zero_bytes", "weights_wrong_shape",
                  "weights_missing_tensors", "shard_missing")


@pytest.mark.parametrize("fault", LIBRARY_FAULTS)
def test_from_pretrained_raises_the_same_checkpoint_error(fault, ckpt, tmp_path, capsys):
    FAULTS[fault][0](ckpt)
    with pytest.raises(CheckpointError) as raised:
        MiniGPT.from_pretrained(ckpt)
    assert "\n" not in str(raised.value)
    assert main(_commands(ckpt, tmp_path)["generate"]) == 2
    assert _one_error_line(capsys, "generate") == f"minillm generate: error: {raised.value}"


@pytest.mark.parametrize("fault", ("tokenizer_missing", "tokenizer_garbage", "tokenizer_config_broken",
                                   "tokenizer_config_bad_eos"))
def test_tokenizer_from_pretrained_raises_the_same_checkpoint_error(fault, ckpt, tmp_path, capsys):
    FAULTS[fault][0](ckpt)
    with pytest.raises(CheckpointError) as raised:
        BPETokenizer.from_pretrained(ckpt)
    assert main(_commands(ckpt, tmp_path)["eval"]) == 2
    assert _one_error_line(capsys, "eval") == f"minillm eval: error: {raised.value}"


def test_missing_files_are_still_file_not_found_errors(ckpt, tmp_path):
    with pytest.raises(FileNotFoundError):
        MiniGPT.from_pretrained(tmp_path / "nowhere")
    (ckpt / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError):
        BPETokenizer.from_pretrained(ckpt)


def test_a_sharded_checkpoint_loads(ckpt, pristine, capsys):
    _shard(ckpt)
    loaded, original = MiniGPT.from_pretrained(ckpt), MiniGPT.from_pretrained(pristine)
    for name, tensor in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)
    assert main(["generate", str(ckpt), "--prompt", "hi", "--max-new-tokens", "2"]) == 0


# ------------------------------------------------------------------------------------------------ --out
@pytest.mark.parametrize("fmt", ("hf", "onnx"))
def test_export_refuses_a_non_empty_out_without_overwrite(fmt, ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["export", fmt, str(ckpt), "--out", str(out)]) == 2
    line = _one_error_line(capsys, f"export {fmt}")
    assert str(out) in line and "--overwrite" in line
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("fmt", ("hf", "onnx"))
def test_export_refuses_an_out_that_is_a_file(fmt, ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("mine")
    assert main(["export", fmt, str(ckpt), "--out", str(out)]) == 2
    line = _one_error_line(capsys, f"export {fmt}")
    assert str(out) in line and "not a directory" in line
    assert out.read_text() == "mine"


def test_export_hf_replaces_a_non_empty_out_when_asked(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["export", "hf", str(ckpt), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "notes.txt").exists()
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no staging leftovers


def test_export_onnx_replaces_a_non_empty_out_when_asked(ckpt, tmp_path, capsys):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["export", "onnx", str(ckpt), "--out", str(out), "--overwrite", "--no-check"]) == 0
    assert not (out / "notes.txt").exists()
    assert (out / "model.onnx").is_file()
