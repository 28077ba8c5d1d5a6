"""Mini-LLM checkpoints as one GGUF file, for llama.cpp (`llama-cli`, `llama-server`), Ollama and LM Studio.

The file is written with the `gguf` package that llama.cpp publishes (`pip install 'mini-llm[gguf]'`); no
llama.cpp build or converter script is needed. The architecture follows from the config, as for
`export hf` (`minillm.model.hf.hf_family`):

- `llama`: RMSNorm, RoPE, SwiGLU, with or without biases. llama.cpp rotates adjacent pairs of a head's
  dimensions where our RoPE (Hugging Face's `rotate_half`) pairs the first half with the second, so the
  rows of the q and k projections (and their biases) are permuted as llama.cpp's own converter does;
- `qwen2`: biases on q, k and v (llama.cpp's Qwen2 uses the `rotate_half` pairing: no permutation);
- `qwen3`: per-head RMSNorm on q and k, no biases;
- mixtures of experts and GPT-2-style models are refused, naming the field.

`dtype` is `f32`, `f16`, `bf16` (1-D tensors, i.e. norms and biases, stay f32, as in llama.cpp's files) or
`q8_0` (2-D weights in blocks of 32 int8 values with one f16 scale; a weight whose rows are not a multiple
of 32 long is written as f16). The tokenizer (byte-level BPE, with its merges, special tokens as
CONTROL tokens and the chat template) goes into the same file. llama.cpp splits text into words with one
of its built-in pre-tokenizers, named in `tokenizer.ggml.pre`; none equals ours (which keeps runs of CJK
characters apart from Latin letters), so the closest, `qwen2`, is named: English text, digits and
punctuation split the same way, Chinese text directly next to Latin letters or punctuation may split
differently (the ids of a chat turn can then differ from ours, never the model).

    from minillm.export.gguf import export_gguf
    export_gguf("runs/sft_tiny/final", "exported/sft_tiny.gguf", dtype="q8_0")
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minillm.errors import ExportError, OutputExistsError
from minillm.extras import require
from minillm.io import atomic_write
from minillm.model.hf import hf_family
from minillm.model.transformer import MiniGPT

__all__ = ["ARCHITECTURES", "DTYPES", "PRE_TOKENIZER", "check_output_file", "export_gguf", "gguf_architecture",
           "permute_rope_rows"]

DTYPES = ("f32", "f16", "bf16", "q8_0")
ARCHITECTURES = ("llama", "qwen2", "qwen3")
# llama.cpp's pre-tokenizer closest to ours (see the module docstring); known regexes map to their own name.
PRE_TOKENIZER = "qwen2"
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_REGEX = _QWEN2_REGEX.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
_KNOWN_PRE_TOKENIZERS = {_QWEN2_REGEX: "qwen2", _LLAMA3_REGEX: "llama-bpe"}


def gguf_architecture(config: Any) -> str:
    """The GGUF architecture (`general.architecture`) of a model with this `MiniGPTConfig`; `ExportError`
    naming the blocking field when llama.cpp has none that computes the same function."""
    family = hf_family(config)  # refuses configs no family expresses, field by field
    if family not in ARCHITECTURES:
        why = {"gpt2": "norm_type/position_embedding/mlp_type: GPT-2-style models (LayerNorm, learned positions, "
                       "GELU) are not exported to GGUF",
               "mixtral": f"num_experts={config.num_experts}: mixture-of-experts models are not exported to GGUF",
               "qwen3_moe": f"num_experts={config.num_experts}: mixture-of-experts models are not exported to GGUF"}
        raise ExportError(why.get(family, f"model family {family!r} is not exported to GGUF"))
    if family == "qwen2" and config.attention_head_dim * config.num_attention_heads != config.hidden_size:
        raise ExportError(f"head_dim={config.head_dim}: llama.cpp's Qwen2 needs head_dim × num_attention_heads == "
                          f"hidden_size ({config.hidden_size})")
    if family == "qwen3" and (config.qkv_bias or config.out_bias):
        raise ExportError(f"qkv_bias={config.qkv_bias}, out_bias={config.out_bias}: llama.cpp's Qwen3 has no "
                          "attention biases")
    return family


def permute_rope_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The rows of a q or k projection (weight or bias) reordered from the `rotate_half` pairing (dimension
    i with i + D/2 in each head) to llama.cpp's adjacent pairs (2i with 2i + 1)."""
    head_dim = weight.shape[0] // num_heads
    return (weight.reshape(num_heads, 2, head_dim // 2, *weight.shape[1:]).transpose(1, 2)
            .reshape(weight.shape).contiguous())


def _tensors(model: MiniGPT, arch: str) -> list[tuple[str, torch.Tensor]]:
    """Our tensors under llama.cpp's names, in file order, the q/k rows permuted for `llama`."""
    config = model.config
    state = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    names = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
             "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight"}
    for proj, short in (("q", "attn_q"), ("k", "attn_k"), ("v", "attn_v"), ("o", "attn_output")):
        for kind in ("weight", "bias"):
            names[f"self_attn.{proj}_proj.{kind}"] = f"{short}.{kind}"
    for proj in ("gate", "up", "down"):
        for kind in ("weight", "bias"):
            names[f"mlp.{proj}_proj.{kind}"] = f"ffn_{proj}.{kind}"
    out = [("token_embd.weight", state.pop("model.embed_tokens.weight"))]
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        for key in [k for k in state if k.startswith(prefix)]:
            tensor, rest = state.pop(key), key[len(prefix):]
            if rest not in names:
                raise ExportError(f"{key}: this tensor has no GGUF counterpart")
            if arch == "llama" and rest.startswith(("self_attn.q_proj.", "self_attn.k_proj.")):
                heads = config.num_attention_heads if ".q_proj." in rest else config.num_key_value_heads
                tensor = permute_rope_rows(tensor, heads)
            out.append((f"blk.{i}.{names[rest]}", tensor))
    out.append(("output_norm.weight", state.pop("model.norm.weight")))
    lm_head = state.pop("lm_head.weight", None)
    if not config.tie_word_embeddings and lm_head is not None:  # tied: llama.cpp reuses token_embd
        out.append(("output.weight", lm_head))
    if state:
        raise ExportError(f"{next(iter(state))}: this tensor has no GGUF counterpart")
    return out


