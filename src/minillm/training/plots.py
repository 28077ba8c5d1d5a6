"""Plots of a run from its `metrics.jsonl`: `plots/loss.png`, `plots/lr.png`, `plots/throughput.png`.

    from minillm.training.plots import plot_run
    plot_run("runs/pretrain_tiny")        # -> [Path('runs/pretrain_tiny/plots/loss.png'), ...]

Rendered off-screen with matplotlib's Agg canvas (no display needed, pyplot's global state untouched);
each file is written to a temporary name and renamed, so a reader never sees half a PNG.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from minillm.extras import require

log = logging.getLogger("minillm.training")

Series = tuple[list[float], list[float]]


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; unreadable lines (a run killed mid-write) are skipped with a warning."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path} (a run directory holds metrics.jsonl once training "
                                "has logged a step)")
    records, bad = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(record, dict):
                records.append(record)
    if bad:
        log.warning("%s: skipped %d unreadable line(s)", path, bad)
    if not records:
        raise ValueError(f"{path} holds no metrics records; nothing to plot")
    return records


def series(records: list[dict[str, Any]], field: str) -> Series:
    """(steps, values) of `field` over the records that have it and a step.

    A resumed run appends to the same file, so steps can go back: the later records replace the earlier
    ones from that step on.
    """
    steps: list[float] = []
    values: list[float] = []
    for record in records:
        step, value = record.get("step"), record.get(field)
        if not _is_number(step) or not _is_number(value):
            continue
        while steps and steps[-1] >= step:
            steps.pop()
            values.pop()
        steps.append(float(step))
        values.append(float(value))
    return steps, values


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write the run's plots under `<run_dir>/plots/` and return their paths (a plot with no data is skipped)."""
    Figure = require("matplotlib.figure", "plots", "plotting").Figure  # imported only when plotting

    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    out_dir = run_dir / "plots"
    written: list[Path] = []

    def save(fig: Figure, name: str) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / name
        tmp = out_dir / f".{name}.{os.getpid()}.tmp"
        try:
            fig.savefig(tmp, format="png", dpi=120)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        written.append(path)

    train_loss, val_loss = series(records, "loss"), series(records, "val_loss")
    if train_loss[0] or val_loss[0]:
        fig = Figure(figsize=(7, 4.5), layout="constrained")
        ax = fig.add_subplot()
        if train_loss[0]:
            ax.plot(*train_loss, label="train loss", linewidth=1.2)
        if val_loss[0]:
            ax.plot(*val_loss, label="validation loss", marker="o", markersize=3, linewidth=1.5)
        ax.set(xlabel="step", ylabel="loss", title="Loss")
        ax.grid(alpha=0.3)
        ax.legend()
        save(fig, "loss.png")

    lr, muon_lr = series(records, "lr"), series(records, "muon_lr")
    if lr[0]:
        fig = Figure(figsize=(7, 3.5), layout="constrained")
        ax = fig.add_subplot()
        ax.plot(*lr, color="tab:green", linewidth=1.2, label="AdamW (lr)")
        if muon_lr[0]:  # Muon's rate on the hidden matrices: several times AdamW's, so a log axis shows both
            ax.plot(*muon_lr, color="tab:purple", linewidth=1.2, label="Muon (muon_lr)")
            ax.set_yscale("log")
            ax.legend()
        else:
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        ax.set(xlabel="step", ylabel="learning rate", title="Learning rate")
        ax.grid(alpha=0.3)
        save(fig, "lr.png")

    throughput, mfu = series(records, "tokens_per_s"), series(records, "mfu")
    if throughput[0] or mfu[0]:
        fig = Figure(figsize=(7, 3.5), layout="constrained")
        ax = fig.add_subplot()
        ax.set(xlabel="step", title="Throughput")
        ax.grid(alpha=0.3)
        handles = []
        if throughput[0]:
            handles += ax.plot(*throughput, color="tab:blue", linewidth=1.2, label="tokens/s")
            ax.set_ylabel("tokens/s")
        if mfu[0]:
            mfu_ax = ax.twinx() if throughput[0] else ax
            handles += mfu_ax.plot(mfu[0], [100 * v for v in mfu[1]], color="tab:orange", linewidth=1.2,
                                   label="MFU (%)")
            mfu_ax.set_ylabel("MFU (%)")
        if len(handles) > 1:
            ax.legend(handles=handles, loc="lower right")
        save(fig, "throughput.png")

    return written


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


if __name__ == "__main__":  # python -m minillm.training.plots RUN_DIR
    import sys

    for written_path in plot_run(sys.argv[1] if len(sys.argv) > 1 else "."):
        print(written_path)
