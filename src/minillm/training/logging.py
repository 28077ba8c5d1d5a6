"""What a run shows and records: a progress bar (loss, tokens/s, ETA) and `metrics.jsonl`."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


class MetricsLogger:
    """Appends one JSON object per line to `metrics.jsonl` (flushed per record, so a crash loses nothing
    already logged) and drives the progress bar."""

    def __init__(self, out_dir: str | Path | None, total_steps: int, initial_step: int = 0,
                 progress: bool = True, description: str = "train") -> None:
        self.path = Path(out_dir) / "metrics.jsonl" if out_dir is not None else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8") if self.path is not None else None
        self.bar = tqdm(total=total_steps, initial=initial_step, desc=description, dynamic_ncols=True,
                        disable=not progress, file=sys.stderr, unit="step")
        self.start_time = time.time()

    def log(self, record: dict[str, Any]) -> None:
        record = {"time": round(time.time() - self.start_time, 3), **record}
        if self._file is not None:
            self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._file.flush()

    def update_bar(self, steps: int, **postfix: Any) -> None:
        self.bar.update(steps)
        if postfix:
            self.bar.set_postfix({k: _short(v) for k, v in postfix.items()}, refresh=False)

    def write(self, message: str) -> None:
        """A line above the progress bar (validation results, saves)."""
        self.bar.write(message, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
        if self._file is not None:
            self._file.close()
            self._file = None


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3g}"
    return str(value)
