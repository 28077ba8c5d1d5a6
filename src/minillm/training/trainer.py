"""The one training loop. Every stage is this `Trainer` with another objective (see objectives.py).

A step: take `grad_accum_steps` micro-batches, sum each one's loss, divide by the item count of the
whole step (so accumulation equals one large batch), backpropagate, clip, step AdamW and the
warmup-cosine schedule. Validation runs every `eval_every` steps; the best model by validation loss is
kept in `best/`, the last in `final/`.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset

from minillm.checkpoint_files import read_json_object
from minillm.data.formats import DataError
from minillm.data.loader import BatchLoader, pad_collate
from minillm.data.pretrain import LanguageModelingDataset, PretrainDataLoader
from minillm.errors import CheckpointError, MiniLLMError
from minillm.io import atomic_write_json
from minillm.model.lora import ADAPTER_WEIGHTS_FILE, load_lora_state_dict, merge_lora, save_lora
from minillm.model.transformer import WEIGHTS_FILE, eval_mode
from minillm.training import distributed as dist_utils
from minillm.training.autotune import (
    DTYPES,
    ProbeRun,
    adamw_fused_ok,
    choose_compile,
    choose_precision,
    cpu_has_native_bf16,
    probe_run,
)
from minillm.training.checkpoint import (
    STATE_DIR,
    STEP_PREFIX,
    clean_leftovers,
    load_state_file,
    prune_checkpoints,
    save_checkpoint,
)
from minillm.training.logging import MetricsLogger
from minillm.training.memory import MemoryConfig, MemoryMonitor
from minillm.training.mfu import mfu_estimator, time_matmul
from minillm.training.objectives import DPOObjective, LanguageModelingObjective, Objective, RewardObjective
from minillm.training.optim import OPTIMIZERS, build_optimizer, parameter_groups
from minillm.training.plots import plot_run
from minillm.training.run_config import PRECISIONS
from minillm.training.schedule import SCHEDULES, make_schedule

__all__ = ["DPOTrainer", "LanguageModelingDataset", "PreTrainer", "RewardTrainer", "SFTTrainer", "Trainer", "TrainingConfig",
           "TrainingInterrupted", "resolve_precision"]

logger = logging.getLogger("minillm.training")



@dataclass
class TrainingConfig:
    batch_size: int = 16  # micro-batch size
    grad_accum_steps: int = 1
    max_steps: int | None = None  # optimizer steps; None: run `epochs` passes over the data
    epochs: float = 1.0
    optimizer: str = "adamw"  # adamw | muon (Muon on the hidden matrices, AdamW on the rest; see optim.py)
    lr: float = 1e-3  # AdamW's peak learning rate (with muon: for embeddings, head, norms and biases)
    lr_schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay: constant, then a linear decay at the end)
    decay_fraction: float = 0.2  # wsd: the share of the steps spent decaying to lr · min_lr_ratio
    min_lr_ratio: float = 0.1  # the schedule ends at lr · min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    muon_lr: float = 0.02  # Muon's peak learning rate (the hidden matrices)
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0: no clipping
    eval_every: int = 0  # steps; 0: only at the end
    eval_batches: int = 50  # validation batches per evaluation; 0: the whole validation set
    save_every: int = 0  # steps between rolling `step_N/` checkpoints; 0: only best/ and final/
    keep_last: int = 2  # rolling checkpoints kept (older ones are deleted)
    log_every: int = 10
    out_dir: str | None = None
    seed: int = 1337
    precision: str = "auto"
    progress: bool = True
    distributed: str = "none"  # none | ddp | fsdp (under torchrun; `batch_size` is per process)
    compile: bool | str = False  # torch.compile the model: true | false | auto (when measured faster)
    early_stopping_patience: int = 0  # stop after this many evaluations without improvement; 0: never
    early_stopping_min_delta: float = 0.0  # a validation loss must drop by more than this to count
    optimizer_offload: bool = False  # keep AdamW state (and fp32 master weights) on the CPU; GPU only

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} is not supported; allowed: {', '.join(PRECISIONS)}")
        if self.distributed in (None, False):
            self.distributed = "none"
        if self.distributed not in dist_utils.MODES:
            raise ValueError(f"distributed={self.distributed!r} is not supported; allowed: "
                             f"{', '.join(dist_utils.MODES)}")
        for name in ("optimizer_offload", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.compile, bool) and self.compile != "auto":
            raise ValueError(f"compile must be true, false or auto, got {self.compile!r}")
        if self.early_stopping_patience < 0 or self.early_stopping_min_delta < 0:
            raise ValueError("early_stopping_patience and early_stopping_min_delta must be >= 0")
        for name in ("batch_size", "grad_accum_steps", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1 (or null to train by epochs), got {self.max_steps}")
        if self.max_steps is None and self.epochs <= 0:
            raise ValueError(f"epochs must be positive, got {self.epochs}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r} is not supported; allowed: {', '.join(OPTIMIZERS)}")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule={self.lr_schedule!r} is not supported; allowed: {', '.join(SCHEDULES)}")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ValueError(f"decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if self.muon_lr <= 0:
            raise ValueError(f"muon_lr must be positive, got {self.muon_lr}")
        if not 0.0 <= self.muon_momentum < 1.0:
            raise ValueError(f"muon_momentum must be in [0, 1), got {self.muon_momentum}")
        if self.muon_weight_decay < 0:
            raise ValueError(f"muon_weight_decay must be >= 0, got {self.muon_weight_decay}")
        for name in ("warmup_steps", "eval_every", "eval_batches", "save_every", "keep_last"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}


# ---------------------------------------------------------------------------------------- precision
@lru_cache(maxsize=1)
def cpu_bf16_is_fast() -> bool:
    """Whether bf16 matrix products beat fp32 on this CPU (the rule where no model is measured).

    CPUs without bf16 instructions (AVX512-BF16, AMX) emulate it and run ~100× slower than fp32, so the
    flags are checked first; where they are present, a short timing confirms the speed-up.
    """
    if not cpu_has_native_bf16():
        return False
    cpu = torch.device("cpu")
    return time_matmul(cpu, torch.bfloat16, 384) * 1.5 < time_matmul(cpu, torch.float32, 384)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device` (None: plain fp32).

    `auto` without a model to measure (a dry run's memory estimate, a short run): bf16 on GPUs that support
    it, fp16 (with a gradient scaler) on older GPUs, and on CPUs bf16 only where it is native and its
    matrix products are faster, otherwise fp32. The `Trainer` measures `auto` on its model instead
    (`minillm.training.autotune.choose_precision`).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not supported; allowed: {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_bf16_is_fast() else None
    return None


# ---------------------------------------------------------------------------------------- trainer
class Trainer:
    """Optimise `objective` on `model` over `train_data`; see the module docstring for one step."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any = None,
        objective: Objective | None = None,
        config: TrainingConfig | None = None,
        *,
        device: str | torch.device | None = None,
        train_data: Dataset | Iterable | None = None,
        eval_data: Dataset | Iterable | None = None,
        memory: MemoryConfig | None = None,
        **overrides: Any,
    ) -> None:
        unknown = set(overrides) - TrainingConfig.field_names()
        if unknown:
            raise TypeError(f"unknown training option(s): {', '.join(sorted(unknown))}")
        config = replace(config or TrainingConfig(), **overrides)
        if memory is not None:  # the memory options override the training config's
            config = replace(config, batch_size=memory.micro_batch_size or config.batch_size,
                             grad_accum_steps=memory.grad_accum_steps or config.grad_accum_steps,
                             optimizer_offload=memory.optimizer_offload or config.optimizer_offload)
            if memory.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
                model.gradient_checkpointing_enable()
        self.config = config
        self.dist = dist_utils.init_distributed(config.distributed, device)
        self.device = self.dist.device if self.dist.enabled else torch.device(
            device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # with distributed="none" this process trains alone, even inside someone else's process group
        self.world_size = dist_utils.world_size() if self.dist.enabled else 1
        self.is_main = dist_utils.is_main() if self.dist.enabled else True
        self._check_combination(model)
        torch.manual_seed(config.seed)
        model = model.to(self.device)
        self.autotune: dict[str, dict[str, Any]] = {}  # what `auto` chose and the timings behind it
        self.autocast_dtype = self._choose_precision(model, train_data)
        if self._choose_compile(model, train_data):
            model.compile()  # in place: parameter names (and so checkpoints) stay those of the model
        self.base_model = model  # the model itself, for its config, saving and generation
        self.model = dist_utils.wrap_model(model, config.distributed, self.dist)  # what the objective calls
        if self.world_size > 1:  # the ranks start from the same weights but draw different dropout masks
            torch.manual_seed(config.seed + self.dist.rank)
        self.tokenizer = tokenizer
        self.objective = objective or LanguageModelingObjective()
        self.train_loader = self._as_loader(train_data, shuffle=True)
        self.eval_data = eval_data  # batched afresh for each evaluation, so every one scores the same batches
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.autocast_dtype == torch.float16)
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self._param_names: list[str] = []
        self._offload: _OptimizerOffload | None = None
        self.step = 0
        self.tokens_seen = 0
        self.best_val_loss = math.inf
        self.evals_without_improvement = 0
        self.out_dir = Path(config.out_dir) if config.out_dir else None

    def _check_combination(self, model: nn.Module) -> None:
        cfg = self.config
        if cfg.distributed == "fsdp":
            if getattr(model, "lora_config", None) is not None:
                raise ValueError("LoRA with distributed=fsdp is not supported: the adapters are small enough "
                                 "to replicate, use distributed=ddp")
            if cfg.precision == "fp16":
                raise ValueError("precision=fp16 with distributed=fsdp is not supported (its gradient scaler "
                                 "does not handle sharded gradients); use bf16")
            if cfg.optimizer_offload:
                raise ValueError("optimizer_offload with distributed=fsdp is not supported: FSDP already "
                                 "shards the optimizer state; use one or the other")

    # ------------------------------------------------------------------ set-up
    def _probe_run(self, train_data: Dataset | Iterable | None) -> ProbeRun | None:
        cfg = self.config
        return probe_run(train_data, cfg.batch_size, cfg.grad_accum_steps, cfg.max_steps, cfg.epochs)

    def _choose_precision(self, model: nn.Module, train_data: Dataset | Iterable | None) -> torch.dtype | None:
        """The autocast dtype; `precision: auto` is measured on `model` (see autotune.py)."""
        if self.config.precision != "auto":
            return resolve_precision(self.config.precision, self.device)
        decision = choose_precision(model, self.device, self._probe_run(train_data),
                                    distributed=self.world_size > 1)
        if decision.choice is None:  # not measured: the rule
            dtype = resolve_precision("auto", self.device)
            decision.choice = next(name for name, d in DTYPES.items() if d == dtype)
        self.autotune["precision"] = decision.as_dict()
        return DTYPES[decision.choice]

    def _choose_compile(self, model: nn.Module, train_data: Dataset | Iterable | None) -> bool:
        """Whether to torch.compile `model`; `compile: auto` is measured on it (see autotune.py)."""
        if self.config.compile != "auto":
            return bool(self.config.compile)
        decision = choose_compile(model, self.device, self._probe_run(train_data), self.autocast_dtype,
                                  distributed=self.world_size > 1)
        self.autotune["compile"] = decision.as_dict()
        return decision.choice == "compiled"

    def _as_loader(self, data: Dataset | Iterable | None, shuffle: bool) -> Iterable | None:
        """A `BatchLoader` over a dataset: stacked when its items have one length (packed windows),
        padded and length-grouped when it reports per-item `lengths` (conversations, pairs). Under
        torchrun each rank gets its share of every global batch (`batch_size` × ranks items)."""
        if data is None or not isinstance(data, Dataset):
            loader = data  # already batched (a DataLoader, BatchLoader or any iterable of batches)
        elif getattr(data, "lengths", None) is None:
            loader = PretrainDataLoader(data, self.config.batch_size, shuffle=shuffle, seed=self.config.seed)
        else:
            pad_id = getattr(self.tokenizer, "pad_token_id", None) or 0
            loader = BatchLoader(data, self.config.batch_size, pad_collate(pad_id), shuffle=shuffle,
                                 seed=self.config.seed, lengths=data.lengths)
        if loader is not None and self.world_size > 1:
            loader = dist_utils.shard_loader(loader, self.dist)
        return loader

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _setup_optimizer(self, total_steps: int) -> None:
        """The optimizer (see optim.py: AdamW, or Muon on the hidden matrices plus AdamW on the rest; no
        weight decay on norms, biases and embeddings) and the learning-rate schedule."""
        cfg = self.config
        groups = parameter_groups(self.base_model.named_parameters(), cfg.optimizer)
        if not any(named for _, named in groups):
            raise ValueError("the model has no trainable parameter")
        self._param_names = [name for _, named in groups for name, _ in named]
        params = [[p for _, p in named] for _, named in groups]
        # on one CPU process too: torch's fused kernel is several times faster than its for-each loop there
        fused = self.device.type == "cuda" or (adamw_fused_ok(self.device) and self.world_size == 1)
        if cfg.optimizer_offload and _offload_useful(self.device):
            self._offload = _OptimizerOffload(params)
            params, fused = self._offload.master_groups, False
        elif cfg.optimizer_offload:
            logger.info("optimizer_offload has nothing to do when training on the CPU; ignored")
        self.optimizer = build_optimizer(
            [(key, group) for (key, _), group in zip(groups, params)], cfg.optimizer, lr=cfg.lr,
            weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2), muon_lr=cfg.muon_lr,
            muon_momentum=cfg.muon_momentum, muon_weight_decay=cfg.muon_weight_decay, fused=fused)
        warmup = min(cfg.warmup_steps, max(total_steps // 10, 0))
        self.scheduler = make_schedule(self.optimizer, cfg.lr_schedule, warmup, total_steps, cfg.min_lr_ratio,
                                       cfg.decay_fraction)

    def total_steps(self) -> int:
        if self.config.max_steps is not None:
            return self.config.max_steps
        if self.train_loader is None:
            raise ValueError("no training data given")
        return max(1, math.ceil(self.config.epochs * len(self.train_loader) / self.config.grad_accum_steps))

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    # ------------------------------------------------------------------ one optimizer step
    def _optimizer_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Accumulate gradients over `micro_batches` and update once; returns the step's mean loss and metrics.

        The summed loss is divided by the item count of the whole step — over all ranks under torchrun,
        where it is also multiplied by the world size to undo DDP/FSDP's gradient averaging — so any
        split into micro-batches and ranks gives the update of one large batch."""
        self.model.train()
        # a rank's padding batch (torchrun, short last batch) runs forward and backward with zero weight
        weights = [0.0 if b.pop(dist_utils.PADDING_KEY, False) else 1.0 for b in micro_batches]
        items = sum(self.objective.count(b) for b, w in zip(micro_batches, weights) if w)
        if self.world_size > 1:
            items = dist_utils.global_count(items, self.device)
        scale = 1.0 / max(items, 1)
        grad_scale = scale * dist_utils.loss_scale(self.model)
        loss_total = torch.zeros((), device=self.device)
        metric_totals: dict[str, torch.Tensor] = {}
        tokens = 0
        for i, (batch, weight) in enumerate(zip(micro_batches, weights)):
            with dist_utils.grad_sync(self.model, sync=i == len(micro_batches) - 1):
                with self._autocast():
                    out = self.objective(self.model, batch)
                self.scaler.scale(out.loss_sum * (grad_scale * weight)).backward()
            loss_total += out.loss_sum.detach().float() * (scale * weight)
            for name, value in out.metrics.items():
                metric_totals[name] = metric_totals.get(name, 0) + value.detach().float() * (scale * weight)
            tokens += int(_batch_tokens(batch) * weight)
        if self._offload is not None:
            self._offload.gradients_to_master()
        self.scaler.unscale_(self.optimizer)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        max_norm = self.config.grad_clip if self.config.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor, the same on every rank
            grad_norm = grad_norm.full_tensor()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self._offload is not None:
            self._offload.master_to_model()
        self.scheduler.step()
        self.step += 1
        if self.world_size > 1:  # the step's loss and metrics over all ranks (each holds its share)
            names = list(metric_totals)
            packed = torch.stack([loss_total.double(), torch.tensor(float(tokens), device=self.device).double(),
                                  *[torch.as_tensor(metric_totals[n], device=self.device).double() for n in names]])
            packed = dist_utils.all_reduce_sum(packed)
            loss_total, tokens = packed[0].float(), int(packed[1].item())
            metric_totals = dict(zip(names, packed[2:]))
        self.tokens_seen += tokens
        return {"loss": loss_total, "grad_norm": grad_norm.detach(), **metric_totals}

    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Batches forever, epoch after epoch."""
        if self.train_loader is None:
            raise ValueError("no training data given")
        while True:
            empty = True
            for batch in self.train_loader:
                empty = False
                yield self._to_device(batch)
            if empty:
                raise DataError("the training data yields no batch (fewer examples than one batch?)")

    # ------------------------------------------------------------------ public loops
    def train(self) -> dict[str, float]:
        """Train for `max_steps` (or `epochs`), validating and saving as configured; returns the last metrics."""
        cfg = self.config
        total = self.total_steps()
        if self.optimizer is None:
            self._setup_optimizer(total)
        if self.is_main and self.out_dir is not None:
            for path in clean_leftovers(self.out_dir):
                logger.info("removed %s, left by an interrupted save", path)
        metrics_log = MetricsLogger(self.out_dir if self.is_main else None, total, self.step,
                                    cfg.progress and self.is_main, type(self).__name__, echo=self.is_main)
        measured = {k: v for k, v in self.autotune.items() if v.get("source") in ("measured", "cached", "bound")}
        if measured:  # what precision/compile auto chose, with the step timings behind the choice
            metrics_log.log({"step": self.step, "autotune": measured})
        estimate_mfu = mfu_estimator(self.base_model, self.device, self.autocast_dtype)
        memory = MemoryMonitor(self.device)
        batches = self._batches()
        start, window_start, window_tokens, bar_step = time.time(), time.time(), self.tokens_seen, self.step
        result: dict[str, float] = {}
        stop_signal = _StopSignal()
        try:
            while self.step < total:
                stop = stop_signal.received is not None
                if self.world_size > 1:  # every rank must take part, whatever it received
                    stop = dist_utils.any_rank(stop, self.device)
                if stop:
                    self._save_interrupted(metrics_log, stop_signal.received or signal.SIGTERM)
                micro_batches = [next(batches) for _ in range(cfg.grad_accum_steps)]
                seq_len = max(int(v.shape[-1]) for k, v in micro_batches[0].items() if k.endswith("input_ids"))
                stats = self._optimizer_step(micro_batches)
                log_now = self.step % cfg.log_every == 0 or self.step == total
                if log_now:
                    now = time.time()
                    tokens_per_s = (self.tokens_seen - window_tokens) / max(now - window_start, 1e-9)
                    window_start, window_tokens = now, self.tokens_seen
                    record = {"step": self.step, **{k: float(v) for k, v in stats.items()},
                              **self._learning_rates(), "tokens": self.tokens_seen,
                              "tokens_per_s": round(tokens_per_s, 1)}
                    if estimate_mfu is not None:  # tokens/s of all ranks over the peak of all ranks
                        record["mfu"] = round(estimate_mfu(tokens_per_s / self.world_size, seq_len), 5)
                    record.update(self._extra_log())
                    record.update(memory.snapshot())
                    memory.reset_peak()  # each record's peak covers its own log window
                    metrics_log.log(record)
                    result.update(train_loss=record["loss"])
                    metrics_log.update_bar(self.step - bar_step, loss=record["loss"], lr=record["lr"],
                                           tok_s=int(tokens_per_s))
                    bar_step = self.step
                if self.eval_data is not None and cfg.eval_every and self.step % cfg.eval_every == 0 \
                        and self.step < total:
                    result.update(self._validate(metrics_log))
                    if self._should_stop_early():
                        metrics_log.write(f"early stop at step {self.step}: no validation improvement in "
                                          f"{self.evals_without_improvement} evaluations")
                        result["stopped_early"] = True
                        break
                if cfg.save_every and self.step % cfg.save_every == 0 and self.out_dir is not None:
                    self.save(self.out_dir / f"{STEP_PREFIX}{self.step}", with_state=True, full_weights=False)
                    if self.is_main:
                        prune_checkpoints(self.out_dir, cfg.keep_last)
            if self.eval_data is not None and not result.get("stopped_early"):
                result.update(self._validate(metrics_log))
            if self.out_dir is not None:
                self.save(self.out_dir / "final", with_state=True)
                if self.is_main and cfg.save_every:  # a kill between a save and its pruning left one more
                    prune_checkpoints(self.out_dir, cfg.keep_last)
        finally:
            stop_signal.restore()
            metrics_log.close()
        if self.is_main and self.out_dir is not None and (self.out_dir / "metrics.jsonl").is_file():
            try:
                plot_run(self.out_dir)
            except Exception as e:  # plots are a convenience; a finished run never fails over them
                logger.warning("could not plot %s: %s", self.out_dir, e)
        elapsed = time.time() - start
        result.update(steps=self.step, tokens=self.tokens_seen, seconds=round(elapsed, 2))
        if measured:
            result["autotune"] = measured
        if self.best_val_loss < math.inf:
            result["best_val_loss"] = self.best_val_loss
        return result

    def train_epoch(self, dataloader: Iterable | None = None) -> float:
        """One pass over `dataloader` (default: the training data); returns its token-weighted mean loss."""
        loader = self._as_loader(dataloader, shuffle=True) if dataloader is not None else self.train_loader
        if loader is None:
            raise ValueError("no training data given")
        accum = self.config.grad_accum_steps
        if self.optimizer is None:
            self._setup_optimizer(self.config.max_steps or max(1, math.ceil(len(loader) / accum)))
        losses, weights, pending = [], [], []
        for batch in loader:
            pending.append(self._to_device(batch))
            if len(pending) == accum:
                weight = sum(self.objective.count(b) for b in pending if not b.get(dist_utils.PADDING_KEY))
                losses.append(float(self._optimizer_step(pending)["loss"]))
                weights.append(weight)
                pending = []
        if pending:
            weight = sum(self.objective.count(b) for b in pending if not b.get(dist_utils.PADDING_KEY))
            losses.append(float(self._optimizer_step(pending)["loss"]))
            weights.append(weight)
        if not losses:
            raise ValueError("the dataloader yields no batch")
        return sum(loss * w for loss, w in zip(losses, weights)) / max(sum(weights), 1)

    @torch.no_grad()
    def evaluate(self, dataloader: Iterable | None = None, max_batches: int | None = None) -> dict[str, float]:
        """Mean validation loss per item (token) and its perplexity."""
        loader = self._as_loader(dataloader if dataloader is not None else self.eval_data, shuffle=False)
        if loader is None:
            raise ValueError("no validation data given")
        max_batches = self.config.eval_batches if max_batches is None else max_batches
        loss_sum, items = 0.0, 0
        with eval_mode(self.model):
            for i, batch in enumerate(loader):
                if max_batches and i >= max_batches:
                    break
                padding = batch.pop(dist_utils.PADDING_KEY, False)
                batch = self._to_device(batch)
                with self._autocast():
                    loss = float(self.objective(self.model, batch).loss_sum)
                if not padding:
                    loss_sum += loss
                    items += self.objective.count(batch)
        if self.world_size > 1:
            totals = dist_utils.all_reduce_sum(torch.tensor([loss_sum, float(items)], dtype=torch.float64,
                                                            device=self.device))
            loss_sum, items = float(totals[0]), int(totals[1])
        if items == 0:
            raise ValueError("the validation data holds no item to score")
        loss = loss_sum / items
        if getattr(self.objective, "name", None) != "lm":  # perplexity means something for token losses only
            return {"val_loss": loss}
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}

    def _validate(self, metrics_log: MetricsLogger) -> dict[str, float]:
        result = self.evaluate()
        metrics_log.log({"step": self.step, **result})
        message = f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items())
        score = self._selection_score(result)
        if score < self.best_val_loss - self.config.early_stopping_min_delta:
            self.evals_without_improvement = 0
        else:
            self.evals_without_improvement += 1
        if score < self.best_val_loss:
            self.best_val_loss = score
            if self.out_dir is not None:
                self.save(self.out_dir / "best")
                message += " (best, saved)"
        metrics_log.write(message)
        return result

    def _selection_score(self, result: dict[str, float]) -> float:
        """What `best/` and early stopping minimise: the validation loss (RL: minus the mean reward)."""
        return result["val_loss"]

    def _learning_rates(self) -> dict[str, float]:
        """The current rates: `lr` (AdamW's groups) and, with Muon, `muon_lr` (the hidden matrices')."""
        return {("muon_lr" if group.get("use_muon") else "lr"): group["lr"] for group in self.optimizer.param_groups}

    def _extra_log(self) -> dict[str, float]:
        """Values a stage adds to each training log record (RL: the latest rollout's statistics)."""
        return {}

    def _should_stop_early(self) -> bool:
        patience = self.config.early_stopping_patience
        return patience > 0 and self.evals_without_improvement >= patience

    def save(self, directory: str | os.PathLike, with_state: bool = False, full_weights: bool = True) -> Path:
        """Save the model (and tokenizer) as a Hugging Face model directory, atomically; `with_state`
        adds `trainer_state/`, everything `resume` needs to continue the run exactly.

        A LoRA model is saved merged (a plain model that loads anywhere) plus its adapter
        (`adapter_model.safetensors`, `adapter_config.json`); with `full_weights=False` (the rolling
        `step_N/` checkpoints) only the adapter is written. Under torchrun every rank calls this (FSDP
        gathers the shards) and rank 0 writes."""
        distributed = self.world_size > 1
        # collective under FSDP; None off rank 0
        plain = dist_utils.unwrapped_copy(self.model) if distributed else self.base_model
        optimizer_state = rank_rng = None
        if with_state:
            optimizer_state = dist_utils.full_optimizer_state(self.model, self.optimizer, self._param_names)
            rank_rng = dist_utils.all_gather_object(_rng_state()) if distributed else None
        directory = Path(directory)
        if plain is not None:
            model, write_files, weights = plain, None, True
            if getattr(plain, "lora_config", None) is not None:
                def write_files(d: Path) -> None:
                    save_lora(plain, d)
                if full_weights:
                    model = merge_lora(copy.deepcopy(plain))
                else:
                    weights = False
            write_state = None
            if with_state:
                def write_state(d: Path) -> None:
                    self._write_state(d, optimizer_state, rank_rng)
            save_checkpoint(directory, model, self.tokenizer,
                            extra_files={"training_config.json": asdict(self.config)},
                            write_state=write_state, write_files=write_files, weights=weights)
        if distributed:
            dist_utils.barrier()
        return directory

    def _save_interrupted(self, metrics_log: MetricsLogger, signum: int) -> None:
        if self.out_dir is not None:
            directory = self.save(self.out_dir / f"{STEP_PREFIX}{self.step}", with_state=True,
                                  full_weights=False)
            metrics_log.write(f"{signal.Signals(signum).name} at step {self.step}: saved {directory}; "
                              "continue with --resume")
        raise TrainingInterrupted(signum, self.step)

    # ------------------------------------------------------------------ exact resume
    def _write_state(self, directory: Path, optimizer_state: dict[str, Any],
                     rank_rng: list[dict[str, Any]] | None) -> None:
        """`optimizer_state` is the unsharded one (`full_optimizer_state`); `rank_rng` every rank's RNG
        states under torchrun (rank 0's are also stored at the top level)."""
        torch.save(optimizer_state, directory / "optimizer.pt")
        if hasattr(self.train_loader, "tensor_state"):  # data held as tensors (an RL rollout buffer)
            torch.save(self.train_loader.tensor_state(), directory / "loader.pt")
        tensors = {"scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                   "torch_rng": torch.get_rng_state(),
                   "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        if rank_rng is not None:
            tensors["rank_torch_rng"] = [r["torch"] for r in rank_rng]
            tensors["rank_cuda_rng"] = [r["cuda"] for r in rank_rng]
        torch.save(tensors, directory / "state.pt")
        mine = _rng_state()
        lora = getattr(self.base_model, "lora_config", None)
        atomic_write_json(directory / "state.json", {
            "step": self.step, "tokens_seen": self.tokens_seen,
            "best_val_loss": None if math.isinf(self.best_val_loss) else self.best_val_loss,
            "evals_without_improvement": self.evals_without_improvement,
            "world_size": self.world_size,
            "loader": self.train_loader.state_dict() if hasattr(self.train_loader, "state_dict") else None,
            "training_config": asdict(self.config),
            "model_config": self.base_model.config.to_dict() if hasattr(self.base_model, "config") else None,
            "lora_config": asdict(lora) if lora is not None else None,
            "data": self._data_signature(),
            "python_rng": mine["python"], "numpy_rng": mine["numpy"],
            "rank_rng": [{"python": r["python"], "numpy": r["numpy"]} for r in rank_rng] if rank_rng else None,
        })

    def _data_signature(self) -> dict[str, int] | None:
        dataset = getattr(self.train_loader, "dataset", None)
        if dataset is None:
            return None
        signature = {"items": len(dataset)}
        if hasattr(dataset, "num_tokens"):
            signature["tokens"] = int(dataset.num_tokens())
        return signature

    def resume(self, directory: str | os.PathLike) -> None:
        """Continue from a checkpoint saved with training state: weights, optimizer, schedule, gradient
        scaler, step, every RNG and the data position, so the run goes on exactly as if never stopped.

        Changes that would make it a different run (the model's shape, the data, the batch size, the
        seed) are refused; harmless ones (more steps, another log or eval interval) are allowed."""
        directory = Path(directory)
        state_dir = directory / STATE_DIR
        if not (state_dir / "state.json").is_file():
            raise FileNotFoundError(f"{directory}: no {STATE_DIR}/ to resume from (was it saved by a run?)")
        state = read_json_object(state_dir / "state.json")
        try:
            self._load_state(directory, state)
        except (KeyError, IndexError, TypeError) as e:  # a state file of another shape or a damaged one
            raise CheckpointError(f"{state_dir}: training state is incomplete or malformed "
                                  f"({type(e).__name__}: {e})") from e
        logger.info("resumed from %s at step %d", directory, self.step)

    def _load_state(self, directory: Path, state: dict[str, Any]) -> None:
        state_dir = directory / STATE_DIR
        self._check_resumable(state, directory)
        if getattr(self.base_model, "lora_config", None) is not None:
            adapter = directory / ADAPTER_WEIGHTS_FILE
            if not adapter.is_file():
                raise ResumeError(f"cannot resume a LoRA run from {directory}: no {ADAPTER_WEIGHTS_FILE}")
            load_lora_state_dict(self.base_model, load_file(str(adapter), device=str(self.device)))
        elif dist_utils.is_fsdp(self.model):
            dist_utils.load_full_state_dict(self.model, load_file(str(directory / WEIGHTS_FILE)))
        else:
            self.base_model.load_weights(directory)
        self._setup_optimizer(self.total_steps())
        optimizer_state = load_state_file(state_dir / "optimizer.pt")
        dist_utils.load_full_optimizer_state(self.model, self.optimizer, optimizer_state, self._param_names)
        tensors = load_state_file(state_dir / "state.pt")
        self.scheduler.load_state_dict(tensors["scheduler"])
        self.scaler.load_state_dict(tensors["scaler"])
        rank = self.dist.rank if self.world_size > 1 else 0
        if rank == 0:
            rng = {"torch": tensors["torch_rng"], "cuda": tensors["cuda_rng"],
                   "python": state["python_rng"], "numpy": state["numpy_rng"]}
        else:
            rng = {"torch": tensors["rank_torch_rng"][rank], "cuda": tensors["rank_cuda_rng"][rank],
                   **state["rank_rng"][rank]}
        _set_rng_state(rng)
        if state["loader"] is not None and hasattr(self.train_loader, "load_state_dict"):
            self.train_loader.load_state_dict(state["loader"])
        if hasattr(self.train_loader, "load_tensor_state") and (state_dir / "loader.pt").is_file():
            self.train_loader.load_tensor_state(load_state_file(state_dir / "loader.pt"))
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.best_val_loss = math.inf if state["best_val_loss"] is None else state["best_val_loss"]
        self.evals_without_improvement = state.get("evals_without_improvement", 0)

    def _check_resumable(self, state: dict[str, Any], directory: Path) -> None:
        saved_world = state.get("world_size", 1)
        if saved_world != self.world_size:
            raise ResumeError(f"cannot resume from {directory}: it was trained by {saved_world} process(es), "
                              f"this run has {self.world_size} (the global batch would change); "
                              f"relaunch with torchrun --nproc_per_node={saved_world}")
        lora = getattr(self.base_model, "lora_config", None)
        now_lora = asdict(lora) if lora is not None else None
        if state.get("lora_config") is not None:
            state["lora_config"]["target_modules"] = tuple(state["lora_config"]["target_modules"])
        if state.get("lora_config") != now_lora:
            raise ResumeError(f"cannot resume from {directory}: the LoRA settings changed "
                              f"(saved {state.get('lora_config')}, now {now_lora})")
        saved_model = state.get("model_config")
        if saved_model is not None and hasattr(self.base_model, "config"):
            now = self.base_model.config.to_dict()
            changed = sorted(k for k in set(now) | set(saved_model)
                             if k not in _HARMLESS_MODEL_FIELDS and now.get(k) != saved_model.get(k))
            if changed:
                raise ResumeError(f"cannot resume from {directory}: the model changed ({', '.join(changed)})")
        if state.get("data") is not None and state["data"] != self._data_signature():
            raise ResumeError(f"cannot resume from {directory}: the training data changed "
                             f"(saved {state['data']}, now {self._data_signature()})")
        saved = state["training_config"]
        defaults = TrainingConfig()  # a checkpoint older than a field ran with its default
        saved = {k: saved.get(k, getattr(defaults, k)) for k in _RUN_DEFINING_FIELDS}
        changed = [k for k in _RUN_DEFINING_FIELDS if saved[k] != getattr(self.config, k)]
        if changed:
            raise ResumeError(f"cannot resume from {directory}: {', '.join(changed)} changed "
                             f"({', '.join(f'{k}: {saved.get(k)} -> {getattr(self.config, k)}' for k in changed)})")


# Resuming with another batch size or seed would see other batches: a different run, so it is refused.
_RUN_DEFINING_FIELDS = ("batch_size", "grad_accum_steps", "seed", "optimizer")
_HARMLESS_MODEL_FIELDS = ("gradient_checkpointing", "extra")


class ResumeError(MiniLLMError, ValueError):
    """A checkpoint that cannot continue this run; the message says what changed."""


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped training; a checkpoint with training state was saved first."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(f"{signal.Signals(signum).name} at step {step}")
        self.signum, self.step = signum, step


class _StopSignal:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps, so a step is never cut in half;
    a second SIGINT stops at once."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _batch_tokens(batch: dict[str, Any]) -> int:
    """Tokens a batch feeds the model: every `*input_ids` tensor (a preference pair has two)."""
    return sum(int(v.numel()) for k, v in batch.items() if k.endswith("input_ids") and torch.is_tensor(v))


def _rng_state() -> dict[str, Any]:
    """This process's RNG states: torch (CPU and CUDA) as tensors, Python's and NumPy's as JSON lists."""
    numpy_rng = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": _jsonable(random.getstate()),
            "numpy": [numpy_rng[0], numpy_rng[1].tolist(), *numpy_rng[2:]]}


