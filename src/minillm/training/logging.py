"""What a run shows and records: a progress bar (loss, tokens/s, ETA), `metrics.jsonl` and TensorBoard scalars.

Every record is one JSON line in `<out_dir>/metrics.jsonl`; its numeric fields also go to TensorBoard
(`<out_dir>/tensorboard/`) under the tags that `tensorboard_tag` gives: `val_loss` → `val/loss`,
`loss` → `train/loss`, `tokens_per_s` → `train/tokens_per_s`, at the record's `step`.
Plots of a finished run come from `minillm.training.plots.plot_run`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from minillm.io import atomic_write_text

log = logging.getLogger("minillm.training")

# Fields that are not series of their own: the x axis and the wall clock.
_NOT_SCALARS = frozenset({"step", "time"})
_warned_no_tensorboard = False


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
                        "Install it with `pip install tensorboard`.", e)
        return None
    # On resume, hide whatever an interrupted earlier run logged after the checkpoint it resumed from.
    purge_step = initial_step + 1 if initial_step > 0 else None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step, flush_secs=30)


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
    already logged), writes the numeric fields to TensorBoard and drives the progress bar."""

    def __init__(self, out_dir: str | Path | None, total_steps: int, initial_step: int = 0,
                 progress: bool = True, description: str = "train", tensorboard: bool = True,
                 echo: bool = True) -> None:
        self.echo = echo  # False on torchrun ranks other than 0: only rank 0 speaks
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.path = self.out_dir / "metrics.jsonl" if self.out_dir is not None else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _drop_records_after(self.path, initial_step)
        self._file = open(self.path, "a", encoding="utf-8") if self.path is not None else None
        self.tensorboard_dir = self.out_dir / "tensorboard" if self.out_dir is not None and tensorboard else None
        self._tb = _open_summary_writer(self.tensorboard_dir, initial_step) \
            if self.tensorboard_dir is not None else None
        self.bar = tqdm(total=total_steps, initial=initial_step, desc=description, dynamic_ncols=True,
                        disable=not progress, file=sys.stderr, unit="step")
        self.start_time = time.time()

    def log(self, record: dict[str, Any]) -> None:
        record = {"time": round(time.time() - self.start_time, 3), **record}
        if self._file is not None:
            self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._file.flush()
        if self._tb is not None:
            step = record.get("step")
            step = int(step) if isinstance(step, (int, float)) and not isinstance(step, bool) else None
            for key, value in record.items():
                if key in _NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                self._tb.add_scalar(tensorboard_tag(key), float(value), global_step=step)

    def update_bar(self, steps: int, **postfix: Any) -> None:
        self.bar.update(steps)
        if postfix:
            self.bar.set_postfix({k: _short(v) for k, v in postfix.items()}, refresh=False)

    def write(self, message: str) -> None:
        """A line above the progress bar (validation results, saves)."""
        if self.echo:
            self.bar.write(message, file=sys.stderr)

    def close(self) -> None:
        """Close the bar and files (TensorBoard flushed). Does not plot: see `minillm.training.plots`."""
        self.bar.close()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3g}"
    return str(value)
