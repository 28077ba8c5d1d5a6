"""Export a Mini-LLM checkpoint to ONNX, checked against onnxruntime.

The graph maps `input_ids` (and `attention_mask`, 1 for real tokens, 0 for left padding) of any batch
size and sequence length up to the model's context to `logits` (batch, sequence, vocabulary). It is
traced with `torch.onnx.export(dynamo=True)` (needs the `onnx` and `onnxscript` packages: `pip install
mini-llm[onnx]`); right after the export, onnxruntime runs it on two batch sizes and two sequence
lengths (one row left-padded) and the largest logit difference from PyTorch is reported — an export
that disagrees by more than `tolerance` is an error, not a file.

With `kv_cache=True` the graph also takes the keys and values of the past positions and returns them
extended by the new ones, so a runtime decodes one token per call instead of re-reading the sequence
(the input and output names of Hugging Face Optimum and transformers.js):

    inputs   input_ids (B, T)   attention_mask (B, P + T)   past_key_values.{layer}.key|value (B, K, P, D)
    outputs  logits (B, T, V)   present.{layer}.key|value (B, K, P + T, D)

K is `num_key_value_heads`, D `head_dim` (both in the exported config.json); the first call passes
pasts with P = 0. The check then also decodes a few steps through the cache, one token and three tokens
at a time, against PyTorch.

    from minillm.export.onnx import export_onnx
    export_onnx("runs/sft_tiny/final", "exported/sft_tiny_onnx")   # model.onnx + tokenizer files
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minillm.export.hf import ExportError, load_for_export
from minillm.io import atomic_write_json, check_output_dir, staged_directory
from minillm.model.layers import KVCache
from minillm.model.transformer import MiniGPT

logger = logging.getLogger("minillm.export")

__all__ = ["ONNX_FILE", "OnnxCheck", "cache_names", "check_onnx", "export_onnx"]

ONNX_FILE = "model.onnx"


class _Logits(nn.Module):
    """What the graph computes: ids (and mask) → logits, nothing else (no cache, no loss)."""

    def __init__(self, model: MiniGPT) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, attention_mask=attention_mask).logits


class _LogitsWithCache(nn.Module):
    """ids, mask and the past keys/values (flat: layer 0 key, layer 0 value, layer 1 key, …) → logits and
    the extended keys/values, in the same order."""

    def __init__(self, model: MiniGPT) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                past_key_values: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        cache = KVCache.from_tensors(past_key_values[0::2], past_key_values[1::2])
        logits = self.model(input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True).logits
        return logits, [t for pair in zip(cache.keys, cache.values) for t in pair]


def cache_names(num_layers: int, prefix: str) -> list[str]:
    """`past_key_values.0.key`, `past_key_values.0.value`, … (or `present.…`) in the graph's order."""
    return [f"{prefix}.{layer}.{kind}" for layer in range(num_layers) for kind in ("key", "value")]


@dataclass
class OnnxCheck:
    shapes: list[tuple[int, int]]  # (batch, sequence) pairs run
    max_abs_diff: float  # over real (unpadded) positions
    decode_steps: int = 0  # KV-cache graphs: calls that fed the returned cache back


def check_onnx(path: str | Path, model: MiniGPT, seed: int = 0) -> OnnxCheck:
    """Run the ONNX file in onnxruntime on two batch sizes × two sequence lengths (the first row of each
    left-padded by two tokens) and compare with `model`'s logits. A graph with a KV cache starts from an
    empty cache and then takes one token, three tokens and one token more through the cache it returned;
    each call's logits are compared with a full PyTorch forward over the whole sequence."""
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with_cache = any(i.name.startswith("past_key_values.") for i in session.get_inputs())
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    longest = min(config.max_position_embeddings - (5 if with_cache else 0), 48)
    shapes = [(b, t) for b in (1, 3) for t in (5, longest)]
    worst, steps = 0.0, 0
    for batch, length in shapes:
        ids = torch.randint(0, config.vocab_size, (batch, length), generator=generator)
        mask = torch.ones_like(ids)
        mask[0, :2] = 0
        feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        if with_cache:
            empty = np.zeros((batch, config.num_key_value_heads, 0, config.attention_head_dim), np.float32)
            feed.update(dict.fromkeys(cache_names(config.num_hidden_layers, "past_key_values"), empty))
        outputs = session.run(None, feed)
        with torch.no_grad():
            ours = model(ids, attention_mask=mask).logits.float().numpy()
        worst = max(worst, float(np.abs(outputs[0] - ours)[mask.numpy().astype(bool)].max()))
        if not with_cache:
            continue
        for new in (1, 3, 1):  # decode through the returned cache
            if ids.shape[1] + new > config.max_position_embeddings:
                break
            step = torch.randint(0, config.vocab_size, (batch, new), generator=generator)
            ids, mask = torch.cat((ids, step), 1), torch.cat((mask, torch.ones_like(step)), 1)
            feed = {"input_ids": step.numpy(), "attention_mask": mask.numpy(),
                    **dict(zip(cache_names(config.num_hidden_layers, "past_key_values"), outputs[1:]))}
            outputs = session.run(None, feed)
            with torch.no_grad():
                ours = model(ids, attention_mask=mask).logits[:, -new:].float().numpy()
            worst = max(worst, float(np.abs(outputs[0] - ours).max()))
            steps += 1
    return OnnxCheck(shapes, worst, steps)


