"""Benchmarks: `performance` measures training and generation speed against transformers (`minillm bench`);
`race` times our training recipe against the plain one to the same validation loss (`minillm bench race`)."""

from __future__ import annotations

from typing import Any

from minillm.io import atomic_write_json


def report(table: str, result: dict[str, Any], out: str | None) -> int:
    """Print a benchmark's table, write its full result as JSON to `out` when given; the exit status."""
    print(table)
    if out is not None:
        atomic_write_json(out, result)
        print(f"wrote {out}")
    return 0
