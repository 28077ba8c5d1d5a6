"""Training and generation speed of `MiniGPT` against Hugging Face transformers on the same weights, in
one process (`minillm bench`).

    from minillm.benchmarks.performance import format_table, run_benchmark
    result = run_benchmark(["tiny", "micro"])     # a JSON-ready dict
    print(format_table(result))

Per preset, a random model with the micro-batch, window and vocabulary of `configs/pretrain_<preset>.yaml`
(`config_runs`, read from the shipped configs; any of them can be given instead) is measured for:

- training: tokens/s of optimizer steps taken by the `Trainer` itself, so exactly what `minillm train`
  does (forward, next-token loss, backward, gradient clipping, AdamW with the trainer's parameter groups
  and fused/for-loop choice, LR schedule); its MFU (`flops_per_token` × tokens/s over the matmul peak, see
  below); and the step's peak memory;
- prefill: tokens/s of one forward over a `prompt_len`-token prompt that fills the KV cache;
- decode: tokens/s of greedy decoding with `TextGenerator` after that prefill (batch 1 by default):
  (whole generation − prefill) / (new tokens − 1), since the prefill already yields the first new token;
  ours on the fast path (static KV cache, compiled one-token step; its compile time is reported apart)
  and on the eager loop beside it.

Where transformers is installed, its model of the same config family (`LlamaForCausalLM` for the
Llama-like presets) is built on a copy of the same weights (`minillm.model.hf.to_transformers`) and
measured the same way with its default settings: its own loss (`model(ids, labels=ids).loss`) through the
same trainer step, and its `generate`. The two run interleaved (ours, theirs, ours, theirs, ...) after
warm-up, and the median of `repeats` rounds is reported, so a neighbour's load on a shared machine hits
both alike; ratios are minillm / transformers. Sanity checks come with the numbers: both models' logits
agree, their losses agree step by step on the same batches, and greedy decoding gives the same tokens.

Precision of the like-for-like comparison: fp32 on the CPU (transformers' default there, and the dtype of the
measured matmul peak); bf16 autocast on GPUs that support it, fp16 otherwise (`dtype="auto"`: the trainer's
rule without a model, `resolve_precision`). Generation runs on weights in that dtype.

Default settings (`defaults=True`, the column `default`): a copy of our model in a `Trainer` configured as
`minillm train` is by default, `precision: auto` and `compile: auto`, which the trainer decides by timing
this very model on the benchmark's shape for a run as long as the preset's config (`config_runs`; see
`minillm.training.autotune`), against transformers in the like-for-like comparison's precision, eager (on a
CPU: fp32 eager, its defaults). The report prints the choices and the timings behind them.

MFU's peak is the dense datasheet figure for known GPUs (`minillm.training.mfu.GPU_PEAK_FLOPS`), otherwise
the best FLOP/s of square matmuls measured in this run (once per timing round, the best kept, so the first
cold measurement does not count): on a CPU, MFU is the fraction of the machine's own matmul speed.

Peak memory of a training step = the weights and optimizer state (counted from the tensors) + the step's
own peak above what was allocated before it (activations, gradients, temporaries): on CUDA from
`torch.cuda.max_memory_allocated`; on the CPU from the allocations `torch.profiler` reports with
`profile_memory=True` (RSS would count glibc's cached blocks and the other model's leftovers).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import logging
import math
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minillm.benchmarks import report
from minillm.device import resolve_device
from minillm.inference import GenerationConfig, TextGenerator
from minillm.model import PRESETS, KVCache, MiniGPT, MiniGPTConfig
from minillm.model.config import ConfigError
from minillm.model.layers import StaticKVCache
from minillm.recipes.config import CONFIG_DIR, load_run_config
from minillm.training.memory import resident_bytes, step_peak_bytes
from minillm.training.mfu import datasheet_peak_flops, device_name, mfu, time_matmul
from minillm.training.objectives import LanguageModelingObjective, ObjectiveOutput
from minillm.training.precision import precision_name
from minillm.training.trainer import Trainer, TrainingConfig

log = logging.getLogger("minillm.benchmarks")

MB = 1024**2
OURS, THEIRS, COMPILED, DEFAULT = "minillm", "transformers", "minillm compiled", "minillm default"
OURS_EAGER = "minillm eager"  # generation only: the eager decode loop, beside the fast path (OURS)

DEFAULT_SHAPE = (16, 256)  # presets without a shipped pretraining config: (micro-batch, window) and their own vocabulary
DEFAULT_RUN_STEPS = 1000
# --quick: the tiny preset at a small shape, a few steps; the whole run takes seconds.
QUICK = dict(presets=["tiny"], batch_size=8, seq_len=64, steps=2, repeats=3, warmup=1, prompt_len=16,
             new_tokens=16, fast_decode=False)  # (compiling the fast decode step alone takes longer)
STEP_TARGET_S = 1.0  # with steps=None, each timing round takes about this long per model
MAX_AUTO_STEPS = 50
BUSY_PRESSURE = 0.2  # above this CPU pressure (see `cpu_pressure`) the report warns that timings are unreliable
PRECISION_NAMES = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_Run = Callable[[], torch.Tensor]


@dataclass
class BenchmarkSettings:
    """Everything a benchmark run depends on besides the preset (resolved: no "auto" left but `compare`)."""

    device: torch.device
    precision: str  # fp32 | bf16 | fp16: training autocast (fp32: none) and the generation weights' dtype
    batch_size: int | None = None  # None: the preset's shipped config (config_runs)
    seq_len: int | None = None
    vocab_size: int | None = None
    steps: int | None = None  # optimizer steps per timing round; None: about STEP_TARGET_S of them
    repeats: int = 5  # timing rounds; medians are reported
    warmup: int = 2  # untimed steps (and generations) of each model first
    prompt_len: int = 128
    new_tokens: int = 128
    decode_batch: int = 1
    compare: bool | str = "auto"  # True: transformers required; "auto": where importable; False: never
    compile: bool = False  # also train a torch.compile'd copy of our model (the trainer's `compile: true`)
    defaults: bool = True  # also train our model as `minillm train` does by default (precision, compile auto)
    fast_decode: bool = True  # decode on the compiled fast path too (beside the eager loop)
    seed: int = 0


# ---------------------------------------------------------------------------------------- timing
def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Wall time of `fn()`, waiting for queued GPU work on both sides so it is counted."""
    _synchronize(device)
    start = time.perf_counter()
    result = fn()
    _synchronize(device)
    return time.perf_counter() - start, result


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of the best of a few square matmuls (1024² on a CPU, 4096² on a GPU) in `dtype`."""
    n = 1024 if device.type == "cpu" else 4096
    return 2 * n**3 / time_matmul(device, dtype, n, repeats=3)


def cpu_pressure() -> float | None:
    """The share (0-1) of the last 10 s in which some runnable task waited for a CPU (Linux PSI), None where
    unavailable. Well above 0 during a benchmark means other work competed for the cores: with as many
    threads as cores, a descheduled thread then stalls every parallel op, and timings swing wildly."""
    try:
        fields = Path("/proc/pressure/cpu").read_text().split("\n", 1)[0].split()[1:]
        return float(dict(field.split("=", 1) for field in fields)["avg10"]) / 100
    except (OSError, ValueError, KeyError):
        return None


# ---------------------------------------------------------------------------------------- the twin
def transformers_twin(model: MiniGPT) -> nn.Module:
    """The transformers model of `model`'s config family on a copy of its weights (eval mode, fp32), with
    no end-of-sequence token in its generation config: like `GenerationConfig(stop_token_ids=[])`, neither
    side stops early, and transformers' minimum-length processor never edits the logits. Raises
    `ImportError` without transformers and `ValueError`/`RuntimeError` for a config it cannot express."""
    from minillm.model.hf import to_transformers

    twin = to_transformers(model, family=None)
    twin.generation_config.eos_token_id = None
    return twin


class TransformersLMObjective(LanguageModelingObjective):
    """The next-token loss as a transformers user gets it, `model(ids, labels=labels).loss` (its own
    shifted mean cross-entropy), scaled to the trainer's summed-loss convention."""

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        labels = batch["labels"]
        loss = model(batch["input_ids"], labels=labels).loss
        loss_sum = loss * (labels[:, 1:] != -100).sum()
        return ObjectiveOutput(loss_sum=loss_sum, metrics={"ce_loss": loss_sum.detach()})


