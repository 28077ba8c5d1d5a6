"""Is `precision: auto` + `compile: auto` ever much slower than the best fixed choice? A check on this machine.

For the model and micro-batch shape of each shipped pretraining config (default: pretrain_tiny and
pretrain_micro), this script lets the trainer's autotuner decide (`choose_precision`, `choose_compile`;
timed, and with an empty cache unless `--keep-cache`, so the measurement's own cost is counted), then
times every fixed choice (fp32 / bf16 × eager / compiled) in interleaved rounds on copies of the same
model and prints, per config, the ms per optimizer step, the compile time and the estimated run time
(compile + max_steps × step) of each, auto's pick with its cost (its pick's run time plus the time spent
deciding), and auto / best.

    .venv/bin/python benchmarks/autotune_check.py                      # both configs, ~5-10 min on 2 cores
    .venv/bin/python benchmarks/autotune_check.py --config pretrain_tiny --rounds 5 --no-compile
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

from minillm.model import MiniGPT, MiniGPTConfig
from minillm.training import autotune
from minillm.training.autotune import DTYPES, ProbeRun, StepProbe, choose_compile, choose_precision

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def config_run(name: str) -> tuple[str, ProbeRun, int]:
    """(preset, run shape and length, vocabulary) of configs/<name>.yaml."""
    config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text(encoding="utf-8"))
    run = ProbeRun(config["training"]["batch_size"], config["data"]["max_length"], config["max_steps"])
    return config["model"]["preset"], run, config["tokenizer"]["vocab_size"]


def check(name: str, rounds: int, compiled: bool) -> list[str]:
    preset, run, vocab = config_run(name)
    torch.manual_seed(0)
    model = MiniGPT(MiniGPTConfig.from_preset(preset, vocab_size=vocab))
    start = time.perf_counter()
    precision = choose_precision(model, "cpu", run)
    dtype = DTYPES[precision.choice] if precision.choice else None
    compile_choice = choose_compile(model, "cpu", run, dtype)
    deciding_s = time.perf_counter() - start
    auto = (precision.choice or "fp32", compile_choice.choice == "compiled")

    probe = StepProbe(model, torch.device("cpu"), run.batch_size, run.seq_len)
    variants = [(p, c) for p in ("fp32", "bf16") for c in ((False, True) if compiled else (False,))
                if p == "fp32" or autotune.cpu_has_native_bf16()]
    compile_s: dict[tuple[str, bool], float] = {}
    for variant in variants:
        probe.add(str(variant), DTYPES[variant[0]], compiled=variant[1])
        warmup = [probe.time(str(variant)) for _ in range(autotune.COMPILE_WARMUP_STEPS)]
        compile_s[variant] = sum(warmup) if variant[1] else 0.0
    times: dict[tuple[str, bool], list[float]] = {v: [] for v in variants}
    for _ in range(rounds):
        for variant in variants:
            times[variant].append(probe.time(str(variant)))
    step_s = {v: statistics.median(t) for v, t in times.items()}
    for v in variants:  # the warm-up steps ran too: what they took beyond steady steps is compiling
        compile_s[v] = max(compile_s[v] - autotune.COMPILE_WARMUP_STEPS * step_s[v], 0.0) if v[1] else 0.0
    run_s = {v: compile_s[v] + run.total_steps * step_s[v] for v in variants}
    best = min(run_s, key=run_s.get)
    auto_s = run_s[auto] + deciding_s

    lines = [f"{name}: {preset}, {run.batch_size}x{run.seq_len} tokens per step, {run.total_steps} steps, "
             f"{torch.get_num_threads()} threads; auto chose {auto[0]} {'compiled' if auto[1] else 'eager'} "
             f"in {deciding_s:.1f} s ({precision.source}/{compile_choice.source})",
             f"  {'choice':<16}{'ms/step':>10}{'compile s':>11}{'run s':>9}"]
    for v in variants:
        mark = " <- auto" if v == auto else ""
        lines.append(f"  {v[0] + (' compiled' if v[1] else ' eager'):<16}{step_s[v] * 1e3:>10.1f}"
                     f"{compile_s[v]:>11.1f}{run_s[v]:>9.1f}{mark}")
    lines.append(f"  auto (its pick + {deciding_s:.1f} s deciding): {auto_s:.1f} s; best fixed: "
                 f"{best[0]} {'compiled' if best[1] else 'eager'} {run_s[best]:.1f} s; auto / best = "
                 f"{auto_s / run_s[best]:.3f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", help="config name, repeatable (default: tiny and micro)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default: 5)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled variants")
    parser.add_argument("--keep-cache", action="store_true",
                        help="use the autotune cache as it is (default: an empty one, so deciding is timed)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.keep_cache:
        os.environ["MINILLM_CACHE_DIR"] = tempfile.mkdtemp(prefix="autotune-check-")
    for name in args.config or ["pretrain_tiny", "pretrain_micro"]:
        print("\n".join(check(name, args.rounds, not args.no_compile)), flush=True)


if __name__ == "__main__":
    main()
