"""Greedy decoding speed at several batch sizes: our `TextGenerator` against transformers' `generate` on the
same weights (`LlamaForCausalLM` for the Llama-like presets), in one process.

For each batch size, a random fp32 model of `--preset` decodes `--new-tokens` tokens after a random
`--prompt-len`-token prompt, greedily and with no stop token, so both sides do exactly the same work (the
outputs are checked to be identical); runs are interleaved after warm-up and medians reported, as
`minillm.benchmarks.performance.compare_generation` does (`minillm bench` times batch 1 the same way).
"generate tok/s" counts the whole call; "decode ms/token" is (generate − prefill) / (new tokens − 1).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/decode_benchmark.py --threads 2
    .venv/bin/python benchmarks/decode_benchmark.py --preset micro --batch-sizes 1 4 --repeats 3 --out d.json
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from minillm.benchmarks.performance import OURS, THEIRS, compare_generation, transformers_twin
from minillm.model import MiniGPT, MiniGPTConfig


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

    import transformers

    torch.manual_seed(args.seed)
    model = MiniGPT(MiniGPTConfig.from_preset(args.preset, vocab_size=args.vocab)).float().eval().to(args.device)
    twin = transformers_twin(model)
    print(f"{args.preset}: {model.num_parameters() / 1e6:.1f}M parameters, vocab {args.vocab}, fp32, "
          f"{args.device}, {torch.get_num_threads()} threads; torch {torch.__version__}, transformers "
          f"{transformers.__version__} (attention: {twin.config._attn_implementation})")
    print(f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, median of {args.repeats} "
          f"interleaved runs after {args.warmup} warm-up")

    results = []
    header = (f"{'batch':>5} {'ours tok/s':>11} {'hf tok/s':>10} {'ratio':>6} │ {'prefill ms':>17} │ "
              f"{'decode ms/token':>17} │ same output")
    print(header + "\n" + f"{'':>5} {'':>11} {'':>10} {'':>6} │ {'ours':>8} {'hf':>8} │ {'ours':>8} {'hf':>8} │")
    for batch in args.batch_sizes:
        r = compare_generation(model, twin, batch=batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                               repeats=args.repeats, warmup=args.warmup, seed=args.seed)
        results.append(r)
        ours, theirs = r[OURS], r[THEIRS]
        print(f"{batch:>5} {ours['generate_tokens_per_s']:>11.0f} {theirs['generate_tokens_per_s']:>10.0f} "
              f"{r['ratios']['generate']:>5.2f}x │ {ours['prefill_ms']:>8.2f} {theirs['prefill_ms']:>8.2f} │ "
              f"{ours['decode_ms_per_token']:>8.2f} {theirs['decode_ms_per_token']:>8.2f} │ "
              f"{'yes' if r['identical_outputs'] else 'NO'}", flush=True)

    if args.out is not None:
        report = {
            "preset": args.preset, "vocab_size": args.vocab, "parameters": model.num_parameters(),
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
            "warmup": args.warmup, "device": args.device, "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": transformers.__version__, "attention": twin.config._attn_implementation,
            "machine": platform.processor() or platform.machine(), "results": results,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