def export_onnx(checkpoint: str | Path | MiniGPT, out_dir: str | Path, tokenizer: Any = None,
                opset: int | None = None, check: bool = True, tolerance: float = 1e-4,
                kv_cache: bool = False, overwrite: bool = False) -> tuple[Path, OnnxCheck | None]:
    """Write `out_dir/model.onnx` (fp32; plus the tokenizer when the checkpoint has one) and, with `check`,
    verify it in onnxruntime. `kv_cache`: the graph takes and returns the past keys and values (see the
    module's docstring). A non-empty `out_dir` is refused unless `overwrite`. Returns the directory and the
    check's result."""
    out_dir = check_output_dir(out_dir, overwrite)
    model, tokenizer = load_for_export(checkpoint, tokenizer)
    if model.config.num_experts > 0:
        raise ExportError(f"num_experts={model.config.num_experts}: mixture-of-experts models cannot be exported to "
                          "ONNX yet (their routing is data-dependent)")
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ExportError(f"ONNX export needs the onnx and onnxscript packages ({e}); pip install 'mini-llm[onnx]'") \
            from None
    model = copy.deepcopy(model).float().eval()
    context = model.config.max_position_embeddings
    batch = torch.export.Dim("batch", min=1, max=4096)
    sequence = torch.export.Dim("sequence", min=2, max=context)
    example = torch.randint(0, model.config.vocab_size, (2, min(16, context)))
    if kv_cache:  # example: 5 past positions and 3 new ones (sizes 0 and 1 would be specialised)
        layers, config = model.config.num_hidden_layers, model.config
        past_shape = (2, config.num_key_value_heads, 5, config.attention_head_dim)
        wrapper: nn.Module = _LogitsWithCache(model)
        past = torch.export.Dim("past_sequence", min=0, max=context)
        example = example[:, :3]
        args: tuple = (example, torch.ones(2, 8, dtype=torch.long), [torch.randn(past_shape) for _ in range(2 * layers)])
        names = (["input_ids", "attention_mask", *cache_names(layers, "past_key_values")],
                 ["logits", *cache_names(layers, "present")])
        sequence = torch.export.Dim("sequence", min=1, max=context)
        dynamic: dict[str, Any] = {"input_ids": {0: batch, 1: sequence},
                                   "attention_mask": {0: batch, 1: torch.export.Dim("total_sequence", min=1,
                                                                                    max=context)},
                                   "past_key_values": [{0: batch, 2: past}] * (2 * layers)}
    else:
        wrapper, args = _Logits(model), (example, torch.ones_like(example))
        names = (["input_ids", "attention_mask"], ["logits"])
        dynamic = {"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: sequence}}
    result = None
    with staged_directory(out_dir, overwrite) as tmp:
        torch.onnx.export(wrapper.eval(), args, str(tmp / ONNX_FILE), input_names=names[0], output_names=names[1],
                          dynamic_shapes=dynamic, opset_version=opset, dynamo=True, verbose=False)
        if check:
            result = check_onnx(tmp / ONNX_FILE, model)
            if result.max_abs_diff > tolerance:
                raise ExportError(f"onnxruntime's logits differ from PyTorch's by {result.max_abs_diff:.2e} "
                                  f"(> {tolerance}); the export is not written")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        # the model's config beside the graph, for readers (vocabulary size, context, special tokens)
        atomic_write_json(tmp / "config.json", {"architectures": ["MiniGPT"], **model.config.to_dict(),
                                                "head_dim": model.config.attention_head_dim})
    return out_dir, result
