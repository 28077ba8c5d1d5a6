"""What a run shows and records: a progress bar (loss, tokens/s, ETA), `metrics.jsonl` and the trackers of
`training.report_to` (TensorBoard by default; also Weights & Biases, SwanLab and Trackio).

Every record is one JSON line in `<out_dir>/metrics.jsonl`; its numeric fields (all but `step` and `time`)
also go to each tracker at the record's `step`. TensorBoard (`<out_dir>/tensorboard/`) files them under
the tags that `tensorboard_tag` gives: `val_loss` → `val/loss`, `loss` → `train/loss`, `tokens_per_s` →
`train/tokens_per_s`; the other trackers under the record's own keys (`loss`, `val_loss`, …).
Plots of a finished run come from `minillm.training.plots.plot_run`.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from minillm.errors import MiniLLMError
from minillm.io import atomic_write_text

log = logging.getLogger("minillm.training")

# Fields that are not series of their own: the x axis and the wall clock.
_NOT_SCALARS = frozenset({"step", "time"})
_warned_no_tensorboard = False

# The trackers `training.report_to` may name, and the module each one imports (only when named).
TRACKERS = ("tensorboard", "wandb", "swanlab", "trackio")
_TRACKER_MODULES = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb", "swanlab": "swanlab",
                    "trackio": "trackio"}
PROJECT = "minillm"  # the project name the trackers file runs under


class TrackerUnavailableError(MiniLLMError, ValueError):
    """`training.report_to` names a tracker whose package is not installed."""


def normalize_report_to(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """`training.report_to` as a tuple of tracker names: a list, one name, `a,b`, or none (`none`, `[]`,
    null). Raises ValueError naming an unknown tracker and the allowed ones."""
    if value is None:
        return ()
    names = value.split(",") if isinstance(value, str) else list(value)
    result: list[str] = []
    for name in names:
        if not isinstance(name, str):
            raise ValueError(f"report_to={value!r}: tracker names are strings, got {name!r}")
        name = name.strip().lower()
        if name in ("", "none"):
            continue
        if name not in TRACKERS:
            raise ValueError(f"report_to={value!r}: unknown tracker {name!r}; allowed: {', '.join(TRACKERS)} "
                             "(or none)")
        if name not in result:
            result.append(name)
    return tuple(result)


def _import_tracker(name: str) -> Any:
    """The tracker's library; TrackerUnavailableError when it is not installed."""
    try:
        return importlib.import_module(_TRACKER_MODULES[name])
    except ImportError as e:
        raise TrackerUnavailableError(
            f"training.report_to includes {name!r} but the {name} package is not installed: "
            f"pip install 'mini-llm[trackers]' ({e})") from None


def check_trackers(report_to: Iterable[str]) -> None:
    """Fail now, before any training, when a named tracker's library is missing. TensorBoard, the
    default, only warns when its run starts (metrics.jsonl is written either way)."""
    for name in normalize_report_to(report_to):
        if name != "tensorboard":
            _import_tracker(name)


def run_hyperparameters(out_dir: str | Path | None, training: Any, model: Any = None) -> dict[str, Any]:
    """What the trackers store as the run's config: the run config that `minillm train` wrote to
    `<out_dir>/config.yaml` (when there is one), with the trainer's own `training` options and the
    model's config in place of its `training` and `model` sections."""
    config: dict[str, Any] = {}
    path = Path(out_dir) / "config.yaml" if out_dir is not None else None
    if path is not None and path.is_file():
        import yaml

        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            loaded = None
        if isinstance(loaded, dict):
            config.update(loaded)
    config["training"] = asdict(training) if is_dataclass(training) else dict(training or {})
    model_config = getattr(model, "config", None)
    if hasattr(model_config, "to_dict"):
        config["model"] = model_config.to_dict()
    return config


def tensorboard_tag(field: str) -> str:
    """The TensorBoard tag for a record field: `val_*` under `val/`, everything else under `train/`."""
    if field.startswith("val_"):
        return "val/" + field[len("val_"):]
    if field.startswith("eval_"):
        return "val/" + field[len("eval_"):]
    return "train/" + field


