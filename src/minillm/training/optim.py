"""The optimizers: AdamW, and Muon for the hidden matrices with AdamW for everything else.

Muon (Keller Jordan, 2024; used by modded-nanogpt and nanochat) updates a weight matrix W (m × n) with
an orthogonalised momentum instead of AdamW's per-element scaled gradient. For a gradient G at step t:

    B ← μ·B + (1 − μ)·G                  momentum (an exponential average of gradients)
    U ← (1 − μ)·G + μ·B                  Nesterov: look one momentum step ahead
    O ← NS₅(U) ≈ U·(UᵀU)^(-1/2)          the nearest semi-orthogonal matrix (U = PΣQᵀ → PQᵀ)
    W ← W·(1 − η·λ) − η·√max(1, m/n)·O   decoupled weight decay λ; the factor keeps the update's RMS
                                         about the same for tall matrices

Every singular value of the update is (about) 1, so the step moves W the same amount in every
direction its gradient spans, instead of mostly along the few dominant ones that a raw gradient (or
AdamW's elementwise scaling) favours. NS₅ is the quintic Newton–Schulz iteration: with X₀ = U/‖U‖_F
(so every singular value is ≤ 1) and X transposed to be wide,

    A ← X·Xᵀ,  X ← a·X + (b·A + c·A²)·X,   (a, b, c) = (3.4445, −4.7750, 2.0315), five times,

which applies the odd polynomial p(σ) = aσ + bσ³ + cσ⁵ to each singular value. The coefficients make
the slope at zero large, so small singular values grow to about 1 in five steps; they end spread in
roughly [0.7, 1.2] rather than exactly 1, which trains just as well. Only matrix products are needed,
so it runs in bf16 on GPUs.

Muon is for the 2-D matrices inside the transformer blocks (attention and MLP projections, MoE experts
and routers, LoRA adapters); embeddings, the output head, norms and biases are not hidden linear maps
and train with AdamW in the same optimizer object (one state dict, one schedule, one gradient scaler).
`build_optimizer` makes that split.

Under FSDP each rank holds a shard of every matrix, but orthogonalisation needs the whole matrix: the
momentum is kept (and updated) per shard, the Nesterov update is gathered into the full matrix, every
rank runs the same Newton–Schulz on it and keeps its own shard of the result. Under DDP the gradients
are already averaged, so every rank computes the same step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim.adam import adam

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
OPTIMIZERS = ("adamw", "muon")


def newton_schulz(update: torch.Tensor, steps: int = 5, eps: float = 1e-7,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The quintic Newton–Schulz orthogonalisation (see the module docstring) of a matrix (..., m, n),
    computed in `dtype`; a stack of equally shaped matrices is done in one batched product per step."""
    a, b, c = NS_COEFFICIENTS
    x = update.to(dtype)
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT  # work with the wide orientation: X·Xᵀ is then the smaller Gram matrix
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)  # every singular value ≤ 1
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """Muon on the parameter groups marked `use_muon=True`, AdamW on the others.

    Muon groups: `lr`, `momentum`, `weight_decay`, `nesterov`, `ns_steps`; AdamW groups: `lr`, `betas`,
    `eps`, `weight_decay`. The Newton–Schulz iteration runs in bf16 on CUDA and in fp32 elsewhere
    (`ns_dtype` overrides); `fused` is passed to PyTorch's AdamW kernel for the AdamW groups.
    """

    def __init__(self, param_groups: list[dict[str, Any]], ns_dtype: torch.dtype | None = None,
                 fused: bool | None = None) -> None:
        defaults = dict(lr=0.02, momentum=0.95, weight_decay=0.0, nesterov=True, ns_steps=5,
                        betas=(0.9, 0.95), eps=1e-8, use_muon=False)
        super().__init__(param_groups, defaults)
        for group in self.param_groups:
            if group["use_muon"]:
                for p in group["params"]:
                    if p.dim() != 2:
                        raise ValueError(f"Muon updates 2-D matrices only; got a parameter of shape {tuple(p.shape)}")
        self.ns_dtype = ns_dtype
        self.fused = fused

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_group(group)
            else:
                self._adamw_group(group)
        return loss

    def _muon_group(self, group: dict[str, Any]) -> None:
        lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
        updates: dict[tuple[int, ...], list[tuple[nn.Parameter, torch.Tensor]]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - momentum)
            update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
            updates.setdefault((*p.shape, hasattr(p, "full_tensor")), []).append((p, update))
        for (rows, cols, sharded), pairs in updates.items():
            ns_dtype = self.ns_dtype or (torch.bfloat16 if pairs[0][0].device.type == "cuda" else torch.float32)
            if sharded:  # FSDP: each matrix gathered whole, orthogonalised, and this rank's shard kept
                orthogonal = [_orthogonalise_sharded(u, group["ns_steps"], ns_dtype) for _, u in pairs]
            else:  # matrices of one shape go through Newton–Schulz together (batched products)
                orthogonal = newton_schulz(torch.stack([u for _, u in pairs]), group["ns_steps"], dtype=ns_dtype)
            scale = math.sqrt(max(1.0, rows / cols))
            for (p, _), o in zip(pairs, orthogonal):
                p.mul_(1 - lr * wd)
                p.add_(o.to(p.dtype), alpha=-lr * scale)

    def _adamw_group(self, group: dict[str, Any]) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if self.fused else "cpu")
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        adam(params, grads, exp_avgs, exp_avg_sqs, [], steps, fused=self.fused,
             foreach=None if self.fused else False, decoupled_weight_decay=True, amsgrad=False,
             beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
             maximize=False)


