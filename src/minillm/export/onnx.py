"""Export a Mini-LLM checkpoint to ONNX, checked against onnxruntime.

The graph maps `input_ids` (and `attention_mask`, 1 for real tokens, 0 for left padding) of any batch
size and sequence length up to the model's context to `logits` (batch, sequence, vocabulary). It is
traced with `torch.onnx.export(dynamo=True)` (needs the `onnx` and `onnxscript` packages: `pip install
mini-llm[onnx]`); right after the export, onnxruntime runs it on two batch sizes and two sequence
lengths (one row left-padded) and the largest logit difference from PyTorch is reported — an export
that disagrees by more than `tolerance` is an error, not a file.

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

from minillm.export.hf import ExportError, load_for_export, staged_directory
from minillm.io import atomic_write_json
from minillm.model.transformer import MiniGPT

logger = logging.getLogger("minillm.export")

__all__ = ["ONNX_FILE", "OnnxCheck", "check_onnx", "export_onnx"]

ONNX_FILE = "model.onnx"


class _Logits(nn.Module):
    """What the graph computes: ids (and mask) → logits, nothing else (no cache, no loss)."""

    def __init__(self, model: MiniGPT) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, attention_mask=attention_mask).logits


@dataclass
class OnnxCheck:
    shapes: list[tuple[int, int]]  # (batch, sequence) pairs run
    max_abs_diff: float  # over real (unpadded) positions


def check_onnx(path: str | Path, model: MiniGPT, seed: int = 0) -> OnnxCheck:
    """Run the ONNX file in onnxruntime on two batch sizes × two sequence lengths (the first row of each
    left-padded by two tokens) and compare with `model`'s logits."""
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    longest = min(model.config.max_position_embeddings, 48)
    shapes = [(b, t) for b in (1, 3) for t in (5, longest)]
    worst = 0.0
    for batch, length in shapes:
        ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=generator)
        mask = torch.ones_like(ids)
        mask[0, :2] = 0
        theirs = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        with torch.no_grad():
            ours = model(ids, attention_mask=mask).logits.float().numpy()
        real = mask.numpy().astype(bool)
        worst = max(worst, float(np.abs(theirs - ours)[real].max()))
    return OnnxCheck(shapes, worst)


def export_onnx(checkpoint: str | Path | MiniGPT, out_dir: str | Path, tokenizer: Any = None,
                opset: int | None = None, check: bool = True, tolerance: float = 1e-4) -> tuple[Path, OnnxCheck | None]:
    """Write `out_dir/model.onnx` (fp32; plus the tokenizer when the checkpoint has one) and, with `check`,
    verify it in onnxruntime. Returns the directory and the check's result."""
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
    out_dir = Path(out_dir)
    result = None
    with staged_directory(out_dir) as tmp:
        torch.onnx.export(_Logits(model).eval(), (example, torch.ones_like(example)), str(tmp / ONNX_FILE),
                          input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_shapes={"input_ids": {0: batch, 1: sequence},
                                          "attention_mask": {0: batch, 1: sequence}},
                          opset_version=opset, dynamo=True, verbose=False)
        if check:
            result = check_onnx(tmp / ONNX_FILE, model)
            if result.max_abs_diff > tolerance:
                raise ExportError(f"onnxruntime's logits differ from PyTorch's by {result.max_abs_diff:.2e} "
                                  f"(> {tolerance}); the export is not written")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        # the model's config beside the graph, for readers (vocabulary size, context, special tokens)
        atomic_write_json(tmp / "config.json", {"architectures": ["MiniGPT"], **model.config.to_dict()})
    return out_dir, result
