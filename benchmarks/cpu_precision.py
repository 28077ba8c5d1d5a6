"""Training throughput in fp32 vs bf16 autocast on this machine, side by side in one run.

`precision: auto` uses bf16 on a CPU only when `cpu_bf16_is_fast()` says so; this script shows the
numbers behind that choice (and whether the loss curves agree).

    .venv/bin/python benchmarks/cpu_precision.py --preset micro --steps 20
"""

from __future__ import annotations

import argparse
import time

import torch

from minillm.model import MiniGPT, MiniGPTConfig
from minillm.training.trainer import cpu_bf16_is_fast


def matmul_gflops(dtype: torch.dtype, n: int = 1024, repeats: int = 10) -> float:
    a = torch.randn(n, n).to(dtype)
    a @ a
    start = time.perf_counter()
    for _ in range(repeats):
        a @ a
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def train_tokens_per_s(preset: str, dtype: torch.dtype | None, steps: int, batch: int, seq: int,
                       vocab: int) -> tuple[float, float]:
    torch.manual_seed(0)
    model = MiniGPT(MiniGPTConfig.from_preset(preset, vocab_size=vocab))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.randint(0, vocab, (steps + 2, batch, seq))
    times, loss = [], None
    for i in range(steps + 2):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = model(data[i], labels=data[i]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    step = sorted(times[2:])[len(times[2:]) // 2]  # median after two warm-up steps
    return batch * seq / step, float(loss.detach())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="micro")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=2048)
    args = parser.parse_args()
    print(f"threads: {torch.get_num_threads()}; cpu_bf16_is_fast(): {cpu_bf16_is_fast()}")
    for dtype in (torch.float32, torch.bfloat16):
        print(f"matmul 1024² {str(dtype):15s} {matmul_gflops(dtype):7.1f} GFLOP/s")
    results = {}
    for name, dtype in (("fp32", None), ("bf16 autocast", torch.bfloat16)):
        results[name] = train_tokens_per_s(args.preset, dtype, args.steps, args.batch, args.seq, args.vocab)
        print(f"train {args.preset} {name:14s} {results[name][0]:8.0f} tokens/s  (loss after "
              f"{args.steps + 2} steps {results[name][1]:.3f})")
    print(f"bf16 / fp32 throughput: {results['bf16 autocast'][0] / results['fp32'][0]:.2f}x")


if __name__ == "__main__":
    main()