def _orthogonalise_sharded(update: torch.Tensor, steps: int, dtype: torch.dtype) -> torch.Tensor:
    """`newton_schulz` of an FSDP-sharded DTensor: gathered whole, the same iteration on every rank, each
    rank keeping its own shard of the result."""
    from torch.distributed.tensor import distribute_tensor

    full = newton_schulz(update.full_tensor(), steps, dtype=dtype)
    return distribute_tensor(full, update.device_mesh, update.placements, src_data_rank=None)


def is_hidden_matrix(name: str, param: nn.Parameter) -> bool:
    """Whether Muon updates this parameter: a 2-D weight inside a transformer block (attention and MLP
    projections, experts and routers, LoRA adapters), not an embedding, head, norm or bias."""
    return param.dim() == 2 and ".layers." in f".{name}"


def parameter_groups(named: Iterable[tuple[str, nn.Parameter]], optimizer: str
                     ) -> list[tuple[str, list[tuple[str, nn.Parameter]]]]:
    """The trainable parameters (each once, in model order) split into named groups:
    adamw: "decay" (matrices but embeddings) and "no_decay" (norms, biases, embeddings);
    muon: "muon" (hidden matrices), then "decay" and "no_decay" of the rest, for AdamW."""
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {"muon": [], "decay": [], "no_decay": []}
    seen: set[int] = set()
    for name, param in named:
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        if optimizer == "muon" and is_hidden_matrix(name, param):
            groups["muon"].append((name, param))
        elif param.dim() >= 2 and "embed" not in name:
            groups["decay"].append((name, param))
        else:
            groups["no_decay"].append((name, param))
    order = ("muon", "decay", "no_decay") if optimizer == "muon" else ("decay", "no_decay")
    return [(key, groups[key]) for key in order]


def build_optimizer(groups: list[tuple[str, list[nn.Parameter]]], optimizer: str, *, lr: float,
                    weight_decay: float, betas: tuple[float, float], muon_lr: float = 0.02,
                    muon_momentum: float = 0.95, muon_weight_decay: float = 0.0,
                    fused: bool = False) -> torch.optim.Optimizer:
    """The optimizer over `groups` (from `parameter_groups`, tensors possibly replaced by offloaded
    copies): `torch.optim.AdamW` for "adamw", `Muon` for "muon"."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} is not supported; allowed: {', '.join(OPTIMIZERS)}")
    settings = {"decay": {"weight_decay": weight_decay}, "no_decay": {"weight_decay": 0.0},
                "muon": {"use_muon": True, "lr": muon_lr, "momentum": muon_momentum,
                         "weight_decay": muon_weight_decay}}
    param_groups = [{"params": params, **settings[key]} for key, params in groups]
    if optimizer == "adamw":
        return torch.optim.AdamW(param_groups, lr=lr, betas=betas, fused=fused)
    for group in param_groups:
        if not group.get("use_muon"):
            group.update(lr=lr, betas=betas)
    return Muon(param_groups, fused=fused)
