"""LoRA (Hu et al., 2021): fine-tune a frozen model through low-rank updates W + (alpha/r)·B·A.

Only A (r × in) and B (out × r) train, so an adapter is a few MB however large the model is, and
`merge_lora` folds it back into plain `nn.Linear` weights: the merged model is an ordinary `MiniGPT`
with the base parameter names, so it saves, exports and serves like any other checkpoint.

    model = apply_lora(MiniGPT.from_pretrained("out/sft/final"), LoRAConfig(rank=8))
    ...train (only LoRA parameters require grad)...
    save_lora(model, "out/lora")                         # adapter_model.safetensors + adapter_config.json
    merge_lora(model).save_pretrained("out/merged")
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from minillm.io import atomic_write, atomic_write_json

ALL_LINEAR = "all-linear"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16
    dropout: float = 0.0
    # Suffixes of module names ("q_proj" matches every `...self_attn.q_proj`); "all-linear" = every
    # nn.Linear except `lm_head`, as in PEFT.
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):  # "all-linear" or one name, as PEFT accepts
            self.target_modules = (self.target_modules,)
        self.target_modules = tuple(self.target_modules)
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRAConfig.rank must be an integer >= 1, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRAConfig.alpha must be > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(f"LoRAConfig.target_modules must be non-empty names, got {self.target_modules!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update: base(x) + dropout(x)·Aᵀ·Bᵀ·(alpha/r)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        # B = 0 makes the wrapped layer start exactly equal to the base layer; A random (as PEFT:
        # kaiming_uniform with a=√5, nn.Linear's own init) so B's gradient is not zero.
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)  # (..., out)
        return self.base(x) + update * self.scaling

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A plain nn.Linear computing the same function (dropout aside): W + B·A·scaling, same bias."""
        weight = self.base.weight
        merged = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        # The product in fp32, so that merging a bf16 model does not lose the (small) update to rounding.
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
        merged.weight.copy_((weight.float() + delta).to(weight.dtype))
        if self.base.bias is not None:
            merged.bias.copy_(self.base.bias)
        return merged

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


def _matches(name: str, targets: tuple[str, ...]) -> str | None:
    """The first target that `name` ends with, at a module boundary ("q_proj" never matches "xq_proj")."""
    for target in targets:
        if target == ALL_LINEAR or name == target or name.endswith("." + target):
            return target
    return None


def apply_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Wrap the target linears of `model` in place in `LoRALinear`s and freeze everything else."""
    if getattr(model, "lora_config", None) is not None or any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model already has LoRA adapters; merge_lora() it first or load into a fresh copy")
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    if tied and "lm_head" in config.target_modules:
        raise ValueError("lm_head cannot be a LoRA target: its weight is tied to model.embed_tokens, and a "
                         "merge would change the embeddings too")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    # An output head is never part of "all-linear" (PEFT's convention); named explicitly, it is allowed.
    candidates = {n: m for n, m in linears.items()
                  if n != "lm_head" or (not tied and "lm_head" in config.target_modules)}
    chosen, used = {}, set()
    for name, module in candidates.items():
        target = _matches(name, config.target_modules)
        if target is not None:
            chosen[name] = module
            used.add(target)
    unmatched = [t for t in config.target_modules if t not in used]
    if unmatched:
        short_names = sorted({n.rsplit(".", 1)[-1] for n in linears if not (tied and n == "lm_head")})
        raise ValueError(f"LoRA target_modules {unmatched} match no linear layer; the model's linear "
                         f"layers are: {', '.join(short_names)}")

    model.requires_grad_(False)
    for name, module in chosen.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(module, config.rank, config.alpha, config.dropout))
    model.lora_config = config
    return model


def _lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, keyed like `model.layers.0.self_attn.q_proj.lora_A`."""
    state = {}
    for name, layer in _lora_layers(model).items():
        state[f"{name}.lora_A"] = layer.lora_A.detach()
        state[f"{name}.lora_B"] = layer.lora_B.detach()
    return state


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors into `model`'s LoRA layers; any missing, extra or misshapen key is an error."""
    own = lora_state_dict(model)
    if not own:
        raise ValueError("the model has no LoRA layers; apply_lora() it first")
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"LoRA state does not match the model: missing keys {missing}, unexpected keys {unexpected}")
    wrong = [f"{k}: {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items()
             if state[k].shape != v.shape]
    if wrong:
        raise ValueError(f"LoRA state has the wrong shapes (different rank or model?): {wrong}")
    with torch.no_grad():
        for key, tensor in own.items():
            tensor.copy_(state[key])


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, in place: the result is a plain model, all trainable again."""
    for name, layer in _lora_layers(model).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.merge())
    model.requires_grad_(True)  # as a freshly loaded model, ready for further full training
    model.lora_config = None
    return model


def save_lora(model: nn.Module, directory: str | Path) -> None:
    """Write `adapter_model.safetensors` (adapter tensors only) and a PEFT-style `adapter_config.json`."""
    config: LoRAConfig | None = getattr(model, "lora_config", None)
    if config is None:
        raise ValueError("the model has no LoRA adapters to save; apply_lora() it first")
    directory = Path(directory)
    state = {k: v.contiguous().cpu() for k, v in lora_state_dict(model).items()}
    atomic_write(directory / ADAPTER_WEIGHTS_FILE, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    atomic_write_json(directory / ADAPTER_CONFIG_FILE, {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.rank, "lora_alpha": config.alpha,
        "lora_dropout": config.dropout, "target_modules": list(config.target_modules), "bias": "none",
        "base_model_name_or_path": getattr(model, "name_or_path", None)})


def load_lora_config(directory: str | Path) -> LoRAConfig:
    path = Path(directory) / ADAPTER_CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {ADAPTER_CONFIG_FILE} in {directory} (is it a LoRA adapter directory?)")
    data = json.loads(path.read_text(encoding="utf-8"))
    return LoRAConfig(rank=data["r"], alpha=data["lora_alpha"], dropout=data.get("lora_dropout", 0.0),
                      target_modules=data["target_modules"])


def load_lora(model: nn.Module, directory: str | Path) -> nn.Module:
    """Load an adapter saved by `save_lora`; a model without adapters gets them applied from the saved config."""
    config = load_lora_config(directory)
    if getattr(model, "lora_config", None) is None:
        apply_lora(model, config)
    weights = Path(directory) / ADAPTER_WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS_FILE} in {directory}")
    load_lora_state_dict(model, load_file(str(weights)))
    return model