def _encode(gguf: Any, tensor: torch.Tensor, dtype: str) -> tuple[np.ndarray, Any]:
    """The array to write and its GGML type: 1-D tensors as f32, 2-D ones in `dtype` (q8_0 falls back to
    f16 for rows whose length is not a multiple of its block)."""
    types = gguf.GGMLQuantizationType
    data = tensor.numpy()
    if data.ndim < 2 or dtype == "f32":
        return data.astype(np.float32), types.F32
    if dtype == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[types.Q8_0][0] != 0:
        dtype = "f16"
    qtype = {"f16": types.F16, "bf16": types.BF16, "q8_0": types.Q8_0}[dtype]
    return gguf.quants.quantize(data, qtype), qtype


def _pre_tokenizer(spec: dict[str, Any]) -> str:
    """llama.cpp's name for the pre-tokenizer of this tokenizer.json (see `PRE_TOKENIZER`)."""
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for part in parts:
        if part and part.get("type") == "Split":
            return _KNOWN_PRE_TOKENIZERS.get((part.get("pattern") or {}).get("Regex", ""), PRE_TOKENIZER)
        if part and part.get("type") == "ByteLevel" and part.get("use_regex", True):
            return "gpt-2"
    return PRE_TOKENIZER


def _add_tokenizer(writer: Any, gguf: Any, tokenizer: Any, vocab_size: int) -> None:
    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ExportError(f"tokenizer model={model.get('type')!r}: only byte-level BPE tokenizers are exported to "
                          "GGUF")
    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_size or max(vocab.values()) >= vocab_size:
        raise ExportError(f"vocab_size={vocab_size}: the tokenizer has {len(vocab)} tokens, more than the model's "
                          "embedding rows")
    token_type = gguf.TokenType
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [token_type.UNUSED] * vocab_size
    for token, index in vocab.items():
        tokens[index], types[index] = token, token_type.NORMAL
    for added in spec.get("added_tokens", []):
        index = added["id"]
        if index < vocab_size:
            types[index] = token_type.CONTROL if added.get("special") else token_type.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(spec))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for add, index in ((writer.add_bos_token_id, tokenizer.bos_token_id),
                       (writer.add_eos_token_id, tokenizer.eos_token_id),
                       (writer.add_pad_token_id, tokenizer.pad_token_id),
                       (writer.add_eot_token_id, getattr(tokenizer, "im_end_id", None))):
        if index is not None:
            add(index)
    writer.add_add_bos_token(False)  # our prompts carry no BOS (add_special_tokens=False)
    writer.add_add_eos_token(False)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def _model_name(checkpoint: Any) -> str:
    if isinstance(checkpoint, MiniGPT):
        return str(checkpoint.config.extra.get("preset") or "mini-llm")
    path = Path(checkpoint).resolve()
    return path.parent.name if path.name in ("final", "best") or path.name.startswith("step") else path.name