def _open_summary_writer(log_dir: Path, initial_step: int) -> Any | None:
    """A TensorBoard SummaryWriter, or None (with one warning per process) where tensorboard is missing."""
    global _warned_no_tensorboard
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        if not _warned_no_tensorboard:
            _warned_no_tensorboard = True
            log.warning("TensorBoard logging is off (%s); metrics go to metrics.jsonl only. "
                        "Install it with `pip install 'mini-llm[trackers]'`.", e)
        return None
    # On resume, hide whatever an interrupted earlier run logged after the checkpoint it resumed from.
    purge_step = initial_step + 1 if initial_step > 0 else None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step, flush_secs=30)


# ---------------------------------------------------------------------------------------- trackers
# Each tracker: created only when named in `report_to` (importing its library only then), `log(metrics,
# step)` with a record's numeric fields under the record's keys, `close()` at the end of the run.
class TensorBoardTracker:
    """Scalars in `<out_dir>/tensorboard/` under `tensorboard_tag`'s tags; nothing where tensorboard is
    missing (one warning per process)."""

    def __init__(self, log_dir: Path, initial_step: int = 0) -> None:
        self.log_dir = log_dir
        self._writer = _open_summary_writer(log_dir, initial_step)

    def log(self, metrics: dict[str, float], step: int | None) -> None:
        if self._writer is not None:
            for key, value in metrics.items():
                self._writer.add_scalar(tensorboard_tag(key), float(value), global_step=step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None


class _RunTracker:
    """A tracker whose library starts a run with `init(project=, name=, config=)` and logs to it with
    `run.log(metrics, step=)`: the project and run names may be overridden by the library's own
    environment variables (`project_env`, `name_env`)."""

    library = project_env = name_env = ""

    def __init__(self, run_name: str | None, config: dict[str, Any] | None) -> None:
        module = _import_tracker(self.library)
        self._run = module.init(project=os.environ.get(self.project_env) or PROJECT,
                                name=os.environ.get(self.name_env) or run_name, config=config)

    def log(self, metrics: dict[str, float], step: int | None) -> None:
        self._run.log(metrics, step=step)

    def close(self) -> None:
        self._run.finish()


class WandbTracker(_RunTracker):
    """A Weights & Biases run; `WANDB_MODE=offline` keeps it on disk (under `WANDB_DIR`, default ./wandb),
    `WANDB_PROJECT` and `WANDB_NAME` override the project and run names."""

    library, project_env, name_env = "wandb", "WANDB_PROJECT", "WANDB_NAME"


class SwanLabTracker(_RunTracker):
    """A SwanLab run; `SWANLAB_MODE=offline` (or `local`) keeps it on disk under `SWANLAB_LOG_DIR`
    (default ./swanlog), `SWANLAB_PROJ_NAME` and `SWANLAB_EXP_NAME` override the project and run names."""

    library, project_env, name_env = "swanlab", "SWANLAB_PROJ_NAME", "SWANLAB_EXP_NAME"


class TrackioTracker:
    """A Trackio run, local by default: a SQLite database per project under `TRACKIO_DIR` (default
    `$HF_HOME/trackio`); `trackio show --project minillm` opens its dashboard."""

    def __init__(self, run_name: str | None, config: dict[str, Any] | None) -> None:
        self._trackio = _import_tracker("trackio")
        self._run = self._trackio.init(project=PROJECT, name=run_name, config=config)

    def log(self, metrics: dict[str, float], step: int | None) -> None:
        self._run.log(metrics, step=step)

    def close(self) -> None:
        self._trackio.finish()


_TRACKER_CLASSES = {"wandb": WandbTracker, "swanlab": SwanLabTracker, "trackio": TrackioTracker}


def _scalars(record: dict[str, Any]) -> tuple[dict[str, int | float], int | None]:
    """A record's numeric fields (not `step` or `time`) under its own keys, and its step."""
    step = record.get("step")
    step = int(step) if isinstance(step, (int, float)) and not isinstance(step, bool) else None
    metrics = {key: value for key, value in record.items()
               if key not in _NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool)}
    return metrics, step


