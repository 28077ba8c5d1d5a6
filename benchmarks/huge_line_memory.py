"""Peak memory of `minillm train` on a corpus holding one huge single-line document.

Writes a temporary corpus directory with a small ordinary text file (built-in stories, one per line)
and one file of `--mb` megabytes on a single line (random Chinese and ASCII words, nearly all of them
unique, no line break at all; `--layout jsonl`: the same text as the one record of a JSONL file), then
runs

    minillm train --config pretrain_tiny --data DIR --max-steps 2 --out-dir OUT

in a child process, with a fresh tokenizer cache so that the tokenizer is trained on that data, and
prints its peak resident memory: `ru_maxrss` of the waited-for child and its descendants (the largest
single process, what `/usr/bin/time -v` reports) and the peak of their sum (sampled from /proc every
0.1 s: token shards of a large corpus are written by worker processes), and its wall time. Run it from
the repository root:

    .venv/bin/python benchmarks/huge_line_memory.py                  # the 50 MB line
    .venv/bin/python benchmarks/huge_line_memory.py --mb 10          # quicker
    .venv/bin/python benchmarks/huge_line_memory.py --layout jsonl   # one 50 MB JSONL record
    .venv/bin/python benchmarks/huge_line_memory.py --json           # one JSON line, for scripts

Measured on a 2-core machine, 50 MB line: about 650 MB peak RSS (1.35 GB summed over the process and
its two forked tokenizing workers, whose shared pages count twice; 1.7 GB with --layout jsonl), about
20 s. Before the tokenizer's training texts were capped and cut into pieces, a 10 MB line took 1.1 GB
and a 20 MB line 2.6 GB (the largest process), growing faster than the text.

Exit status: the child's (non-zero when the run failed; its last output lines are printed).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _random_words(rng: np.random.Generator, count: int) -> str:
    """`count` random words, each followed by a space or now and then a punctuation mark: half are
    runs of 1-4 random CJK characters, half random lower-case ASCII words of 2-9 letters. Nearly every
    word is unique, the hardest case for tokenizer training."""
    cjk = rng.random(count) < 0.5
    lengths = np.where(cjk, rng.integers(1, 5, count), rng.integers(2, 10, count))
    owner = np.repeat(np.arange(count), lengths)
    chars = np.where(cjk[owner], rng.integers(0x4E00, 0x9FA6, owner.size), rng.integers(97, 123, owner.size))
    separators = np.array([ord(" ")] * 12 + [ord("，"), ord("。"), ord(","), ord(".")])
    ends = np.cumsum(lengths)
    chars = np.insert(chars, ends, separators[rng.integers(0, separators.size, count)])
    return chars.astype(np.uint32).tobytes().decode("utf-32-le")


def write_huge_line(path: Path, megabytes: float, seed: int = 0) -> int:
    """Write about `megabytes` MB of random Chinese and ASCII words without a single line break;
    returns the size in bytes."""
    rng = np.random.default_rng(seed)
    target = int(megabytes * 1_000_000)
    written = 0
    with open(path, "wb") as f:
        while written < target:
            data = _random_words(rng, 100_000).encode("utf-8")[: target - written]
            data = data.decode("utf-8", errors="ignore").encode("utf-8")  # never end inside a character
            f.write(data)
            written += len(data)
    return written


def write_corpus(directory: Path, megabytes: float, layout: str = "txt") -> dict[str, int]:
    """The benchmark corpus: `small.txt` (ordinary lines) and the huge line, as `huge.txt` or, with
    `layout="jsonl"`, as the one record of `huge.jsonl` (`{"text": ...}`)."""
    from minillm.data.builtin import builtin_corpus

    directory.mkdir(parents=True, exist_ok=True)
    small = directory / "small.txt"
    small.write_text("\n".join(d.replace("\n", " ") for d in builtin_corpus(2000, seed=3)) + "\n", encoding="utf-8")
    huge = directory / "huge.txt"
    huge_bytes = write_huge_line(huge, megabytes)
    if layout == "jsonl":
        text = huge.read_text(encoding="utf-8")
        huge.unlink()
        (directory / "huge.jsonl").write_text(json.dumps({"text": text}, ensure_ascii=False) + "\n", encoding="utf-8")
        del text
    return {"small_bytes": small.stat().st_size, "huge_bytes": huge_bytes}


def _tree_rss_kb(root: int) -> int:
    """Resident memory (kB) of process `root` and all its descendants, from /proc (0 where unreadable)."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status", encoding="utf-8") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        parents[int(entry)] = int(fields.get("PPid", "0").strip() or 0)
        rss[int(entry)] = int(fields.get("VmRSS", "0 kB").split()[0])
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier += children
    return sum(rss.get(pid, 0) for pid in tree)


def run_train(data_dir: Path, out_dir: Path, cache_dir: Path, max_steps: int) -> dict[str, object]:
    """Run the train command in a child process: its peak RSS (MB; the largest single process of the
    child and its descendants), the peak of their sum (sampled every 0.1 s), wall time and exit status."""
    command = [sys.executable, "-m", "minillm", "train", "--config", "pretrain_tiny", "--data", str(data_dir),
               "--max-steps", str(max_steps), "--out-dir", str(out_dir), "training.progress=false"]
    env = {**os.environ, "MINILLM_CACHE_DIR": str(cache_dir)}
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as output:
        proc = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, text=True)
        tree_peak = 0
        while proc.poll() is None:
            if os.path.isdir("/proc"):
                tree_peak = max(tree_peak, _tree_rss_kb(proc.pid))
            time.sleep(0.1)
        wall = time.perf_counter() - start
        output.seek(0)
        tail = output.read()[-3000:]
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # kilobytes on Linux
    return {"returncode": proc.returncode, "peak_rss_mb": round(peak_kb / 1024, 1),
            "peak_tree_rss_mb": round(tree_peak / 1024, 1), "wall_s": round(wall, 1), "output_tail": tail}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=50.0, help="size of the single-line file in MB (default 50)")
    parser.add_argument("--layout", choices=("txt", "jsonl"), default="txt",
                        help="the huge line as a text file (default) or as one JSONL record")
    parser.add_argument("--max-steps", type=int, default=2)
    parser.add_argument("--keep", help="write the corpus and the run here and keep them (default: a temp dir)")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args(argv)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="minillm-huge-line-"))
    try:
        sizes = write_corpus(root / "corpus", args.mb, args.layout)
        result = {**sizes, **run_train(root / "corpus", root / "run", root / "cache", args.max_steps)}
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    tail = result.pop("output_tail")
    if args.json:
        print(json.dumps(result))
    else:
        print(f"corpus: small.txt {sizes['small_bytes'] / 1e6:.2f} MB + huge.{args.layout} "
              f"{sizes['huge_bytes'] / 1e6:.1f} MB on one line")
        print(f"minillm train: exit {result['returncode']}, peak RSS {result['peak_rss_mb']:.0f} MB (largest "
              f"process), {result['peak_tree_rss_mb']:.0f} MB (all its processes together, sampled), "
              f"wall {result['wall_s']:.1f} s")
    if result["returncode"] != 0:
        print(tail, file=sys.stderr)
    return int(result["returncode"] != 0)


if __name__ == "__main__":
    sys.exit(main())
