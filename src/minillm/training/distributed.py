"""Data-parallel training under torchrun: DDP or FSDP2 (`fully_shard`), chosen by `distributed:` in the config.

The rule every piece here follows: N ranks with micro-batch B together compute exactly the update one
process computes on the global batch of N·B items.

- Data: `ShardedBatchLoader` walks the single-process order of global batches (size N·B, the same
  seeded order on every rank) and gives rank r the items `indices[r::N]`; the union over the ranks is
  the one-process batch, and the resume state `(seed, epoch, batch_index)` is the same on every rank.
- Loss: each rank sums its loss; the sum is divided by the GLOBAL item count (`global_count`, an
  all-reduce of the per-rank counts), so a rank with more real tokens weighs more, as in one process.
- Gradients: DDP and FSDP2 *average* gradients over ranks (divide the sum by N). Multiplying each
  rank's loss by N (`loss_scale`) turns that average back into the sum Σ_r ∇(loss_sum_r) / items, the
  single-process gradient. During gradient accumulation `grad_sync(model, last)` skips the
  communication for all but the last micro-batch (DDP `no_sync`, FSDP2 `set_requires_gradient_sync`);
  the result is the same, only cheaper.
- Saving: `full_state_dict` gathers an unsharded CPU state dict (FSDP2: `get_model_state_dict` with
  `full_state_dict=True, cpu_offload=True`; every rank must call it, rank 0 receives it), and
  `unwrapped_copy` turns it into a plain `MiniGPT` on rank 0 for `save_pretrained`, so a checkpoint
  written by 8 sharded GPUs loads in one process with `MiniGPT.from_pretrained`.

FSDP2 and tied embeddings: `fully_shard` is applied to each decoder layer and then to the root. The
root group owns every parameter not in a layer — the embedding, the final norm and `lm_head` — so the
tied `lm_head.weight`/`embed_tokens.weight` parameter is one parameter sharded once. (Sharding the
embedding and the head as separate groups would shard the same tensor twice.)

Single process (`mode="none"`, or torchrun absent) everything here is a no-op, so the same code runs.
"""

from __future__ import annotations

import copy
import datetime
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

MODES = ("none", "ddp", "fsdp")  # the values of a run config's `distributed`
PADDING_KEY = "padding_only"  # a batch a rank forwards only to keep in step with the others; not scored

__all__ = ["MODES", "PADDING_KEY", "DistributedContext", "ShardedBatchLoader", "all_gather_object", "all_reduce_sum", "any_rank",
           "barrier", "cleanup", "full_optimizer_state", "full_state_dict", "global_count", "grad_sync",
           "init_distributed", "is_fsdp", "is_main", "load_full_optimizer_state", "load_full_state_dict",
           "loss_scale", "shard_loader", "unwrap", "unwrapped_copy", "world_size", "wrap_model"]


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits: torchrun's RANK, LOCAL_RANK and WORLD_SIZE, and its device."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    mode: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @classmethod
    def from_env(cls, device: str | torch.device | None = None, mode: str = "none") -> DistributedContext:
        rank = int(os.environ.get("RANK", 0))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        world_size = int(os.environ.get("WORLD_SIZE", 1))
        if device is None:
            device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
        return cls(rank, local_rank, world_size, device, mode)


_CONTEXT = DistributedContext()


def init_distributed(mode: str = "none", device: str | torch.device | None = None,
                     timeout_minutes: float = 30) -> DistributedContext:
    """Join torchrun's process group for `mode` ("none" | "ddp" | "fsdp"): nccl on CUDA, gloo on CPU.

    With `mode="none"` (or `None`) nothing is initialised and the context is rank 0 of 1. A DDP/FSDP mode
    without torchrun's environment (WORLD_SIZE unset) runs as a process group of one, so a config with
    `distributed: fsdp` also runs under plain `python`.
    """
    global _CONTEXT
    mode = "none" if mode in (None, "none") else mode
    if mode not in MODES:
        raise ValueError(f"distributed={mode!r} is not supported; allowed: {', '.join(MODES)}")
    ctx = DistributedContext.from_env(device, mode)
    if mode != "none" and not dist.is_initialized():
        if ctx.device.type == "cuda":
            torch.cuda.set_device(ctx.device)
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()) if ctx.world_size == 1 else "29500")
        backend = "nccl" if ctx.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=ctx.rank, world_size=ctx.world_size,
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    _CONTEXT = ctx
    return ctx


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cleanup() -> None:
    """Leave the process group (safe to call when none was joined)."""
    global _CONTEXT
    if dist.is_initialized():
        dist.destroy_process_group()
    _CONTEXT = DistributedContext()


