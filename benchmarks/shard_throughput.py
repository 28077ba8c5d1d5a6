"""Token-shard writing throughput (MB/s) and peak memory, 1 core vs 2 cores, JSONL vs one big .txt.

Builds a corpus of about `--mb` megabytes by cycling the built-in corpus (or the documents of
`--corpus PATH`) into a temporary JSONL file (one `{"text"}` per line) and a temporary single .txt file
(the same documents joined by newlines: one huge document), trains a 4096-token `BPETokenizer` on a
sample, then runs `tokenize_corpus` once per configuration in a fresh child process, so that the
thread settings (RAYON_NUM_THREADS, read once by the Rust library) take effect and the peak RSS
(`resource.getrusage().ru_maxrss`) belongs to that configuration alone. Configurations:

    1-thread    RAYON_NUM_THREADS=1, workers=0: one core
    2-threads   RAYON_NUM_THREADS=2, workers=0: the Rust encoder's own threads
    2-procs     workers=2: two worker processes with one encoder thread each
    auto        what `tokenize_corpus` picks by itself (`auto_workers`), no thread settings

Run it from the repository root on a quiet machine (`uptime` load < 1.5; the numbers are only as good
as the idle cores):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/shard_throughput.py              # ~100 MB, ~3 minutes
    .venv/bin/python benchmarks/shard_throughput.py --mb 20 --inputs jsonl         # quicker
    .venv/bin/python benchmarks/shard_throughput.py --corpus data/corpus.jsonl --configs 1-thread 2-procs

Columns: MB/s of UTF-8 input; "cores busy" = CPU time / wall time of the child and its workers
(2.0 = both cores of a 2-core machine busy; idle Rust threads spin for a while, so busy is not always
useful); peak RSS of the child, of its largest worker process, and the child's RSS after imports and
loading the tokenizer (torch is most of it), before any data was read.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _child(args: argparse.Namespace) -> None:
    """One measurement: tokenize `args.input` into shards and print a JSON line of results."""
    from minillm.data import pretrain
    from minillm.tokenizer import BPETokenizer

    tokenizer = BPETokenizer.from_pretrained(args.tokenizer)
    tokenizer.encode("warm-up 热身")
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kwargs = {}
    if "workers" in inspect.signature(pretrain.tokenize_corpus).parameters:
        kwargs["workers"] = None if args.workers < 0 else args.workers
    before = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    shards = pretrain.tokenize_corpus(args.input, tokenizer, args.out, **kwargs)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = sum(a.ru_utime + a.ru_stime - b.ru_utime - b.ru_stime for a, b in zip(after, before))
    print(json.dumps({
        "seconds": wall, "bytes": Path(args.input).stat().st_size, "tokens": len(shards), "cpu": cpu,
        "peak_rss_mb": after[0].ru_maxrss / 1024, "worker_peak_rss_mb": after[1].ru_maxrss / 1024,
        "base_rss_mb": base_rss,
    }))


# name → (RAYON_NUM_THREADS or None, tokenize_corpus workers or -1 for its default)
CONFIGS = {"1-thread": ("1", 0), "2-threads": ("2", 0), "2-procs": (None, 2), "auto": (None, -1)}


def _documents(corpus: str | None):
    if corpus is None:
        from minillm.data.builtin import builtin_corpus

        return builtin_corpus(20_000, seed=1)
    from minillm.data import pretrain

    return [d for d in pretrain.iter_documents(corpus) if d.strip()]


def build_corpus(directory: Path, megabytes: float, corpus: str | None) -> tuple[Path, Path, list[str]]:
    """A JSONL file and a single .txt file of about `megabytes` MB each, cycling the source documents."""
    docs = _documents(corpus)
    if not docs:
        raise SystemExit(f"{corpus}: no documents")
    target = int(megabytes * 1e6)
    jsonl, txt = directory / "corpus.jsonl", directory / "corpus.txt"
    written = 0
    with open(jsonl, "w", encoding="utf-8") as fj, open(txt, "w", encoding="utf-8") as ft:
        for doc in itertools.cycle(docs):
            line = json.dumps({"text": doc}, ensure_ascii=False) + "\n"
            fj.write(line)
            ft.write(doc + "\n")
            written += len(doc.encode("utf-8")) + 1
            if written >= target:
                break
    return jsonl, txt, docs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=100.0, help="corpus size in MB (default 100)")
    parser.add_argument("--corpus", help="documents to cycle instead of the built-in corpus")
    parser.add_argument("--inputs", nargs="+", default=["jsonl", "txt"], choices=["jsonl", "txt"])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=1, help="runs per configuration (the best is kept)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return

    from minillm.tokenizer import BPETokenizer

    print(f"load average: {os.getloadavg()[0]:.2f}  cores: {os.cpu_count()}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="shard-bench-"))
    try:
        start = time.perf_counter()
        jsonl, txt, docs = build_corpus(tmp, args.mb, args.corpus)
        tokenizer = BPETokenizer(vocab_size=4096)
        tokenizer.train(docs[:20_000])
        tokenizer.save_pretrained(tmp / "tokenizer")
        print(f"corpus: {jsonl.stat().st_size / 1e6:.1f} MB JSONL, {txt.stat().st_size / 1e6:.1f} MB .txt; "
              f"tokenizer {len(tokenizer)} tokens ({time.perf_counter() - start:.0f} s)", flush=True)
        rows = []
        for kind, config in itertools.product(args.inputs, args.configs):
            threads, workers = CONFIGS[config]
            env = {k: v for k, v in os.environ.items() if k not in ("RAYON_NUM_THREADS", "TOKENIZERS_PARALLELISM")}
            env["OMP_NUM_THREADS"] = "1"
            if threads is not None:
                env["RAYON_NUM_THREADS"] = threads
            best = None
            for _ in range(args.repeats):
                shutil.rmtree(tmp / "shards", ignore_errors=True)
                proc = subprocess.run(
                    [sys.executable, __file__, "--child", "--input", str(jsonl if kind == "jsonl" else txt),
                     "--tokenizer", str(tmp / "tokenizer"), "--out", str(tmp / "shards"),
                     "--workers", str(workers)],
                    env=env, capture_output=True, text=True, check=False)
                if proc.returncode:
                    raise SystemExit(f"child failed ({kind}, {config}):\n{proc.stderr}")
                result = json.loads(proc.stdout.strip().splitlines()[-1])
                if best is None or result["seconds"] < best["seconds"]:
                    best = result
            rows.append((kind, config, best))
            print(f"  {kind} {config}: {best['bytes'] / 1e6 / best['seconds']:.2f} MB/s", flush=True)
        print()
        header = (f"{'input':<6} {'config':<10} {'MB/s':>6} {'Mtok/s':>6} {'cores busy':>10} "
                  f"{'peak RSS MB':>11} {'worker MB':>9} {'base MB':>7}")
        print(header)
        print("-" * len(header))
        for kind, config, r in rows:
            worker_mb = f"{r['worker_peak_rss_mb']:.0f}" if r["worker_peak_rss_mb"] > 0 else "-"
            print(f"{kind:<6} {config:<10} {r['bytes'] / 1e6 / r['seconds']:>6.2f} "
                  f"{r['tokens'] / 1e6 / r['seconds']:>6.2f} {r['cpu'] / r['seconds']:>10.2f} "
                  f"{r['peak_rss_mb']:>11.0f} {worker_mb:>9} {r['base_rss_mb']:>7.0f}")
        print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
