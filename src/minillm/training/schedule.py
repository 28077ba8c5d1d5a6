"""Learning-rate schedules, as a factor of each parameter group's peak learning rate.

- cosine: linear warmup, then cosine decay to a floor (GPT-2, nanoGPT, Llama);
- wsd (warmup-stable-decay, as in MiniCPM and nanochat): linear warmup, a long constant stretch at the
  peak, then a linear decay to the floor over the last `decay_fraction` of the steps. The constant
  stretch makes progress at the full rate for longer, and the short final decay (the "cool-down")
  brings the loss down quickly; a run can also be extended before its decay starts.
"""

from __future__ import annotations

import math
from functools import partial

import torch

SCHEDULES = ("cosine", "wsd")


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """The cosine schedule's factor at optimizer step `step` (0-based).

    Warmup ramps linearly from 1/warmup to 1 over `warmup_steps`; then cosine decay reaches
    `min_lr_ratio` at `total_steps` and stays there.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr_ratio
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def wsd_multiplier(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float,
                   decay_fraction: float) -> float:
    """The warmup-stable-decay factor at optimizer step `step` (0-based): warmup as in `lr_multiplier`,
    1 until the last `decay_fraction` of `total_steps`, then linear down to `min_lr_ratio` at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, round(decay_fraction * total_steps))
    decay_start = max(warmup_steps, total_steps - decay_steps)
    if step < decay_start:
        return 1.0
    if step >= total_steps:
        return min_lr_ratio
    progress = (step - decay_start) / max(1, total_steps - decay_start)
    return 1.0 - (1.0 - min_lr_ratio) * progress


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                           min_lr_ratio: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, warmup_steps, total_steps, min_lr_ratio))


def make_schedule(optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int, total_steps: int,
                  min_lr_ratio: float = 0.1, decay_fraction: float = 0.2) -> torch.optim.lr_scheduler.LambdaLR:
    """`schedule` ("cosine" or "wsd") applied to every parameter group's own peak learning rate."""
    if schedule == "cosine":
        return warmup_cosine_schedule(optimizer, warmup_steps, total_steps, min_lr_ratio)
    if schedule == "wsd":
        factor = partial(wsd_multiplier, warmup_steps=warmup_steps, total_steps=total_steps,
                         min_lr_ratio=min_lr_ratio, decay_fraction=decay_fraction)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    raise ValueError(f"lr_schedule={schedule!r} is not supported; allowed: {', '.join(SCHEDULES)}")
