"""Reading weights from disk: safetensors files (ours and Hugging Face's), sharded checkpoints with an
index, and PyTorch `pytorch_model.bin` files (loaded with `weights_only=True`, so no pickled code runs).
Every way a file can be missing, empty, truncated or malformed is a `CheckpointError` naming it.
`read_checkpoint_weights` gives any model directory's tensors under our names."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from minillm.checkpoint_files import (
    CONFIG_FILE,
    MissingCheckpointFileError,
    json_kind,
    load_torch_file,
    read_json_object,
    require_file,
)
from minillm.errors import CheckpointError
from minillm.model.hf import OWN_MODEL_TYPE, from_gpt2_state, from_mixtral_state

__all__ = ["hf_weights_file", "read_checkpoint_weights", "read_hf_weights", "read_safetensors"]


def read_safetensors(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; `CheckpointError` naming the file when it is missing, empty,
    truncated or not a safetensors file at all."""
    path = require_file(path)
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: {_safetensors_problem(path, e)}") from e


_MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors library refuses larger headers


def _safetensors_problem(path: Path, error: BaseException) -> str:
    """What is wrong with a safetensors file the library refused: a safetensors file is an 8-byte
    little-endian header length, a JSON header giving each tensor's byte range, then the data."""
    detail = " ".join(str(error).split())
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            header_length = int.from_bytes(f.read(8), "little")
            if size == 0:
                return "empty file (0 bytes), expected safetensors weights"
            if size < 8:
                return f"not a safetensors file: {size} bytes, shorter than the 8-byte header length"
            if header_length > _MAX_SAFETENSORS_HEADER:
                return (f"not a safetensors file: its first 8 bytes give a header of {header_length} bytes "
                        f"(the file has {size} bytes)")
            if 8 + header_length > size:
                return f"truncated: its header needs {8 + header_length} bytes but the file has {size} bytes"
            header = json.loads(f.read(header_length))
        ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return f"not a valid safetensors file ({detail})"
    needed = 8 + header_length + max(ends, default=0)
    if needed > size:
        return f"truncated: its header describes {needed} bytes but the file has {size} bytes"
    return f"not a valid safetensors file ({detail})"


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def hf_weights_file(directory: str | Path) -> Path:
    """The file `read_hf_weights` reads the weights of `directory` from (or the index of its shards);
    `CheckpointError` when there is none."""
    directory = Path(directory)
    for name in _WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    raise MissingCheckpointFileError(f"{directory / _WEIGHT_FILES[0]}: missing (nor is there a sharded "
                                     f"{_WEIGHT_FILES[1]} or a PyTorch {_WEIGHT_FILES[2]} in {directory})")


def _index_shards(index_path: Path) -> list[Path]:
    """The shard files a `*.index.json` names, each of which must exist."""
    weight_map = read_json_object(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: \"weight_map\" must be a non-empty object (tensor name -> shard file), "
                              f"got {json_kind(weight_map)}")
    bad = [name for name, shard in weight_map.items() if not isinstance(shard, str) or not shard]
    if bad:
        raise CheckpointError(f"{index_path}: weight_map[{bad[0]!r}] must be a shard file name, "
                              f"got {weight_map[bad[0]]!r}")
    shards = [index_path.parent / shard for shard in sorted(set(weight_map.values()))]
    for shard in shards:
        require_file(shard, f" (a shard listed in {index_path.name})")
    return shards


def _read_torch_weights(path: Path, device: str) -> dict[str, torch.Tensor]:
    """A PyTorch weights file, loaded with `weights_only=True` (no pickled code runs)."""
    state = load_torch_file(path, "PyTorch weights file", map_location=device)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    return state


def read_hf_weights(directory: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face model directory: `model.safetensors`, sharded safetensors (with
    `model.safetensors.index.json`), or PyTorch `pytorch_model.bin` (sharded or not), the latter loaded
    with `weights_only=True` so no pickled code runs. Rotary `inv_freq` buffers are dropped."""
    directory = Path(directory)
    path = hf_weights_file(directory)
    state: dict[str, torch.Tensor] = {}
    if path.name == "model.safetensors":
        state = read_safetensors(path, device=device)
    elif path.name == "model.safetensors.index.json":
        for shard in _index_shards(path):
            state.update(read_safetensors(shard, device=device))
    elif path.name == "pytorch_model.bin":
        state = _read_torch_weights(path, device)
    else:
        for shard in _index_shards(path):
            state.update(_read_torch_weights(shard, device))
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if any(k.endswith("wte.weight") for k in state):  # GPT-2's layout
        state = from_gpt2_state(state)
    elif any(".block_sparse_moe." in k for k in state):  # Mixtral's
        state = from_mixtral_state(state)
    return state


def read_checkpoint_weights(directory: str | Path, device: str = "cpu") -> tuple[dict[str, torch.Tensor], Path]:
    """The tensors of a model directory under our names (a tied LM head may be absent), and the file they
    came from: a `model_type: minillm` checkpoint's `model.safetensors` as it is, any other directory (a
    native-family checkpoint of ours, or a Hugging Face model) through `read_hf_weights`."""
    directory = Path(directory)
    weights_path = directory / "model.safetensors"
    config_path = directory / CONFIG_FILE
    own = not config_path.is_file() or read_json_object(config_path).get("model_type") == OWN_MODEL_TYPE
    if weights_path.is_file() and own:
        return read_safetensors(weights_path, device=device), weights_path
    return read_hf_weights(directory, device=device), hf_weights_file(directory)
