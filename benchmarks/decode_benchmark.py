"""Greedy decoding speed: our `TextGenerator` against transformers' `LlamaForCausalLM.generate` on the
same weights (converted with `minillm.model.hf.to_transformers`), in one process.

For each batch size, a random fp32 model of `--preset` decodes `--new-tokens` tokens after a random
`--prompt-len`-token prompt, greedily and with no stop token, so both sides do exactly the same work
(the script checks that their outputs are identical). Runs are interleaved (ours, theirs, ours,
theirs, ...) after warm-up runs, so a neighbour's load on a shared machine hits both alike, and the
median of `--repeats` is reported. Prefill (one forward over the prompt, filling a KV cache) is timed
separately in the same way; "decode ms/token" is (generate - prefill) / (new tokens - 1), since the
prefill already yields the first new token.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/decode_benchmark.py --threads 2
    .venv/bin/python benchmarks/decode_benchmark.py --preset micro --batch-sizes 1 4 --repeats 3 --out d.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from minillm.inference import GenerationConfig, TextGenerator
from minillm.model import KVCache, MiniGPT, MiniGPTConfig
from minillm.model.hf import to_transformers


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Wall time of `fn()`, waiting for queued GPU work on both sides so it is counted."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def bench_batch(model: MiniGPT, llama: torch.nn.Module, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    """Median generate and prefill times of both implementations at one batch size."""
    torch.manual_seed(args.seed + batch)
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (batch, args.prompt_len)).to(device)
    mask = torch.ones_like(ids)
    generator = TextGenerator(model)
    config = GenerationConfig(max_new_tokens=args.new_tokens, do_sample=False, stop_token_ids=[])
    total = args.prompt_len + args.new_tokens

    def ours() -> torch.Tensor:
        return generator.sample_generate(ids, config)

    def theirs() -> torch.Tensor:
        return llama.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                              min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)

    @torch.inference_mode()
    def our_prefill() -> torch.Tensor:  # what TextGenerator's first step does
        cache = KVCache(model.config.num_hidden_layers, total - 1)
        return model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits

    @torch.inference_mode()
    def their_prefill() -> torch.Tensor:
        return llama(ids, attention_mask=mask, use_cache=True, logits_to_keep=1).logits

    runs = {"ours": ours, "transformers": theirs}
    prefills = {"ours": our_prefill, "transformers": their_prefill}
    outputs = {name: fn() for name, fn in runs.items()}  # the first warm-up, and the outputs to compare
    for i in range(args.warmup):
        for name in runs:
            prefills[name]()
            if i > 0:
                runs[name]()
    times: dict[str, list[float]] = {name: [] for name in runs}
    prefill_times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name in runs:
            prefill_times[name].append(timed(prefills[name], device)[0])
            times[name].append(timed(runs[name], device)[0])

    result: dict[str, Any] = {"batch": batch, "identical_outputs": bool(torch.equal(outputs["ours"],
                                                                                    outputs["transformers"]))}
    for name in runs:
        generate_s, prefill_s = statistics.median(times[name]), statistics.median(prefill_times[name])
        result[name] = {
            "tokens_per_s": batch * args.new_tokens / generate_s,
            "generate_s": generate_s,
            "prefill_ms": prefill_s * 1e3,
            "decode_ms_per_token": (generate_s - prefill_s) / max(args.new_tokens - 1, 1) * 1e3,
            "generate_s_all": times[name],
        }
    result["ratio"] = result["ours"]["tokens_per_s"] / result["transformers"]["tokens_per_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--vocab", type=int, default=6400, help="vocab_size (the default tokenizer's)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs of each before timing (>= 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: cpu)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.warmup = max(args.warmup, 1)

    import transformers

    torch.manual_seed(args.seed)
    model = MiniGPT(MiniGPTConfig.from_preset(args.preset, vocab_size=args.vocab)).float().eval().to(args.device)
    llama = to_transformers(model)
    llama.generation_config.eos_token_id = None  # no early stop, as stop_token_ids=[] on our side
    print(f"{args.preset}: {model.num_parameters() / 1e6:.1f}M parameters, vocab {args.vocab}, fp32, "
          f"{args.device}, {torch.get_num_threads()} threads; torch {torch.__version__}, transformers "
          f"{transformers.__version__} (attention: {llama.config._attn_implementation})")
    print(f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, median of {args.repeats} "
          f"interleaved runs after {args.warmup} warm-up")

    results = []
    header = (f"{'batch':>5} {'ours tok/s':>11} {'hf tok/s':>10} {'ratio':>6} │ {'prefill ms':>17} │ "
              f"{'decode ms/token':>17} │ same output")
    print(header + "\n" + f"{'':>5} {'':>11} {'':>10} {'':>6} │ {'ours':>8} {'hf':>8} │ {'ours':>8} {'hf':>8} │")
    for batch in args.batch_sizes:
        r = bench_batch(model, llama, batch, args)
        results.append(r)
        ours, theirs = r["ours"], r["transformers"]
        print(f"{batch:>5} {ours['tokens_per_s']:>11.0f} {theirs['tokens_per_s']:>10.0f} {r['ratio']:>5.2f}x │ "
              f"{ours['prefill_ms']:>8.2f} {theirs['prefill_ms']:>8.2f} │ "
              f"{ours['decode_ms_per_token']:>8.2f} {theirs['decode_ms_per_token']:>8.2f} │ "
              f"{'yes' if r['identical_outputs'] else 'NO'}", flush=True)

    if args.out is not None:
        report = {
            "preset": args.preset, "vocab_size": args.vocab, "parameters": model.num_parameters(),
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
            "warmup": args.warmup, "device": args.device, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "attention": llama.config._attn_implementation,
            "machine": platform.processor() or platform.machine(), "results": results,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