# ---------------------------------------------------------------------------------------- generation
def compare_generation(model: MiniGPT, twin: nn.Module | None = None, batch: int = 1, prompt_len: int = 32,
                       new_tokens: int = 128, repeats: int = 5, warmup: int = 2, seed: int = 0,
                       fast_decode: bool = True) -> dict[str, Any]:
    """Greedy generation of `new_tokens` after a random `prompt_len`-token prompt, batch `batch`: our
    `TextGenerator` against `twin.generate` (a `transformers_twin`; None: ours alone), interleaved, medians
    of `repeats` after `warmup` untimed runs of each. Prefill (one forward filling the KV cache, logits of
    the last position only, as each side's first step does) is timed apart in the same rounds.

    Ours is measured twice: `OURS` is the fast path (static cache, compiled one-token step; with
    `fast_decode=False`, or where the model has no fast path, the eager loop), `OURS_EAGER` the eager loop.
    The fast path's compile happens in the first warm-up run and is reported apart (`compile_s`), not in
    its tokens/s; its prefill is timed into a static cache of the capacity it decodes with."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed + batch)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=generator).to(device)
    mask = torch.ones_like(ids)
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, stop_token_ids=[])
    eager = TextGenerator(model, fast_decode=False)
    fast = TextGenerator(model, fast_decode=True) if fast_decode else None
    capacity = eager._capacity(prompt_len + new_tokens - 1)

    @torch.inference_mode()
    def eager_prefill() -> torch.Tensor:
        cache = KVCache(model.config.num_hidden_layers, prompt_len + new_tokens - 1)
        return model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits

    @torch.inference_mode()
    def static_prefill() -> torch.Tensor:
        cfg = model.config
        cache = StaticKVCache(cfg.num_hidden_layers, batch, cfg.num_key_value_heads, capacity, cfg.attention_head_dim,
                              device=device, dtype=next(model.parameters()).dtype)
        return model(ids, past_key_values=cache, cache_position=torch.arange(prompt_len, device=device),
                     logits_to_keep=1).logits

    generate: dict[str, _Run] = {OURS_EAGER: lambda: eager.sample_generate(ids, config)}
    prefill: dict[str, _Run] = {OURS_EAGER: eager_prefill}
    if fast is not None:
        generate[OURS] = lambda: fast.sample_generate(ids, config)
        prefill[OURS] = static_prefill
    if twin is not None:
        @torch.inference_mode()
        def their_prefill() -> torch.Tensor:
            return twin(ids, attention_mask=mask, use_cache=True, logits_to_keep=1).logits

        generate[THEIRS] = lambda: twin.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        prefill[THEIRS] = their_prefill

    for module in (model, twin):
        if module is not None:
            module.eval()
    outputs = {name: fn() for name, fn in generate.items()}  # the first warm-up (compiles), and the outputs
    compile_s = fast.fast_stats.compile_seconds if fast is not None else None
    if fast is not None and fast.fast_stats.fast_generations == 0:  # no fast path for this model
        del generate[OURS], prefill[OURS], outputs[OURS]
        compile_s = None
    if OURS not in generate:  # ours is the eager loop
        generate = {OURS: generate.pop(OURS_EAGER), **generate}
        prefill = {OURS: prefill.pop(OURS_EAGER), **prefill}
        outputs[OURS] = outputs.pop(OURS_EAGER)
    for i in range(max(warmup, 1)):
        for name in generate:
            prefill[name]()
            if i > 0:
                generate[name]()
    generate_times: dict[str, list[float]] = {name: [] for name in generate}
    prefill_times: dict[str, list[float]] = {name: [] for name in generate}
    for _ in range(repeats):
        for name in generate:
            prefill_times[name].append(timed(prefill[name], device)[0])
            generate_times[name].append(timed(generate[name], device)[0])

    result: dict[str, Any] = {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
                              "fast_decode": OURS_EAGER in generate, "compile_s": compile_s}
    for name in generate:
        generate_s, prefill_s = statistics.median(generate_times[name]), statistics.median(prefill_times[name])
        decode_s = max(generate_s - prefill_s, 1e-9) / max(new_tokens - 1, 1)  # per new token after the first
        result[name] = {
            "prefill_tokens_per_s": batch * prompt_len / prefill_s,
            "decode_tokens_per_s": batch / decode_s,
            "generate_tokens_per_s": batch * new_tokens / generate_s,
            "prefill_ms": prefill_s * 1e3,
            "decode_ms_per_token": decode_s * 1e3,
            "generate_s": generate_s,
            "generate_s_all": generate_times[name],
            "prefill_s_all": prefill_times[name],
        }
    if twin is not None:
        theirs = outputs[THEIRS].cpu()
        result["identical_outputs"] = all(torch.equal(outputs[name].cpu(), theirs) for name in outputs)
        result["ratios"] = {kind: result[OURS][f"{kind}_tokens_per_s"] / result[THEIRS][f"{kind}_tokens_per_s"]
                            for kind in ("prefill", "decode", "generate")}
        if OURS_EAGER in result:
            result["ratios"]["decode_eager"] = (result[OURS_EAGER]["decode_tokens_per_s"]
                                                / result[THEIRS]["decode_tokens_per_s"])
    return result


# ---------------------------------------------------------------------------------------- training
def compare_training(trainers: dict[str, Trainer], batches: list[dict[str, torch.Tensor]],
                     settings: BenchmarkSettings, flops_per_token: float,
                     peak_flops: Callable[[], float]) -> dict[str, Any]:
    """Interleaved timing of whole optimizer steps of each trainer on the same batches (the k-th step of
    every trainer sees the same batch), then one more step each to measure peak memory. `peak_flops()`
    measures the matmul peak once per round; MFU uses the best FLOP/s (datasheet or measured) seen."""
    device = settings.device
    losses: dict[str, list[torch.Tensor]] = {name: [] for name in trainers}
    tokens_per_step = batches[0]["input_ids"].numel()

    def run_steps(name: str, count: int) -> None:
        for _ in range(count):
            batch = batches[len(losses[name]) % len(batches)]
            losses[name].append(trainers[name]._optimizer_step([dict(batch)])["loss"])

    warmup_s: dict[str, float] = {}
    for _ in range(max(settings.warmup, 1)):
        for name in trainers:
            warmup_s[name] = timed(partial(run_steps, name, 1), device)[0]
    steps = settings.steps or max(1, min(MAX_AUTO_STEPS, math.ceil(STEP_TARGET_S / max(warmup_s.values()))))
    times: dict[str, list[float]] = {name: [] for name in trainers}
    peak = 0.0
    for _ in range(settings.repeats):
        peak = max(peak, peak_flops())
        for name in trainers:
            times[name].append(timed(partial(run_steps, name, steps), device)[0] / steps)

    batch_size, seq_len = batches[0]["input_ids"].shape
    result: dict[str, Any] = {"batch_size": batch_size, "seq_len": seq_len, "steps_per_round": steps,
                              "rounds": settings.repeats, "flops_per_token": flops_per_token,
                              "peak_flops": peak}
    for name, trainer in trainers.items():
        transient = step_peak_bytes(partial(run_steps, name, 1), device)
        step_s = statistics.median(times[name])
        tokens_per_s = tokens_per_step / step_s
        result[name] = {
            "tokens_per_s": tokens_per_s,
            "step_s": step_s,
            "step_s_all": times[name],
            "mfu": mfu(tokens_per_s, flops_per_token, peak),
            "peak_memory_mb": (None if transient is None
                               else (resident_bytes(trainer.base_model, trainer.optimizer) + transient) / MB),
            "losses": [float(loss) for loss in losses[name]],
        }
    if THEIRS in trainers:
        theirs = result[THEIRS]
        result["ratios"] = {}
        for name in (n for n in trainers if n != THEIRS):
            ours = result[name]
            memory = (ours["peak_memory_mb"] / theirs["peak_memory_mb"]
                      if ours["peak_memory_mb"] and theirs["peak_memory_mb"] else None)
            result["ratios"][name] = {"tokens_per_s": ours["tokens_per_s"] / theirs["tokens_per_s"],
                                      "peak_memory": memory}
    return result


def _random_batches(count: int, batch_size: int, seq_len: int, vocab_size: int, seed: int,
                    device: torch.device) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator).to(device)
        batches.append({"input_ids": ids, "labels": ids})
    return batches


# ---------------------------------------------------------------------------------------- one preset
@functools.cache
def config_runs() -> dict[str, dict[str, int]]:
    """What `minillm train` runs for each preset with a shipped `pretrain_*.yaml` config, read from those
    configs (the one definition): its micro-batch, window, tokenizer vocabulary and run length, so that the
    benchmark trains the shapes `minillm train` does."""
    runs = {}
    for path in sorted(CONFIG_DIR.glob("pretrain_*.yaml")):
        config = load_run_config(path)
        runs.setdefault(config["model"]["preset"], {
            "batch_size": config["memory"].get("micro_batch_size") or config["training"]["batch_size"],
            "seq_len": config["data"]["max_length"], "vocab_size": config["tokenizer"]["vocab_size"],
            "max_steps": config["max_steps"]})
    return runs


def training_shape(preset: str, settings: BenchmarkSettings) -> tuple[int, int, int]:
    """(batch size, window, vocabulary) for `preset`: the settings' where given, else its shipped config's
    (`config_runs`), else `DEFAULT_SHAPE` and the preset's vocabulary."""
    run = config_runs().get(preset)
    batch, seq, vocab = ((run["batch_size"], run["seq_len"], run["vocab_size"]) if run else
                         (*DEFAULT_SHAPE, PRESETS[preset].get("vocab_size", 6400)))
    return settings.batch_size or batch, settings.seq_len or seq, settings.vocab_size or vocab