def _drop_records_after(path: Path, step: int) -> None:
    """Keep only the records of steps up to `step` in an existing metrics file: a run resumed from step N
    logs steps after N again, and a fresh run (step 0) into a used directory starts a new curve."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = []
    for line in lines:
        try:
            record_step = json.loads(line).get("step", 0)
        except (json.JSONDecodeError, AttributeError):
            continue  # a line cut by a crash
        if isinstance(record_step, (int, float)) and record_step <= step:
            kept.append(line)
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(line + "\n" for line in kept))


class MetricsLogger:
    """Appends one JSON object per line to `metrics.jsonl` (flushed per record, so a crash loses nothing
    already logged), writes the numeric fields to the trackers of `report_to` and drives the progress bar.

    `report_to` (default: TensorBoard, unless `tensorboard=False`) names the trackers; the trainer passes
    none on torchrun ranks other than 0. TensorBoard needs `out_dir`; the others are named
    `out_dir`'s name and store `run_config` as the run's hyperparameters."""

    def __init__(self, out_dir: str | Path | None, total_steps: int, initial_step: int = 0,
                 progress: bool = True, description: str = "train", tensorboard: bool = True,
                 echo: bool = True, report_to: Sequence[str] | None = None,
                 run_config: dict[str, Any] | None = None) -> None:
        self.echo = echo  # False on torchrun ranks other than 0: only rank 0 speaks
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.path = self.out_dir / "metrics.jsonl" if self.out_dir is not None else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _drop_records_after(self.path, initial_step)
        self._file = open(self.path, "a", encoding="utf-8") if self.path is not None else None
        names = normalize_report_to(("tensorboard",) if report_to is None else report_to)
        if not tensorboard:
            names = tuple(n for n in names if n != "tensorboard")
        self.tensorboard_dir = self.out_dir / "tensorboard" \
            if self.out_dir is not None and "tensorboard" in names else None
        self.trackers: dict[str, Any] = {}
        try:
            for name in names:
                if name == "tensorboard":
                    if self.tensorboard_dir is not None:
                        self.trackers[name] = TensorBoardTracker(self.tensorboard_dir, initial_step)
                else:
                    run_name = self.out_dir.resolve().name if self.out_dir is not None else None
                    self.trackers[name] = _TRACKER_CLASSES[name](run_name, run_config)
        except BaseException:  # a tracker that cannot start: close what did, then report the first failure
            with contextlib.suppress(Exception):
                self._close_trackers()
            if self._file is not None:
                self._file.close()
            raise
        self.bar = tqdm(total=total_steps, initial=initial_step, desc=description, dynamic_ncols=True,
                        disable=not progress, file=sys.stderr, unit="step")
        self.start_time = time.time()

    def log(self, record: dict[str, Any]) -> None:
        record = {"time": round(time.time() - self.start_time, 3), **record}
        if self._file is not None:
            self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._file.flush()
        if self.trackers:
            metrics, step = _scalars(record)
            if metrics:
                for tracker in self.trackers.values():
                    tracker.log(dict(metrics), step)

    def update_bar(self, steps: int, **postfix: Any) -> None:
        self.bar.update(steps)
        if postfix:
            self.bar.set_postfix({k: _short(v) for k, v in postfix.items()}, refresh=False)

    def write(self, message: str) -> None:
        """A line above the progress bar (validation results, saves)."""
        if self.echo:
            self.bar.write(message, file=sys.stderr)

    def close(self) -> None:
        """Close the bar, files and trackers (each flushed). Does not plot: see `minillm.training.plots`."""
        self.bar.close()
        if self._file is not None:
            self._file.close()
            self._file = None
        self._close_trackers()

    def _close_trackers(self) -> None:
        """Close every tracker, even when one fails (the first failure is raised after)."""
        trackers, self.trackers = self.trackers, {}
        error: BaseException | None = None
        for tracker in trackers.values():
            try:
                tracker.close()
            except Exception as e:  # the others still get closed
                error = error or e
        if error is not None:
            raise error


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3g}"
    return str(value)
