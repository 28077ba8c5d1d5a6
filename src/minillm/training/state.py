"""The training state of a checkpoint, `trainer_state/`: everything `Trainer.resume` needs to continue a run
exactly as if it had never stopped.

- `optimizer.pt`: the unsharded optimizer state;
- `state.pt`: the schedule, the gradient scaler and the torch RNG states (CPU and CUDA; every rank's
  under torchrun);
- `state.json`: the step, tokens seen, best validation loss, the loader's position, Python's and NumPy's
  RNG states, and what defines the run (training config, model config, LoRA settings, data size), so
  that resuming into a different run is refused (`ResumeError`);
- `loader.pt`: training data held as tensors, where a stage has some (RL: the rollout buffer).
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch
from safetensors.torch import load_file

from minillm.checkpoint_files import read_json_object
from minillm.errors import CheckpointError, MiniLLMError
from minillm.io import atomic_write_json
from minillm.model.lora import ADAPTER_WEIGHTS_FILE, load_lora_state_dict
from minillm.model.weights import read_checkpoint_weights
from minillm.training import distributed as dist_utils
from minillm.training.checkpoint import STATE_DIR, load_state_file

if TYPE_CHECKING:
    from minillm.training.trainer import Trainer

__all__ = ["ResumableLoader", "ResumeError", "load_training_state", "rng_state", "set_rng_state",
           "write_training_state"]

# Resuming with another batch size or seed would see other batches: a different run, so it is refused.
_RUN_DEFINING_FIELDS = ("batch_size", "grad_accum_steps", "seed", "optimizer")
_HARMLESS_MODEL_FIELDS = ("gradient_checkpointing", "extra")


class ResumeError(MiniLLMError, ValueError):
    """A checkpoint that cannot continue this run; the message says what changed."""


@runtime_checkable
class ResumableLoader(Protocol):
    """A loader whose position is saved with the training state (`BatchLoader`, `PretrainDataLoader`, a
    rank's shard under torchrun, an RL `RolloutSource`); any other iterable of batches starts afresh."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class _CountsTokens(Protocol):
    """A dataset that knows its token count (`LanguageModelingDataset`, `ConversationDataset`)."""

    def num_tokens(self) -> int: ...


# ---------------------------------------------------------------------------------------- RNG states
def rng_state() -> dict[str, Any]:
    """This process's RNG states: torch (CPU and CUDA) as tensors, Python's and NumPy's as JSON lists."""
    numpy_rng = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": _jsonable(random.getstate()),
            "numpy": [numpy_rng[0], numpy_rng[1].tolist(), *numpy_rng[2:]]}