def benchmark_preset(preset: str, settings: BenchmarkSettings,
                     peak_flops: Callable[[], float]) -> dict[str, Any]:
    """Build the preset's model and its transformers twin, check that they agree, then time generation (on
    the untrained weights, so greedy outputs can be compared) and training."""
    batch_size, seq_len, vocab_size = training_shape(preset, settings)
    context = max(PRESETS[preset].get("max_position_embeddings", 1024), seq_len,
                  settings.prompt_len + settings.new_tokens)
    torch.manual_seed(settings.seed)
    model = MiniGPT(MiniGPTConfig.from_preset(preset, vocab_size=vocab_size, max_position_embeddings=context))
    model = model.to(settings.device)
    result: dict[str, Any] = {"preset": preset, "parameters": model.num_parameters(), "vocab_size": vocab_size}
    log.info("%s: %.2fM parameters, vocab %d", preset, model.num_parameters() / 1e6, vocab_size)

    twin, reason = _twin_or_reason(model, settings.compare)
    result["transformers_model"] = type(twin).__name__ if twin is not None else None
    if reason:
        result["transformers_skipped"] = reason
        log.info("%s: no transformers comparison: %s", preset, reason)
    batches = _random_batches(8, batch_size, seq_len, vocab_size, settings.seed, settings.device)
    checks: dict[str, Any] = {}
    if twin is not None:
        with torch.no_grad():
            ids = batches[0]["input_ids"][:2]
            ours, theirs = model.eval()(ids).logits, twin.eval()(ids).logits
        checks["max_logit_diff"] = float((ours.float() - theirs.float()).abs().max())

    log.info("%s: generation, prompt %d + %d new tokens at batch %d", preset, settings.prompt_len,
             settings.new_tokens, settings.decode_batch)
    dtype = _DTYPES[settings.precision]
    decoders = (model, twin) if dtype == torch.float32 else (  # copies: training keeps fp32 master weights
        copy.deepcopy(model).to(dtype), None if twin is None else copy.deepcopy(twin).to(dtype))
    generation = compare_generation(*decoders, batch=settings.decode_batch, prompt_len=settings.prompt_len,
                                    new_tokens=settings.new_tokens, repeats=settings.repeats,
                                    warmup=settings.warmup, seed=settings.seed,
                                    fast_decode=settings.fast_decode)
    del decoders
    if twin is not None:
        checks["identical_greedy"] = generation.pop("identical_outputs")

    log.info("%s: training, batch %d × %d tokens", preset, batch_size, seq_len)
    config = TrainingConfig(precision=settings.precision, progress=False, seed=settings.seed)
    trainers = {OURS: Trainer(model, config=config, device=settings.device)}
    if settings.compile:
        trainers[COMPILED] = Trainer(copy.deepcopy(model), config=dataclasses.replace(config, compile=True),
                                     device=settings.device)
    if settings.defaults:
        trainers[DEFAULT] = default_trainer(model, preset, batches, settings)
        result["defaults"] = trainers[DEFAULT].autotune
    if twin is not None:
        trainers[THEIRS] = Trainer(twin, objective=TransformersLMObjective(), config=config,
                                   device=settings.device)
    # The trainer's own optimizer and step (not a copy of them), so the benchmark follows any change there.
    for trainer in trainers.values():
        trainer._setup_optimizer(total_steps=1000)
    if settings.defaults and trainers[DEFAULT].autotune.get("compile", {}).get("choice") == "compiled":
        settings = dataclasses.replace(settings, warmup=max(settings.warmup, 3))  # compiling takes the first steps
    training = compare_training(trainers, batches, settings, model.flops_per_token(seq_len), peak_flops)
    if twin is not None:
        our_losses, their_losses = training[OURS]["losses"], training[THEIRS]["losses"]
        checks["initial_loss"] = {OURS: our_losses[0], THEIRS: their_losses[0]}
        checks["max_loss_diff"] = max(abs(a - b) for a, b in zip(our_losses, their_losses))
        checks["loss_steps"] = min(len(our_losses), len(their_losses))
    result.update(training=training, generation=generation, checks=checks)
    return result


