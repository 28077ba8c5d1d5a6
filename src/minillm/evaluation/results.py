"""One shape for every evaluation result: a dataclass that turns into JSON (`to_dict`) and into a readable
table (`format`), and helpers that print and save a list of them."""

from __future__ import annotations

import dataclasses
import math
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from minillm.io import atomic_write_json


class EvalResult:
    """Base of the result dataclasses. `task` names the evaluation; `summary` gives the headline numbers
    (the rows of the table); `details` may add more tables (per subject, a confusion matrix)."""

    task: ClassVar[str]
    source: str  # where the data came from (a path, "builtin", "N texts")

    def summary(self) -> dict[str, Any]:
        raise NotImplementedError

    def details(self) -> str:
        return ""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values: the task, the headline numbers, then every field of the dataclass."""
        return {"task": self.task, "summary": self.summary(), **dataclasses.asdict(self)}

    def format(self) -> str:
        lines = [f"## {self.task}" + (f" ({self.source})" if self.source else ""), "",
                 markdown_table(["metric", "value"], [[k, v] for k, v in self.summary().items()])]
        details = self.details()
        return "\n".join(lines + (["", details] if details else []))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def format_value(value: Any) -> str:
    """Numbers as people read them: integers whole, fractions to four places, large floats to two."""
    if not _is_number(value) or isinstance(value, int) or not math.isfinite(value):
        return str(value)
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def _display_width(text: str) -> int:
    """Terminal columns: wide (CJK) characters take two."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def one_line(text: str, limit: int = 60) -> str:
    """`text` fit for a table cell: whitespace runs (newlines included) as one space, cut to `limit`
    terminal columns."""
    flat = " ".join(text.split())
    if _display_width(flat) <= limit:
        return flat
    flat = flat[:limit - 1]  # a character takes at least one column
    while _display_width(flat) > limit - 1:
        flat = flat[:-1]
    return flat + "…"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table padded into aligned columns (wide CJK characters counted as two), so that it reads
    as well in a terminal as rendered; columns of numbers are right-aligned, the others left-aligned."""
    cells = [[str(h) for h in headers]] + [[format_value(v).replace("|", "\\|") for v in row] for row in rows]
    widths = [max(_display_width(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [bool(rows) and all(_is_number(row[i]) for row in rows) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        padding = [" " * (w - _display_width(c)) for c, w in zip(row, widths)]
        return "| " + " | ".join(pad + c if right else c + pad
                                 for c, pad, right in zip(row, padding, numeric)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if right else (":" + "-" * (w + 1))
                          for w, right in zip(widths, numeric)) + "|"
    return "\n".join([line(cells[0]), rule] + [line(row) for row in cells[1:]])


def format_results(results: Sequence[EvalResult]) -> str:
    """Every result's tables, one section each."""
    return "\n\n".join(result.format() for result in results)


def save_results(path: str | Path, results: Sequence[EvalResult], **metadata: Any) -> Path:
    """Write `{**metadata, "results": [result.to_dict(), ...]}` as JSON (atomically)."""
    path = Path(path)
    atomic_write_json(path, {**metadata, "results": [result.to_dict() for result in results]})
    return path