def _set_rng_state(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    random.setstate(_tupled(rng["python"]))
    name, keys, *rest = rng["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))


def _offload_useful(device: torch.device) -> bool:
    """Whether moving the optimizer state to the host saves anything (not when training on the host)."""
    return device.type != "cpu"


class _OptimizerOffload:
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


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tupled(value: Any) -> Any:
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value


class PreTrainer(Trainer):
    """`Trainer` with the next-token language-modelling objective."""

    def __init__(self, model: nn.Module, tokenizer: Any = None, config: TrainingConfig | None = None,
                 **kwargs: Any) -> None:
        super().__init__(model, tokenizer, LanguageModelingObjective(), config, **kwargs)


class SFTTrainer(Trainer):
    """`Trainer` with the language-modelling objective on conversations: the labels of a
    `ConversationDataset` are -100 everywhere but the assistant replies, so only those are learned."""

    def __init__(self, model: nn.Module, tokenizer: Any = None, config: TrainingConfig | None = None,
                 **kwargs: Any) -> None:
        super().__init__(model, tokenizer, LanguageModelingObjective(), config, **kwargs)


class DPOTrainer(Trainer):
    """`Trainer` with the DPO objective on a `PreferenceDataset` (see `DPOObjective`).

    The reference is the policy as it starts: a frozen copy (`ref_model`, default a deep copy of
    `model`), or, with `precompute_ref_logps=True`, its log-probabilities computed once over the
    training and validation pairs before the first step, so no second model stays in memory.
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None, config: TrainingConfig | None = None, *,
                 ref_model: nn.Module | None = None, beta: float = 0.1, loss_type: str = "sigmoid",
                 label_smoothing: float = 0.0, rpo_alpha: float = 0.0, precompute_ref_logps: bool = False,
                 **kwargs: Any) -> None:
        if precompute_ref_logps and ref_model is not None:
            raise ValueError("give either ref_model or precompute_ref_logps=True, not both")
        reference = None if precompute_ref_logps else (ref_model or copy.deepcopy(model))
        super().__init__(model, tokenizer, DPOObjective(reference, beta, loss_type, label_smoothing, rpo_alpha),
                         config, **kwargs)
        if reference is not None:
            reference.to(self.device)
        if precompute_ref_logps:
            for data in (self.train_loader.dataset if self.train_loader is not None else None, self.eval_data):
                if data is not None:
                    self._precompute_reference(data)

    @torch.no_grad()
    def _precompute_reference(self, dataset: Dataset) -> None:
        """Store the starting policy's log-probabilities in every item of `dataset` (a PreferenceDataset)."""
        items = getattr(dataset, "items", None)
        if items is None:
            raise TypeError("precompute_ref_logps needs a PreferenceDataset (its items get the reference "
                            "log-probabilities)")
        pad_id = getattr(self.tokenizer, "pad_token_id", None) or 0
        collate = pad_collate(pad_id)
        objective: DPOObjective = self.objective  # type: ignore[assignment]
        with eval_mode(self.base_model):
            for start in range(0, len(items), self.config.batch_size):
                chunk = items[start:start + self.config.batch_size]
                batch = self._to_device(collate([{k: v for k, v in item.items() if not k.startswith("ref_")}
                                                 for item in chunk]))
                with self._autocast():
                    chosen, rejected = objective.logps(self.base_model, batch)
                for item, c, r in zip(chunk, chosen.float().cpu(), rejected.float().cpu()):
                    item["ref_chosen_logps"], item["ref_rejected_logps"] = c, r


class RewardTrainer(Trainer):
    """`Trainer` with the Bradley–Terry objective (`RewardObjective`) on a `PreferenceDataset`; the model is
    a `minillm.model.heads.MiniGPTRewardModel`."""

    def __init__(self, model: nn.Module, tokenizer: Any = None, config: TrainingConfig | None = None, *,
                 margin: float = 0.0, center_coefficient: float = 0.0, **kwargs: Any) -> None:
        if not hasattr(model, "rewards"):
            raise TypeError("RewardTrainer needs a reward model (minillm.model.heads.MiniGPTRewardModel, e.g. "
                            "MiniGPTRewardModel.from_base(sft_checkpoint))")
        distributed = kwargs.get("distributed", config.distributed if config is not None else "none")
        if distributed not in ("none", None):
            raise ValueError("reward model training under torchrun (distributed=ddp|fsdp) is not supported yet: "
                             "the reward head runs outside the wrapped forward; train it in one process")
        super().__init__(model, tokenizer, RewardObjective(margin, center_coefficient), config, **kwargs)