def set_rng_state(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    random.setstate(_tupled(rng["python"]))
    name, keys, *rest = rng["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tupled(value: Any) -> Any:
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value


# ---------------------------------------------------------------------------------------- writing
def write_training_state(trainer: Trainer, directory: Path, optimizer_state: dict[str, Any],
                         rank_rng: list[dict[str, Any]] | None) -> None:
    """Write `trainer`'s state into `directory` (a checkpoint's `trainer_state/`). `optimizer_state` is the
    unsharded one (`full_optimizer_state`); `rank_rng` every rank's RNG states under torchrun (rank 0's
    are also stored at the top level)."""
    torch.save(optimizer_state, directory / "optimizer.pt")
    loader_tensors = trainer._loader_tensors()
    if loader_tensors is not None:
        torch.save(loader_tensors, directory / "loader.pt")
    tensors = {"scheduler": trainer.scheduler.state_dict(), "scaler": trainer.scaler.state_dict(),
               "torch_rng": torch.get_rng_state(),
               "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    if rank_rng is not None:
        tensors["rank_torch_rng"] = [r["torch"] for r in rank_rng]
        tensors["rank_cuda_rng"] = [r["cuda"] for r in rank_rng]
    torch.save(tensors, directory / "state.pt")
    mine = rng_state()
    loader = trainer.train_loader
    lora = _lora_config(trainer.base_model)
    atomic_write_json(directory / "state.json", {
        "step": trainer.step, "tokens_seen": trainer.tokens_seen,
        "best_val_loss": None if math.isinf(trainer.best_val_loss) else trainer.best_val_loss,
        "evals_without_improvement": trainer.evals_without_improvement,
        "world_size": trainer.world_size,
        "loader": loader.state_dict() if isinstance(loader, ResumableLoader) else None,
        "training_config": asdict(trainer.config),
        "model_config": _model_config(trainer.base_model),
        "lora_config": asdict(lora) if lora is not None else None,
        "data": _data_signature(loader),
        "python_rng": mine["python"], "numpy_rng": mine["numpy"],
        "rank_rng": [{"python": r["python"], "numpy": r["numpy"]} for r in rank_rng] if rank_rng else None,
    })


# ---------------------------------------------------------------------------------------- reading
def load_training_state(trainer: Trainer, directory: Path) -> None:
    """Restore `trainer` from the checkpoint `directory` saved with training state; a damaged state file
    is a one-line `CheckpointError` naming it, a checkpoint of another run a `ResumeError`."""
    state_dir = directory / STATE_DIR
    if not (state_dir / "state.json").is_file():
        raise FileNotFoundError(f"{directory}: no {STATE_DIR}/ to resume from (was it saved by a run?)")
    state = read_json_object(state_dir / "state.json")
    try:
        _load_state(trainer, directory, state)
    except (KeyError, IndexError, TypeError) as e:  # a state file of another shape or a damaged one
        raise CheckpointError(f"{state_dir}: training state is incomplete or malformed "
                              f"({type(e).__name__}: {e})") from e


def _load_state(trainer: Trainer, directory: Path, state: dict[str, Any]) -> None:
    state_dir = directory / STATE_DIR
    _check_resumable(trainer, state, directory)
    if _lora_config(trainer.base_model) is not None:
        adapter = directory / ADAPTER_WEIGHTS_FILE
        if not adapter.is_file():
            raise ResumeError(f"cannot resume a LoRA run from {directory}: no {ADAPTER_WEIGHTS_FILE}")
        load_lora_state_dict(trainer.base_model, load_file(str(adapter), device=str(trainer.device)))
    elif dist_utils.is_fsdp(trainer.model):
        dist_utils.load_full_state_dict(trainer.model, read_checkpoint_weights(directory)[0])  # our names
    else:
        trainer.base_model.load_weights(directory)
    trainer._setup_optimizer(trainer.total_steps())
    optimizer_state = load_state_file(state_dir / "optimizer.pt")
    dist_utils.load_full_optimizer_state(trainer.model, trainer.optimizer, optimizer_state, trainer._param_names)
    tensors = load_state_file(state_dir / "state.pt")
    trainer.scheduler.load_state_dict(tensors["scheduler"])
    trainer.scaler.load_state_dict(tensors["scaler"])
    rank = trainer.dist.rank if trainer.world_size > 1 else 0
    if rank == 0:
        rng = {"torch": tensors["torch_rng"], "cuda": tensors["cuda_rng"],
               "python": state["python_rng"], "numpy": state["numpy_rng"]}
    else:
        rng = {"torch": tensors["rank_torch_rng"][rank], "cuda": tensors["rank_cuda_rng"][rank],
               **state["rank_rng"][rank]}
    set_rng_state(rng)
    if state["loader"] is not None and isinstance(trainer.train_loader, ResumableLoader):
        trainer.train_loader.load_state_dict(state["loader"])
    if (state_dir / "loader.pt").is_file():
        trainer._load_loader_tensors(load_state_file(state_dir / "loader.pt"))
    trainer.step, trainer.tokens_seen = state["step"], state["tokens_seen"]
    trainer.best_val_loss = math.inf if state["best_val_loss"] is None else state["best_val_loss"]
    trainer.evals_without_improvement = state.get("evals_without_improvement", 0)


def _check_resumable(trainer: Trainer, state: dict[str, Any], directory: Path) -> None:
    saved_world = state.get("world_size", 1)
    if saved_world != trainer.world_size:
        raise ResumeError(f"cannot resume from {directory}: it was trained by {saved_world} process(es), "
                          f"this run has {trainer.world_size} (the global batch would change); "
                          f"relaunch with torchrun --nproc_per_node={saved_world}")
    lora = _lora_config(trainer.base_model)
    now_lora = asdict(lora) if lora is not None else None
    if state.get("lora_config") is not None:
        state["lora_config"]["target_modules"] = tuple(state["lora_config"]["target_modules"])
    if state.get("lora_config") != now_lora:
        raise ResumeError(f"cannot resume from {directory}: the LoRA settings changed "
                          f"(saved {state.get('lora_config')}, now {now_lora})")
    saved_model, now = state.get("model_config"), _model_config(trainer.base_model)
    if saved_model is not None and now is not None:
        changed = sorted(k for k in set(now) | set(saved_model)
                         if k not in _HARMLESS_MODEL_FIELDS and now.get(k) != saved_model.get(k))
        if changed:
            raise ResumeError(f"cannot resume from {directory}: the model changed ({', '.join(changed)})")
    data = _data_signature(trainer.train_loader)
    if state.get("data") is not None and state["data"] != data:
        raise ResumeError(f"cannot resume from {directory}: the training data changed "
                          f"(saved {state['data']}, now {data})")
    # a checkpoint older than a field ran with its default
    defaults = {f.name: f.default for f in fields(trainer.config)}
    saved = {k: state["training_config"].get(k, defaults[k]) for k in _RUN_DEFINING_FIELDS}
    changed = [k for k in _RUN_DEFINING_FIELDS if saved[k] != getattr(trainer.config, k)]
    if changed:
        raise ResumeError(f"cannot resume from {directory}: {', '.join(changed)} changed "
                          f"({', '.join(f'{k}: {saved[k]} -> {getattr(trainer.config, k)}' for k in changed)})")


# ---------------------------------------------------------------------------------------- what defines the run
def _data_signature(loader: Any) -> dict[str, int] | None:
    """The size of the training data: its items and, where the dataset counts them, its tokens."""
    # loaders over a map-style dataset (ours and torch's DataLoader) hold it as `.dataset`; a plain
    # iterable of batches has none, and nothing to compare
    dataset = getattr(loader, "dataset", None)
    if dataset is None:
        return None
    signature = {"items": len(dataset)}
    if isinstance(dataset, _CountsTokens):
        signature["tokens"] = int(dataset.num_tokens())
    return signature


def _model_config(model: Any) -> dict[str, Any] | None:
    # our models and transformers' hold their config as `.config`; a bare nn.Module has none to compare
    config = getattr(model, "config", None)
    return config.to_dict() if config is not None else None


def _lora_config(model: Any) -> Any:
    # `apply_lora` sets `lora_config` on the model it wraps; a model never given adapters has no attribute
    return getattr(model, "lora_config", None)