def default_trainer(model: MiniGPT, preset: str, batches: list[dict[str, torch.Tensor]],
                    settings: BenchmarkSettings) -> Trainer:
    """A copy of `model` in a `Trainer` configured as `minillm train` is by default: precision and compile
    `auto`, which the trainer decides by timing this model on the batches' shape (see
    `minillm.training.autotune`) for a run as long as the preset's config (`config_runs`)."""
    config = TrainingConfig(precision="auto", compile="auto", progress=False, seed=settings.seed,
                            max_steps=config_runs().get(preset, {}).get("max_steps", DEFAULT_RUN_STEPS))
    return Trainer(copy.deepcopy(model), config=config, device=settings.device, train_data=batches)


def _twin_or_reason(model: MiniGPT, compare: bool | str) -> tuple[nn.Module | None, str | None]:
    if compare is False:
        return None, "not requested"
    try:
        return transformers_twin(model), None
    except ImportError as e:
        if compare is True:
            raise ImportError("the transformers comparison needs transformers installed "
                              "(pip install transformers), or run without it") from e
        return None, f"transformers is not installed ({e})"
    except (ValueError, RuntimeError) as e:  # no native family, or weights it cannot take as they are
        if compare is True:
            raise
        return None, f"no transformers counterpart ({str(e).splitlines()[0]})"