def context() -> DistributedContext:
    return _CONTEXT


def is_main() -> bool:
    """Whether this process logs and writes checkpoints (rank 0, or the only process)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """Whether `flag` is true on any rank (so every rank takes the same branch: stop, save, …)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return bool(flag)
    t = torch.tensor(int(bool(flag)), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (`[obj]` in one process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


# ---------------------------------------------------------------------------------------- the model
class _DDP(nn.parallel.DistributedDataParallel):
    """DDP that also answers the wrapped model's attributes (`config`, `save_pretrained`, …), so code
    written for a bare `MiniGPT` (objectives reading `model.config`) runs unchanged."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def wrap_model(model: nn.Module, mode: str, ctx: DistributedContext | None = None) -> nn.Module:
    """Wrap `model` (already on `ctx.device`) for `mode`: the model itself for "none", DDP, or FSDP2
    (`fully_shard` on each decoder layer, then the root — see the module docstring for tied weights).

    FSDP2 changes `model` in place (its class becomes an `FSDPModule`); its parameters become DTensor
    shards, so build the optimizer after wrapping."""
    ctx = ctx or _CONTEXT
    if mode in (None, "none"):
        return model
    if not dist.is_initialized():
        raise RuntimeError(f"wrap_model(mode={mode!r}) needs init_distributed({mode!r}) first")
    if mode == "ddp":
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return _DDP(model, device_ids=device_ids)
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        with torch.no_grad():  # every rank shards the same weights, whatever each one was built with
            for tensor in [*model.parameters(), *model.buffers()]:
                dist.broadcast(tensor, src=0)
        mesh = init_device_mesh(ctx.device.type, (dist.get_world_size(),))
        for layer in _decoder_layers(model):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    raise ValueError(f"distributed={mode!r} is not supported; allowed: {', '.join(MODES)}")


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    return list(layers) if layers is not None else []


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 wraps in place: the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_fsdp(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - very old torch
        return False
    return isinstance(model, FSDPModule)


@contextmanager
def grad_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Run a micro-batch's backward with (`sync=True`, the last micro-batch of a step) or without
    gradient communication. Skipping it for the earlier micro-batches changes nothing but the cost."""
    if sync:
        yield
    elif isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif is_fsdp(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        with nullcontext():
            yield


def loss_scale(model: nn.Module) -> float:
    """The factor to multiply each rank's loss by so that DDP's/FSDP's gradient *average* over ranks
    becomes the single-process gradient of the global batch: the world size when wrapped, else 1."""
    wrapped = isinstance(model, nn.parallel.DistributedDataParallel) or is_fsdp(model)
    return float(dist.get_world_size()) if wrapped and dist.is_initialized() else 1.0


def global_count(count: int, device: torch.device | str = "cpu") -> int:
    """The item count of all ranks together (the loss normaliser of a distributed step)."""
    if not dist.is_initialized():
        return int(count)
    t = torch.tensor(int(count), dtype=torch.long, device=device)
    dist.all_reduce(t)
    return int(t.item())


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum `value` over the ranks (a copy; the identity in one process)."""
    if not dist.is_initialized():
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value


# ---------------------------------------------------------------------------------------- saving
def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full, unsharded CPU state dict, on rank 0 (other ranks get `{}` under FSDP, the same dict
    under DDP). Under FSDP every rank must call it: it is a collective."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full (unsharded) state dict into `model`, sharding it under FSDP; every key must match
    (a tied LM head may be absent: it is the embedding)."""
    target = unwrap(model)
    tied = getattr(getattr(target, "config", None), "tie_word_embeddings", False)
    if tied and "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
        state = {**state, "lm_head.weight": state["model.embed_tokens.weight"]}
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
        return
    target.load_state_dict(state)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                         param_names: list[str]) -> dict[str, Any] | None:
    """The optimizer's state as one process would have it (`optimizer.state_dict()` of the unsharded
    model: state keyed by parameter index), so a checkpoint written by N sharded ranks resumes in any
    layout. `param_names` lists the parameters in the optimizer's order. Under FSDP this gathers the
    shards (a collective: call it on every rank); rank 0 gets the state, the others None."""
    if not is_fsdp(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full = get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main():
        return None
    index = {name: i for i, name in enumerate(param_names)}
    return {"state": {index[name]: value for name, value in full["state"].items()},
            "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                             for group in full["param_groups"]]}


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                              param_names: list[str]) -> None:
    """Load a state saved by `full_optimizer_state` (every rank passes the whole state; under FSDP each
    keeps its shard)."""
    if not is_fsdp(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    named = {"state": {param_names[int(i)]: value for i, value in state["state"].items()},
             "param_groups": [{**group, "params": [param_names[int(i)] for i in group["params"]]}
                              for group in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True))


def unwrapped_copy(model: nn.Module) -> nn.Module | None:
    """A plain CPU copy of the model with the full weights, on rank 0 (None elsewhere), for
    `save_pretrained`/`save_checkpoint`. Without FSDP the model itself (unwrapped) is returned, no copy.
    Collective under FSDP: call it on every rank."""
    if not is_fsdp(model):
        return unwrap(model) if is_main() else None
    state = full_state_dict(model)
    if not is_main():
        return None
    plain = _plain_class(model)(model.config)
    tied = getattr(model.config, "tie_word_embeddings", False)
    if tied:
        state.pop("lm_head.weight", None)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not (tied and k == "lm_head.weight")]:
        raise RuntimeError(f"gathered state does not match the model: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    return plain


def _plain_class(model: nn.Module) -> type:
    """fully_shard swaps the model's class for a dynamic subclass of (FSDPModule, the class): the class."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule) and issubclass(c, nn.Module))


# ---------------------------------------------------------------------------------------- data
class ShardedBatchLoader:
    """Rank `rank`'s share of a `BatchLoader`'s global batches: the inner loader makes the global batches
    (size world × micro) in its seeded order, and this rank collates the items `indices[rank::world]`.

    The position (`state_dict`: seed, epoch, batch_index) is the inner loader's, the same on every rank,
    so a checkpoint saved by rank 0 resumes every rank. A global batch with fewer items than ranks (the
    last, short one) is kept, as one process keeps it: a rank with no item of its own forwards a copy of
    the batch's first item marked `PADDING_KEY`, which the trainer gives zero weight — every rank must
    take part in each forward and backward (FSDP gathers weights there, DDP reduces gradients)."""

    def __init__(self, loader: Any, rank: int, world_size: int) -> None:
        self.loader = loader
        self.rank = rank
        self.world_size = world_size

    @property
    def dataset(self) -> Any:
        return self.loader.dataset

    @property
    def micro_batch_size(self) -> int:
        return self.loader.batch_size // self.world_size

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        inner = self.loader
        batches = inner._batches()
        while inner.batch_index < len(batches):
            indices = batches[inner.batch_index]
            inner.batch_index += 1
            if self.rank >= len(indices):
                yield {**inner.collate([inner.dataset[int(indices[0])]]), PADDING_KEY: True}
                continue
            yield inner.collate([inner.dataset[int(i)] for i in indices[self.rank::self.world_size]])
        inner.epoch += 1
        inner.batch_index = 0

    def state_dict(self) -> dict[str, int]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.loader.load_state_dict(state)


def shard_loader(loader: Any, ctx: DistributedContext | None = None) -> Any:
    """Shard a `BatchLoader` whose `batch_size` is the per-rank micro-batch: a copy of it makes global
    batches of `batch_size × world` and each rank takes its interleaved slice. In one process the
    loader is returned unchanged; a loader that is not a `BatchLoader` is refused."""
    ctx = ctx or _CONTEXT
    world = dist.get_world_size() if dist.is_initialized() else ctx.world_size
    if world <= 1:
        return loader
    if not (hasattr(loader, "_batches") and hasattr(loader, "collate")):
        raise TypeError(f"cannot shard a {type(loader).__name__} over {world} ranks: give the trainer a "
                        "Dataset or a BatchLoader (e.g. PretrainDataLoader)")
    rank = dist.get_rank() if dist.is_initialized() else ctx.rank
    global_loader = copy.copy(loader)
    global_loader.batch_size = loader.batch_size * world
    return ShardedBatchLoader(global_loader, rank, world)
