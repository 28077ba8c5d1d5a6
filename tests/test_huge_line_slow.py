"""`minillm train` on a corpus with a 50 MB single-line document, the tokenizer trained on that data,
stays under 2 GB of peak resident memory (slow: about half a minute on a 2-core CPU). The measurement
is benchmarks/huge_line_memory.py, run in a child process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "huge_line_memory.py"


@pytest.mark.parametrize("layout", ["txt", "jsonl"])
def test_a_50_mb_line_trains_in_under_2_gb(layout):
    proc = subprocess.run([sys.executable, str(BENCHMARK), "--mb", "50", "--layout", layout, "--json"],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["huge_bytes"] >= 50_000_000
    assert result["peak_rss_mb"] < 2048, result