# ---------------------------------------------------------------------------------------- the run
def run_benchmark(presets: Sequence[str] | None = None, *, device: str = "auto", quick: bool = False,
                  batch_size: int | None = None, seq_len: int | None = None, vocab_size: int | None = None,
                  steps: int | None = None, repeats: int | None = None, warmup: int | None = None,
                  prompt_len: int | None = None, new_tokens: int | None = None, decode_batch: int = 1,
                  compare_transformers: bool | str = "auto", dtype: str | None = None, compile: bool = False,
                  defaults: bool = True, threads: int | None = None, seed: int = 0,
                  fast_decode: bool | None = None) -> dict[str, Any]:
    """Benchmark each preset (default: `tiny` and `micro` on a CPU, `mini` and `small` on a GPU; with
    `quick`, `tiny` at a small shape) and return the settings, the matmul peak and the per-preset results
    (see the module docstring). Arguments left None take the preset's or `quick`'s defaults; `dtype` is the
    like-for-like comparison's precision (None: fp32 on a CPU, bf16 or fp16 on a GPU; `auto`: the trainer's
    rule without a model, `resolve_precision`); `compile` adds a torch.compile'd copy of our model to the
    training comparison, `defaults` our model as `minillm train` trains it by default (precision and compile
    `auto`, measured on it as the trainer does); `threads` sets torch's CPU threads; `fast_decode` (default: on,
    off with `quick`) also decodes on the compiled fast path."""
    if threads is not None:
        torch.set_num_threads(threads)
    resolved = resolve_device(device)
    quick_defaults = QUICK if quick else {}
    presets = list(presets or quick_defaults.get("presets") or (["tiny", "micro"] if resolved.type == "cpu"
                                                                 else ["mini", "small"]))
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        raise ConfigError(f"unknown preset(s) {', '.join(unknown)}; available presets: {', '.join(PRESETS)}")

    def pick(value: Any, name: str, default: Any) -> Any:
        return value if value is not None else quick_defaults.get(name, default)

    settings = BenchmarkSettings(
        device=resolved, precision=_resolve_precision(dtype, resolved),
        batch_size=pick(batch_size, "batch_size", None), seq_len=pick(seq_len, "seq_len", None),
        vocab_size=vocab_size, steps=pick(steps, "steps", None), repeats=pick(repeats, "repeats", 5),
        warmup=pick(warmup, "warmup", 2), prompt_len=pick(prompt_len, "prompt_len", 128),
        new_tokens=pick(new_tokens, "new_tokens", 128), decode_batch=decode_batch,
        compare=compare_transformers, compile=compile, defaults=defaults,
        fast_decode=pick(fast_decode, "fast_decode", True),
        seed=seed)
    if compile and warmup is None:  # compiling takes the first steps (forward, backward, recompiles)
        settings.warmup = max(settings.warmup, 3)
    for name in ("batch_size", "seq_len", "vocab_size", "steps"):
        if getattr(settings, name) is not None and getattr(settings, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(settings, name)}")
    if settings.repeats < 1 or settings.prompt_len < 1 or settings.new_tokens < 1 or settings.decode_batch < 1:
        raise ValueError("repeats, prompt_len, new_tokens and decode_batch must be at least 1")

    compute_dtype = _DTYPES[settings.precision]
    datasheet = datasheet_peak_flops(device_name(resolved), compute_dtype) if resolved.type == "cuda" else None
    measured: list[float] = []
    pressure = [cpu_pressure()]

    def peak_flops() -> float:  # called once per timing round: also a good moment to look at the machine's load
        pressure.append(cpu_pressure())
        measured.append(measure_matmul_peak(resolved, compute_dtype))
        return datasheet or max(measured)

    results = [benchmark_preset(preset, settings, peak_flops) for preset in presets]
    pressure.append(cpu_pressure())
    known_pressure = [x for x in pressure if x is not None]
    return {
        "settings": {**{k: v for k, v in dataclasses.asdict(settings).items() if k != "device"},
                     "device": str(resolved), "device_name": device_name(resolved), "quick": quick,
                     "threads": torch.get_num_threads(), "torch": torch.__version__,
                     "transformers": _transformers_version(), "machine": platform.machine(),
                     "cpu_pressure_max": max(known_pressure) if known_pressure else None},
        "peak_flops": {"dtype": settings.precision, "measured": max(measured), "datasheet": datasheet,
                       "used_for_mfu": datasheet or max(measured)},
        "presets": results,
    }


