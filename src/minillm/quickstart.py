"""`minillm quickstart`: tokenizer → pretraining → samples, on the built-in corpus, in a few minutes.

The number of steps is fitted to a time budget by timing a few steps first (the learning-rate
schedule needs the total up front), so the run takes about as long on a laptop as on a GPU box,
and a faster machine simply trains longer.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from minillm.data.builtin import builtin_corpus
from minillm.data.pretrain import PretrainDataLoader
from minillm.evaluation.word_problems import word_problem_accuracy
from minillm.inference.generator import GenerationConfig, TextGenerator
from minillm.training.run import load_run_config, prepare_run

logger = logging.getLogger("minillm.quickstart")

SAMPLE_PROMPTS = ("春天的一个早晨，", "小红有5个苹果，", "One sunny day, Tom", "There are 7")


def measure_step_seconds(trainer: Any, steps: int = 3) -> float:
    """Median seconds of one optimizer step, measured on a throwaway copy of the model."""
    probe = copy.deepcopy(trainer.model)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=1e-5)
    loader = PretrainDataLoader(trainer.train_loader.dataset, trainer.config.batch_size, shuffle=False)
    batch = trainer._to_device(next(iter(loader)))
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        for _ in range(trainer.config.grad_accum_steps):
            with trainer._autocast():
                out = trainer.objective(probe, batch)
            out.loss_sum.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]


def unigram_entropy(documents: list[str], tokenizer: Any) -> float:
    """Entropy (nats per token) of the corpus' token frequencies: the loss of a model that ignores context."""
    counts = torch.bincount(torch.tensor([t for ids in tokenizer.encode_batch(documents) for t in ids]))
    probs = counts[counts > 0].double() / counts.sum()
    return float(-(probs * probs.log()).sum())


def run_quickstart(out_dir: Path = Path("runs/quickstart"), minutes: float = 5.0, preset: str = "micro",
                   num_documents: int = 30000) -> dict[str, Any]:
    started = time.time()
    config = load_run_config(values={
        "out_dir": str(out_dir), "eval_every": 0, "seed": 1337,
        "model": {"preset": preset},
        "tokenizer": {"vocab_size": 2048},
        "data": {"source": "builtin", "num_documents": num_documents, "max_length": 256, "val_fraction": 0.02},
        "training": {"batch_size": 16, "lr": 2e-3, "warmup_steps": 30, "log_every": 10, "eval_batches": 20},
    })
    print(f"[1/3] tokenizer and data: {num_documents} built-in documents (stories and word problems, 中文 + English)")
    run = prepare_run(config)
    step_seconds = measure_step_seconds(run.trainer)
    steps = max(20, int(minutes * 60 / step_seconds))
    run.trainer.config.max_steps = steps
    run.trainer.config.eval_every = max(steps // 4, 1)
    precision = str(run.trainer.autocast_dtype or "fp32").removeprefix("torch.")
    print(f"[2/3] pretraining a {run.model.num_parameters() / 1e6:.1f}M-parameter '{preset}' model for "
          f"{steps} steps (~{steps * step_seconds / 60:.1f} min at {step_seconds:.2f} s/step, {precision}) "
          f"on {run.train_set.num_tokens():,} tokens")
    result = run.trainer.train()

    entropy = unigram_entropy(builtin_corpus(2000, seed=7), run.tokenizer)
    generator = TextGenerator(run.model, run.tokenizer)
    print("[3/3] samples (temperature 0.8, top-p 0.95):\n")
    samples = generator.generate(list(SAMPLE_PROMPTS), GenerationConfig(max_new_tokens=80, temperature=0.8,
                                                                         top_p=0.95, seed=0))
    for prompt, text in zip(SAMPLE_PROMPTS, samples):
        print(f"  {prompt}{text.rstrip()}\n")
    accuracy, _ = word_problem_accuracy(generator, 40, chat=False)
    result.update(unigram_entropy=entropy, heldout_word_problem_accuracy=accuracy,
                  minutes=round((time.time() - started) / 60, 2), out_dir=str(out_dir))
    print(f"validation loss {result['val_loss']:.3f} nats/token (perplexity {math.exp(result['val_loss']):.2f}); "
          f"a context-free unigram model scores {entropy:.3f}")
    print(f"held-out word problems answered correctly (greedy, pretrained only): {accuracy:.0%}")
    print(f"done in {result['minutes']:.1f} min; model saved to {out_dir / 'final'}")
    print(f"try: minillm generate {out_dir / 'final'} --prompt \"小明有3个苹果，\"")
    return result