def check_output_file(path: str | Path, overwrite: bool = False, flag: str = "--overwrite") -> Path:
    """Refuse an existing output file unless `overwrite` (and a directory always)."""
    path = Path(path)
    if path.is_dir():
        raise OutputExistsError(f"{path}: is a directory; name the .gguf file to write")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path}: file exists; pass {flag} to replace it, or choose another")
    return path


def export_gguf(checkpoint: str | Path | MiniGPT, out_path: str | Path, tokenizer: Any = None, dtype: str = "f16",
                overwrite: bool = False) -> Path:
    """Write `checkpoint` (a model directory, or a `MiniGPT` with `tokenizer`) to the GGUF file `out_path`,
    weights in `dtype` (`f32`, `f16`, `bf16` or `q8_0`) and the tokenizer with its chat template beside
    them. An existing `out_path` is refused (`OutputExistsError`) unless `overwrite`; the file is written
    under a temporary name and renamed into place."""
    from minillm.export.hf import load_for_export

    gguf = require("gguf", "gguf", "GGUF export")
    if dtype not in DTYPES:
        raise ExportError(f"dtype={dtype!r} is not supported; choose {', '.join(DTYPES)}")
    out_path = check_output_file(out_path, overwrite)
    model, tokenizer = load_for_export(checkpoint, tokenizer)
    if tokenizer is None:
        raise ExportError("tokenizer=None: a GGUF file carries its tokenizer; the checkpoint has no tokenizer.json "
                          "(pass tokenizer=)")
    config = model.config
    arch = gguf_architecture(config)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    tensors = [(name, *_encode(gguf, tensor, dtype)) for name, tensor in _tensors(model, arch)]

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, arch)
        try:
            writer.add_type("model")
            writer.add_name(_model_name(checkpoint))
            writer.add_context_length(config.max_position_embeddings)
            writer.add_embedding_length(config.hidden_size)
            writer.add_block_count(config.num_hidden_layers)
            writer.add_feed_forward_length(config.intermediate_size)
            writer.add_head_count(config.num_attention_heads)
            writer.add_head_count_kv(config.num_key_value_heads)
            writer.add_key_length(config.attention_head_dim)
            writer.add_value_length(config.attention_head_dim)
            writer.add_rope_dimension_count(config.attention_head_dim)
            writer.add_rope_freq_base(float(config.rope_theta))
            writer.add_layer_norm_rms_eps(float(config.norm_eps))
            writer.add_vocab_size(config.vocab_size)
            writer.add_file_type(int(file_type))
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            _add_tokenizer(writer, gguf, tokenizer, config.vocab_size)
            for name, data, qtype in tensors:
                writer.add_tensor(name, data, raw_dtype=qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        os.chmod(tmp, 0o644)  # not mkstemp's 0600: other users' servers (e.g. Ollama's service) read it

    atomic_write(out_path, write)
    return out_path