def _resolve_precision(dtype: str | None, device: torch.device) -> str:
    """The like-for-like comparison's precision: `dtype`, where `auto` is the trainer's rule without a model
    (`resolve_precision`); None: fp32 on a CPU (transformers' default there), that rule on a GPU."""
    if dtype is not None and dtype not in PRECISION_NAMES:
        raise ValueError(f"dtype={dtype!r} is not supported; allowed: {', '.join(PRECISION_NAMES)}")
    if dtype is None:
        dtype = "fp32" if device.type == "cpu" else "auto"
    return precision_name(dtype, device)


def _transformers_version() -> str | None:
    try:
        import transformers
    except ImportError:
        return None
    return transformers.__version__


# ---------------------------------------------------------------------------------------- the report
def format_table(result: dict[str, Any]) -> str:
    """The result of `run_benchmark` as a plain-text report: one table per preset, ratios minillm /
    transformers."""
    s, peak = result["settings"], result["peak_flops"]
    peak_line = f"matmul peak ({peak['dtype']}): {peak['measured'] / 1e9:,.1f} GFLOP/s measured"
    if peak["datasheet"]:
        peak_line += f", {peak['datasheet'] / 1e12:,.0f} TFLOP/s datasheet (used for MFU)"
    lines = [f"minillm bench: {s['device']} ({s['device_name']}), {s['precision']}, {s['threads']} threads; "
             f"torch {s['torch']}, transformers {s['transformers'] or 'not installed'}", peak_line]
    pressure = s.get("cpu_pressure_max")
    if pressure is not None and pressure > BUSY_PRESSURE:
        lines.append(f"warning: other work competed for the CPU during the run (up to {pressure:.0%} of the "
                     "time): timings are unreliable, ratios less so (the runs were interleaved); try fewer "
                     "--threads")
    for r in result["presets"]:
        lines += [""] + _preset_table(r)
    return "\n".join(lines)


