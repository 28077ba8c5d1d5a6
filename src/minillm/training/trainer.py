"""The one training loop. Every stage is this `Trainer` with another objective (see objectives.py and
stages.py).

A step: take `grad_accum_steps` micro-batches, sum each one's loss, divide by the item count of the
whole step (so accumulation equals one large batch), backpropagate, clip, step AdamW and the
warmup-cosine schedule. Validation runs every `eval_every` steps; the best model by validation loss is
kept in `best/`, the last in `final/`.

Beside it: precision.py (what `precision` and `compile` mean, `auto` included), state.py (the
checkpoint's training state, for an exact resume), offload.py (optimizer state on the host) and
signals.py (SIGINT/SIGTERM: save, then stop).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import signal
import time
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, fields, replace
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from minillm.data.formats import DataError
from minillm.data.loader import BatchLoader, pad_collate
from minillm.data.pretrain import LanguageModelingDataset, PretrainDataLoader
from minillm.device import resolve_device
from minillm.extras import MissingExtraError
from minillm.model.lora import merge_lora, save_lora
from minillm.model.transformer import eval_mode
from minillm.training import distributed as dist_utils
from minillm.training.autotune import adamw_fused_ok, probe_run
from minillm.training.checkpoint import STEP_PREFIX, clean_leftovers, prune_checkpoints, save_checkpoint
from minillm.training.logging import MetricsLogger, check_trackers, normalize_report_to, run_hyperparameters
from minillm.training.memory import MemoryConfig, MemoryMonitor
from minillm.training.mfu import mfu_estimator
from minillm.training.objectives import LanguageModelingObjective, Objective
from minillm.training.offload import OptimizerOffload, offload_useful
from minillm.training.optim import OPTIMIZERS, build_optimizer, parameter_groups
from minillm.training.plots import plot_run
from minillm.training.precision import (
    PRECISIONS,
    autocast,
    choose_autocast_dtype,
    choose_compiled,
    cpu_bf16_is_fast,
    resolve_precision,
)
from minillm.training.schedule import SCHEDULES, make_schedule
from minillm.training.signals import StopSignal, TrainingInterrupted
from minillm.training.state import ResumeError, load_training_state, rng_state, write_training_state

# The names the original API imported from here stay importable from here.
__all__ = ["LanguageModelingDataset", "PreTrainer", "ResumeError", "SFTTrainer", "Trainer", "TrainingConfig",
           "TrainingInterrupted", "cpu_bf16_is_fast", "resolve_precision"]

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
    # where metrics go besides metrics.jsonl: any of tensorboard, wandb, swanlab, trackio; [] or none: nowhere
    report_to: str | tuple[str, ...] | list[str] = ("tensorboard",)

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
        self.report_to = normalize_report_to(self.report_to)
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
            # ours and transformers' models can; a model that cannot trains without it, as before
            if memory.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
                model.gradient_checkpointing_enable()
        self.config = config
        check_trackers(config.report_to)  # a named tracker's missing library fails here, before training
        self.dist = dist_utils.init_distributed(config.distributed, device)
        self.device = self.dist.device if self.dist.enabled else resolve_device(device)
        # with distributed="none" this process trains alone, even inside someone else's process group
        self.world_size = dist_utils.world_size() if self.dist.enabled else 1
        self.is_main = dist_utils.is_main() if self.dist.enabled else True
        self._check_combination(model)
        torch.manual_seed(config.seed)
        model = model.to(self.device)
        # `auto` times a few steps of this model on the run's batch shape (see precision.py, autotune.py)
        self.autotune: dict[str, dict[str, Any]] = {}  # what `auto` chose and the timings behind it
        run = probe_run(train_data, config.batch_size, config.grad_accum_steps, config.max_steps,
                        config.epochs) if "auto" in (config.precision, config.compile) else None
        self.autocast_dtype, decision = choose_autocast_dtype(config.precision, model, self.device, run,
                                                              distributed=self.world_size > 1)
        if decision is not None:
            self.autotune["precision"] = decision
        compiled, decision = choose_compiled(config.compile, model, self.device, run, self.autocast_dtype,
                                             distributed=self.world_size > 1)
        if decision is not None:
            self.autotune["compile"] = decision
        if compiled:
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
        self._offload: OptimizerOffload | None = None
        self.step = 0
        self.tokens_seen = 0
        self.best_val_loss = math.inf
        self.evals_without_improvement = 0
        self.out_dir = Path(config.out_dir) if config.out_dir else None

    def _check_combination(self, model: nn.Module) -> None:
        cfg = self.config
        if cfg.distributed == "fsdp":
            if getattr(model, "lora_config", None) is not None:  # set by apply_lora
                raise ValueError("LoRA with distributed=fsdp is not supported: the adapters are small enough "
                                 "to replicate, use distributed=ddp")
            if cfg.precision == "fp16":
                raise ValueError("precision=fp16 with distributed=fsdp is not supported (its gradient scaler "
                                 "does not handle sharded gradients); use bf16")
            if cfg.optimizer_offload:
                raise ValueError("optimizer_offload with distributed=fsdp is not supported: FSDP already "
                                 "shards the optimizer state; use one or the other")

    # ------------------------------------------------------------------ set-up
    def _as_loader(self, data: Dataset | Iterable | None, shuffle: bool) -> Iterable | None:
        """A `BatchLoader` over a dataset: stacked when its items have one length (packed windows),
        padded and length-grouped when it reports per-item `lengths` (conversations, pairs). Under
        torchrun each rank gets its share of every global batch (`batch_size` × ranks items)."""
        if data is None or not isinstance(data, Dataset):
            loader = data  # already batched (a DataLoader, BatchLoader or any iterable of batches)
        elif getattr(data, "lengths", None) is None:  # the dataset contract: variable-length items say so
            loader = PretrainDataLoader(data, self.config.batch_size, shuffle=shuffle, seed=self.config.seed)
        else:
            loader = BatchLoader(data, self.config.batch_size, pad_collate(self._pad_id()), shuffle=shuffle,
                                 seed=self.config.seed, lengths=data.lengths)
        if loader is not None and self.world_size > 1:
            loader = dist_utils.shard_loader(loader, self.dist)
        return loader

    def _pad_id(self) -> int:
        """The padding id of variable-length batches; without a tokenizer (training on ids) 0."""
        return getattr(self.tokenizer, "pad_token_id", None) or 0

    def _autocast(self) -> AbstractContextManager:
        return autocast(self.device, self.autocast_dtype)

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
        if cfg.optimizer_offload and offload_useful(self.device):
            self._offload = OptimizerOffload(params)
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
        # FSDP: torch returns a DTensor (it has `full_tensor`), the same on every rank
        if hasattr(grad_norm, "full_tensor"):
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
                                    cfg.progress and self.is_main, type(self).__name__, echo=self.is_main,
                                    report_to=cfg.report_to if self.is_main else (),
                                    run_config=run_hyperparameters(self.out_dir, cfg, self.base_model))
        measured = {k: v for k, v in self.autotune.items() if v.get("source") in ("measured", "cached", "bound")}
        if measured:  # what precision/compile auto chose, with the step timings behind the choice
            metrics_log.log({"step": self.step, "autotune": measured})
        estimate_mfu = mfu_estimator(self.base_model, self.device, self.autocast_dtype)
        memory = MemoryMonitor(self.device)
        batches = self._batches()
        start, window_start, window_tokens, bar_step = time.time(), time.time(), self.tokens_seen, self.step
        result: dict[str, float] = {}
        stop_signal = StopSignal()
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
            except MissingExtraError as e:  # a lean install: metrics.jsonl is all there is
                logger.info("no plots for %s: %s", self.out_dir, e)
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
        """One pass over `dataloader` (default: the training data) with `train`'s optimizer step, but no
        logging, validation or saving; returns its mean loss per item (token). A last group shorter than
        `grad_accum_steps` is a step of its own."""
        loader = self._as_loader(dataloader, shuffle=True) if dataloader is not None else self.train_loader
        if loader is None:
            raise ValueError("no training data given")
        accum = self.config.grad_accum_steps
        if self.optimizer is None:
            self._setup_optimizer(self.config.max_steps or max(1, math.ceil(len(loader) / accum)))
        loss_sum, items, steps = 0.0, 0, 0
        batches = iter(loader)
        while micro_batches := [self._to_device(b) for b in islice(batches, accum)]:
            step_items = sum(self.objective.count(b) for b in micro_batches if not b.get(dist_utils.PADDING_KEY))
            loss_sum += float(self._optimizer_step(micro_batches)["loss"]) * step_items
            items, steps = items + step_items, steps + 1
        if steps == 0:
            raise ValueError("the dataloader yields no batch")
        return loss_sum / max(items, 1)

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
        if not self.objective.reports_perplexity:
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

    def _learning_rates(self) -> dict[str, float]:
        """The current rates: `lr` (AdamW's groups) and, with Muon, `muon_lr` (the hidden matrices')."""
        return {("muon_lr" if group.get("use_muon") else "lr"): group["lr"] for group in self.optimizer.param_groups}

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
            rank_rng = dist_utils.all_gather_object(rng_state()) if distributed else None
        directory = Path(directory)
        if plain is not None:
            model, write_files, weights = plain, None, True
            if getattr(plain, "lora_config", None) is not None:  # set by apply_lora
                def write_files(d: Path) -> None:
                    save_lora(plain, d)
                if full_weights:
                    model = merge_lora(copy.deepcopy(plain))
                else:
                    weights = False
            write_state = None
            if with_state:
                def write_state(d: Path) -> None:
                    write_training_state(self, d, optimizer_state, rank_rng)
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

    def resume(self, directory: str | os.PathLike) -> None:
        """Continue from a checkpoint saved with training state: weights, optimizer, schedule, gradient
        scaler, step, every RNG and the data position, so the run goes on exactly as if never stopped.

        Changes that would make it a different run (the model's shape, the data, the batch size, the
        seed) are refused; harmless ones (more steps, another log or eval interval) are allowed."""
        load_training_state(self, Path(directory))
        logger.info("resumed from %s at step %d", directory, self.step)

    # ------------------------------------------------------------------ what a stage overrides
    def _extra_log(self) -> dict[str, float]:
        """Values a stage adds to each training log record (RL: the latest rollout's statistics)."""
        return {}

    def _selection_score(self, result: dict[str, float]) -> float:
        """What `best/` and early stopping minimise: the validation loss (RL: minus the mean reward)."""
        return result["val_loss"]

    def _loader_tensors(self) -> dict[str, torch.Tensor] | None:
        """Training data held as tensors, saved with the training state (RL: the rollout buffer)."""
        return None

    def _load_loader_tensors(self, tensors: dict[str, torch.Tensor] | None) -> None:
        """Restore what `_loader_tensors` saved."""


def _batch_tokens(batch: dict[str, Any]) -> int:
    """Tokens a batch feeds the model: every `*input_ids` tensor (a preference pair has two)."""
    return sum(int(v.numel()) for k, v in batch.items() if k.endswith("input_ids") and torch.is_tensor(v))


# ---------------------------------------------------------------------------------------- the LM stages
class PreTrainer(Trainer):
    """`Trainer` with the next-token language-modelling objective."""

    def __init__(self, model: nn.Module, tokenizer: Any = None, config: TrainingConfig | None = None,
                 **kwargs: Any) -> None:
        super().__init__(model, tokenizer, LanguageModelingObjective(), config, **kwargs)


class SFTTrainer(PreTrainer):
    """`PreTrainer` on conversations: the labels of a `ConversationDataset` are -100 everywhere but the
    assistant replies, so only those are learned."""
