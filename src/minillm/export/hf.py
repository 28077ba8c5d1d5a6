"""Mini-LLM checkpoints as native Hugging Face model directories, for publishing.

A checkpoint `MiniGPT.save_pretrained` writes already loads in transformers as it is; the export adds what
a release wants. The family (Llama, Qwen2, Qwen3, Qwen3-MoE, Mixtral or GPT-2) follows from the config;
the mapping lives in `minillm.model.hf`, and config.json and the tensor names are those of a checkpoint.
The export needs no transformers: the weights are written in the chosen dtype, as safetensors, sharded
with a `model.safetensors.index.json` when they exceed `max_shard_size`. LoRA adapters are merged first; the tokenizer (with its chat template) and a
`generation_config.json` whose stop tokens include the chat template's end-of-turn token are written
beside them. A non-empty output directory is refused unless `overwrite`.

    from minillm.export.hf import export_hf
    export_hf("runs/sft_tiny/final", "out/hf")      # AutoModelForCausalLM.from_pretrained("out/hf")

The other way, `MiniGPT.from_pretrained` reads directories of all six families.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from minillm.errors import ExportError, UnsupportedCheckpointError
from minillm.io import atomic_write_json, check_output_dir, staged_directory
from minillm.model.hf import DTYPES, FAMILIES, IMPORTABLE, checkpoint_config, config_from_hf, to_family_state
from minillm.model.transformer import MiniGPT
from minillm.model.weights import read_hf_weights

__all__ = ["DTYPES", "FAMILIES", "IMPORTABLE", "ExportError", "UnsupportedCheckpointError", "config_from_hf",
           "export_hf", "load_for_export", "read_hf_weights"]


def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    for suffix, factor in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if text.endswith(suffix):
            return int(float(text[:-len(suffix)]) * factor)
    return int(text)


def load_for_export(checkpoint: str | Path | MiniGPT, tokenizer: Any = None) -> tuple[MiniGPT, Any]:
    """The model to export (LoRA merged, on a copy) and its tokenizer (the checkpoint's when not given)."""
    if isinstance(checkpoint, MiniGPT):
        model = checkpoint
    else:
        model = MiniGPT.from_pretrained(checkpoint)
        if tokenizer is None and (Path(checkpoint) / "tokenizer.json").is_file():
            from minillm.tokenizer import BPETokenizer

            tokenizer = BPETokenizer.from_pretrained(checkpoint)
    if getattr(model, "lora_config", None) is not None:
        from minillm.model.lora import merge_lora

        model = merge_lora(copy.deepcopy(model))
    return model, tokenizer


def export_hf(checkpoint: str | Path | MiniGPT, out_dir: str | Path, tokenizer: Any = None,
              dtype: str = "auto", family: str | None = None, max_shard_size: int | str = "2GB",
              overwrite: bool = False) -> Path:
    """Write `checkpoint` (a model directory, or a `MiniGPT`) to `out_dir` as a native Hugging Face model
    directory; `dtype` is `auto` (the checkpoint's), `float32`, `bfloat16` or `float16`. The directory is
    assembled under a temporary name and renamed into place; a non-empty `out_dir` is refused
    (`OutputExistsError`) unless `overwrite`."""
    out_dir = check_output_dir(out_dir, overwrite)
    model, tokenizer = load_for_export(checkpoint, tokenizer)
    if dtype == "auto":
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise ExportError(f"dtype={dtype!r} is not supported; choose auto, {', '.join(DTYPES)}")
    config = checkpoint_config(model.config, family, dtype)
    state = {k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in model.state_dict().items()}
    state = to_family_state(state, model.config, config["model_type"])
    with staged_directory(out_dir, overwrite) as tmp:
        shards = _shards(state, _parse_size(max_shard_size))
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, name))
            total = sum(t.numel() * t.element_size() for t in state.values())
            atomic_write_json(tmp / "model.safetensors.index.json",
                              {"metadata": {"total_size": total}, "weight_map": weight_map})
        atomic_write_json(tmp / "config.json", config)
        generation = {"bos_token_id": config["bos_token_id"], "pad_token_id": config["pad_token_id"],
                      "eos_token_id": config["eos_token_id"]}
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
            stops = [t for t in (getattr(tokenizer, "im_end_id", None), tokenizer.eos_token_id) if t is not None]
            generation.update(eos_token_id=stops if len(stops) > 1 else (stops or [None])[0],
                              pad_token_id=tokenizer.pad_token_id)
        atomic_write_json(tmp / "generation_config.json", generation)
    return out_dir