def _preset_table(r: dict[str, Any]) -> list[str]:
    training, generation, checks = r["training"], r["generation"], r["checks"]
    names = [n for n in (OURS, COMPILED, DEFAULT, THEIRS) if n in training]
    ours = [n for n in names if n != THEIRS]
    compared = THEIRS in names
    header = [f"{r['preset']}: {r['parameters'] / 1e6:.2f}M parameters, vocab {r['vocab_size']}; training "
              f"{training['batch_size']} × {training['seq_len']} tokens per step "
              f"({training['steps_per_round']} steps × {training['rounds']} rounds); prompt "
              f"{generation['prompt_len']} + {generation['new_tokens']} new tokens at batch {generation['batch']}"]
    kinds = {OURS: "eager", COMPILED: "compiled", DEFAULT: "default"}
    ratio_names = [f"ratio ({kinds[n]})" if len(ours) > 1 else "ratio" for n in ours] if compared else []
    columns = [n.replace(f"{OURS} ", "") if n != OURS else n for n in names] + ratio_names
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, values: list[str], ratios: list[float | None]) -> None:
        rows.append((label, values + ([f"{x:.2f}x" if x else "-" for x in ratios] if compared else [])))

    ratios = training.get("ratios", {})
    row("train tokens/s", [f"{training[n]['tokens_per_s']:,.0f}" for n in names],
        [ratios.get(n, {}).get("tokens_per_s") for n in ours])
    row("train MFU", [f"{training[n]['mfu']:.1%}" for n in names], [None] * len(ours))
    row("train peak memory MB",
        [f"{training[n]['peak_memory_mb']:,.1f}" if training[n]["peak_memory_mb"] else "-" for n in names],
        [ratios.get(n, {}).get("peak_memory") for n in ours])
    for kind in ("prefill", "decode"):
        values = [f"{generation[n][f'{kind}_tokens_per_s']:,.0f}" if n in generation else "-" for n in names]
        ratio = generation["ratios"][kind] if compared else None
        row(f"{kind} tokens/s", values, [ratio if n == OURS else None for n in ours])
    if OURS_EAGER in generation:  # the row above is the fast path; the eager loop beside it
        row("decode tokens/s, eager loop",
            [f"{generation[OURS_EAGER]['decode_tokens_per_s']:,.0f}" if n == OURS else "-" for n in names],
            [generation["ratios"]["decode_eager"] if compared and n == OURS else None for n in ours])
    if generation.get("compile_s") is not None:
        header.append(f"decode on the fast path (compiled in {generation['compile_s']:.1f} s, not counted "
                      "in tokens/s)")
    width = max(len(label) for label, _ in rows)
    widths = [max(len(c), *(len(v[i]) for _, v in rows)) for i, c in enumerate(columns)]
    lines = header + ["  ".join([" " * width, *(c.rjust(w) for c, w in zip(columns, widths))])]
    lines += ["  ".join([label.ljust(width), *(v.rjust(w) for v, w in zip(values, widths))])
              for label, values in rows]
    if compared:
        initial = checks["initial_loss"]
        lines.append(f"checks: initial loss {initial[OURS]:.5f} vs {initial[THEIRS]:.5f}, losses within "
                     f"{checks['max_loss_diff']:.1e} over {checks['loss_steps']} steps, logits within "
                     f"{checks['max_logit_diff']:.1e}, greedy tokens "
                     f"{'identical' if checks['identical_greedy'] else 'DIFFERENT'}")
    elif r.get("transformers_skipped"):
        lines.append(f"transformers: {r['transformers_skipped']}")
    if DEFAULT in training:
        lines.append(_defaults_line(r.get("defaults", {}), compared))
    return lines


