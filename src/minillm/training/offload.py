"""Optimizer offload: AdamW's state and fp32 master weights on the host while the model trains on a GPU."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["OptimizerOffload", "offload_useful"]


def offload_useful(device: torch.device) -> bool:
    """Whether moving the optimizer state to the host saves anything (not when training on the host)."""
    return device.type != "cpu"


class OptimizerOffload:
    """fp32 master copies of the trainable parameters on the CPU (pinned where CUDA is present): AdamW
    steps them there, so its two state tensors per parameter never take accelerator memory. Per step
    the gradients go to the host and the updated weights come back."""

    def __init__(self, groups: list[list[nn.Parameter]]) -> None:
        self.params = [p for group in groups for p in group]
        pin = torch.cuda.is_available()

        def master(p: nn.Parameter) -> nn.Parameter:
            t = p.detach().to("cpu", torch.float32, copy=True)
            return nn.Parameter(t.pin_memory() if pin else t)

        self.master_groups = [[master(p) for p in group] for group in groups]
        self.masters = [m for group in self.master_groups for m in group]

    def gradients_to_master(self) -> None:
        for p, m in zip(self.params, self.masters):
            m.grad = None if p.grad is None else p.grad.detach().to("cpu", torch.float32)
            p.grad = None

    @torch.no_grad()
    def master_to_model(self) -> None:
        for p, m in zip(self.params, self.masters):
            p.copy_(m, non_blocking=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
