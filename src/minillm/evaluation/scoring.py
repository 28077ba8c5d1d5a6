"""The two forward passes every likelihood-based evaluation is made of: the log-probabilities of labelled
tokens in a row, and the next-token distribution after a context. Rows are batched longest first (little
padding), right-padded, and run without gradients in eval mode; results come back in the given order."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from minillm.model.transformer import eval_mode, token_logps


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Indices in batches of `batch_size`, longest rows first, so that a batch's rows have similar lengths."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def _padded(rows: Sequence[Sequence[int]], fill: int, device: torch.device) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [fill] * (width - len(r)) for r in rows], dtype=torch.long, device=device)


def labelled_logprobs(model: nn.Module, rows: Sequence[tuple[Sequence[int], Sequence[int]]],
                      batch_size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each `(input_ids, labels)` row (labels -100 where nothing is scored; position t's logits score
    labels[t + 1], as in training), the log-probabilities of the labelled tokens in order (fp32, on the
    CPU) and whether each was the model's argmax (the next-token accuracy)."""
    device = model_device(model)
    results: list[tuple[torch.Tensor, torch.Tensor]] = [None] * len(rows)  # type: ignore[list-item]
    with eval_mode(model), torch.inference_mode():
        for batch in _batches([len(ids) for ids, _ in rows], batch_size):
            input_ids = _padded([rows[i][0] for i in batch], 0, device)
            labels = _padded([rows[i][1] for i in batch], -100, device)
            mask = _padded([[1] * len(rows[i][0]) for i in batch], 0, device)
            logits = model(input_ids, attention_mask=mask).logits
            logps, scored = token_logps(logits, labels)
            hits = logits[:, :-1].argmax(-1) == labels[:, 1:]
            for row, i in enumerate(batch):
                results[i] = (logps[row][scored[row]].cpu(), hits[row][scored[row]].cpu())
    return results


def next_token_logprobs(model: nn.Module, contexts: Sequence[Sequence[int]], candidates: Sequence[Sequence[int]],
                        batch_size: int = 8) -> list[torch.Tensor]:
    """For each context, the log-probabilities (fp32, on the CPU) that the next token is each of its
    `candidates` (token ids), under the model's full next-token distribution. Only the candidates are
    kept, so a large vocabulary costs no memory per context."""
    if any(len(c) == 0 for c in contexts):
        raise ValueError("a context has no tokens; the first token has no prediction to read")
    device = model_device(model)
    out: list[torch.Tensor] = [None] * len(contexts)  # type: ignore[list-item]
    with eval_mode(model), torch.inference_mode():
        for batch in _batches([len(c) for c in contexts], batch_size):
            input_ids = _padded([contexts[i] for i in batch], 0, device)
            mask = _padded([[1] * len(contexts[i]) for i in batch], 0, device)
            logits = model(input_ids, attention_mask=mask).logits
            last = torch.tensor([len(contexts[i]) - 1 for i in batch], device=device)
            logps = logits[torch.arange(len(batch), device=device), last].float().log_softmax(-1)
            for row, i in enumerate(batch):
                out[i] = logps[row, torch.tensor(candidates[i], dtype=torch.long, device=device)].cpu()
    return out