def _defaults_line(autotune: dict[str, Any], compared: bool) -> str:
    """What the `default` column ran: the trainer's `auto` choices and the timings behind them."""
    parts = []
    for setting in ("precision", "compile"):
        decision = autotune.get(setting, {})
        timings = ", ".join(f"{name} {ms:.1f}" for name, ms in decision.get("ms_per_step", {}).items())
        detail = f"{decision.get('source', '?')}: {timings} ms/step" if timings else decision.get("source", "?")
        parts.append(f"{setting} auto -> {decision.get('choice', '?')} ({detail})")
    against = "; ratio (default) against transformers at the comparison's precision, eager" if compared else ""
    return f"default = minillm train's defaults: {', '.join(parts)}{against}"


# ---------------------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `minillm bench` options."""
    parser.add_argument("--preset", action="append", dest="presets", metavar="NAME",
                        help=f"model preset, repeatable ({', '.join(PRESETS)}; default: tiny and micro on a "
                             "CPU, mini and small on a GPU)")
    parser.add_argument("--quick", action="store_true",
                        help="the tiny preset at a small shape, a few steps (seconds)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default: auto)")
    parser.add_argument("--dtype", choices=PRECISION_NAMES,
                        help="precision of the like-for-like comparison (default: fp32 on a CPU, bf16 autocast on "
                             "a GPU; auto: the trainer's rule without a model)")
    parser.add_argument("--batch-size", type=int, help="training micro-batch (default: the preset's config)")
    parser.add_argument("--seq-len", type=int,
                        help="tokens per training sequence (default: the preset's config)")
    parser.add_argument("--vocab-size", type=int, help="vocabulary (default: the preset's config's tokenizer)")
    parser.add_argument("--steps", type=int,
                        help="optimizer steps per timing round (default: about 1 s of them)")
    parser.add_argument("--repeats", type=int,
                        help="interleaved timing rounds; medians are reported (default: 5)")
    parser.add_argument("--prompt-len", type=int, help="prompt tokens for prefill and decoding (default: 128)")
    parser.add_argument("--new-tokens", type=int, help="greedy tokens to decode (default: 128)")
    parser.add_argument("--decode-batch", type=int, default=1, help="prompts decoded at once (default: 1)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--no-transformers", action="store_true", help="measure minillm alone")
    parser.add_argument("--compile", action="store_true",
                        help="also train a torch.compile'd copy of our model (`compile: true` in a run config)")
    parser.add_argument("--no-defaults", action="store_true",
                        help="skip training our model as `minillm train` does by default (precision and compile "
                             "auto, measured first)")
    parser.add_argument("--no-fast-decode", action="store_true",
                        help="decode with the eager loop only (skips compiling the fast decode step)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")


def run_from_args(args: argparse.Namespace) -> int:
    """Run the benchmark from parsed `add_arguments` options, print the report, write `--out`; exit status."""
    result = run_benchmark(
        args.presets, device=args.device, quick=args.quick, batch_size=args.batch_size, seq_len=args.seq_len,
        vocab_size=args.vocab_size, steps=args.steps, repeats=args.repeats, prompt_len=args.prompt_len,
        new_tokens=args.new_tokens, decode_batch=args.decode_batch,
        compare_transformers=False if args.no_transformers else "auto", dtype=args.dtype, compile=args.compile,
        defaults=not args.no_defaults,
        threads=args.threads, seed=args.seed, fast_decode=False if args.no_fast_decode else None)
    return report(format_table(result), result, args.out)


__all__ = ["DEFAULT", "OURS", "OURS_EAGER", "THEIRS", "BenchmarkSettings", "TransformersLMObjective", "add_arguments",
           "benchmark_preset", "config_runs", "compare_generation", "default_trainer", "compare_training", "cpu_pressure", "format_table",
           "measure_matmul_peak", "run_benchmark", "run_from_args", "timed", "training_shape", "transformers_twin"]
