"""The race (`minillm bench race`): the plain recipe against ours, on the same text, at the same size.

    from minillm.benchmarks.race import format_race, run_race
    result = run_race("data/raw/tinyshakespeare.txt", threads=1)   # a JSON-ready dict
    print(format_race(result))

Two models of about the same parameter count train on the same text in one process:

- plain (`PLAIN`): nanoGPT's character-level Shakespeare recipe at its CPU size: the GPT-2 architecture
  (LayerNorm, learned positions, GELU, biases), one token per character, AdamW (betas 0.9/0.99, weight
  decay 0.1, gradient clipping at 1) with linear warmup and cosine decay to a tenth of the peak;
- ours (`OURS`): a Llama-style block (RMSNorm, RoPE, SwiGLU, QK-norm), a byte-level BPE trained on the
  training text, Muon on the hidden matrices with AdamW on the rest, and warmup-stable-decay.

Both take their steps through the one `Trainer` (`Trainer._optimizer_step`, exactly the step of `minillm
train`) on `LanguageModelingDataset` windows batched by the trainer's `PretrainDataLoader`.

What is compared. Losses per token do not compare across tokenizers, so validation is scored per
character: the summed next-token cross-entropy over the validation text divided by its number of
characters (nats per character; bits per byte = summed nats / ln 2 / UTF-8 bytes). The text is cut at
the start of a line: the training part before, the validation part (about the last `val_fraction`) after,
beginning with that line break. Each tokenizer encodes the validation part on its own, where the line
break is a token by itself; it is the context the first prediction starts from, and every later character
is scored, so both runs are scored on exactly the same characters. `eval_chars` keeps only the first
lines of the validation part (a fixed subset, the same for both).

Timing. The two trainings are interleaved (a chunk of plain's steps, a chunk of ours, ...) so that a
neighbour's load on a shared machine hits both alike, and each run's clock counts only its own training
steps (fetching the batch, forward, backward, optimizer), never evaluation. Plain runs its budget of
steps; its final validation loss is the target. Ours is evaluated every `eval_every` steps: its time to
the target is its clock at the first evaluation at or below the target (the evaluation point, an upper
bound; a linear interpolation between the two evaluations around the crossing is reported beside it), and
the ratio is that time over plain's training time. When ours never reaches the target within its budget
the result says so and gives no ratio.

Parameters are counted as distinct tensors' elements (a tied head counts once), with and without the
embeddings (token embeddings, and the learned position embeddings of the plain model).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import math
import platform
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from minillm.benchmarks import report
from minillm.benchmarks.performance import BUSY_PRESSURE, cpu_pressure
from minillm.data.formats import DataError
from minillm.data.pretrain import LanguageModelingDataset, PretrainDataLoader
from minillm.device import resolve_device
from minillm.model import MiniGPT, MiniGPTConfig
from minillm.tokenizer import BPETokenizer
from minillm.training.trainer import Trainer, TrainingConfig

log = logging.getLogger("minillm.benchmarks")

PLAIN_NAME, OURS_NAME = "plain", "ours"
TOKENIZERS = ("char", "bpe")
NEWLINE = "\n"


@dataclass
class Recipe:
    """Everything one side of the race trains with."""

    description: str
    tokenizer: str  # char | bpe
    model: dict[str, Any]  # MiniGPTConfig fields; vocab_size and max_position_embeddings come from the race
    training: dict[str, Any]  # TrainingConfig fields; max_steps, batch_size and seed come from the race
    steps: int
    batch_size: int
    context: int  # tokens per training window (the model's max_position_embeddings)
    vocab_size: int = 0  # bpe: the tokenizer's size, its special tokens included

    def __post_init__(self) -> None:
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"tokenizer={self.tokenizer!r} is not supported; allowed: {', '.join(TOKENIZERS)}")
        for name in ("steps", "batch_size", "context"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.context < 2:
            raise ValueError(f"context must be at least 2 tokens, got {self.context}")


_GPT2_BLOCK = dict(norm_type="layernorm", norm_eps=1e-5, position_embedding="learned", mlp_type="gelu",
                   qkv_bias=True, out_bias=True, mlp_bias=True, tie_word_embeddings=True, dropout=0.0)
_LLAMA_BLOCK = dict(norm_type="rmsnorm", position_embedding="rope", mlp_type="swiglu", qk_norm=True,
                    tie_word_embeddings=True, dropout=0.0)

# nanoGPT's shakespeare_char recipe at the size its README gives for a CPU (4 layers, 4 heads, 128 wide,
# context 64, batch 12, no dropout): about 0.8M parameters.
PLAIN = Recipe(
    description="GPT-2 block, characters, AdamW + cosine (nanoGPT shakespeare_char)",
    tokenizer="char",
    model=dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, **_GPT2_BLOCK),
    training=dict(optimizer="adamw", lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1, grad_clip=1.0,
                  lr_schedule="cosine", warmup_steps=100, min_lr_ratio=0.1),
    steps=2000, batch_size=12, context=64)

# The same depth and width, with a SwiGLU MLP 288 wide: with its larger (1024-token) embedding the model
# holds 3% more parameters than plain's in all, and 11% fewer without embeddings. The settings were chosen
# by measurement (docs/pretraining_en.md, "The race", lists what was tried).
OURS = Recipe(
    description="Llama block + QK-norm, byte-level BPE, Muon + AdamW, warmup-stable-decay",
    tokenizer="bpe", vocab_size=1024,
    model=dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=288,
               **_LLAMA_BLOCK),
    training=dict(optimizer="muon", lr=6e-3, muon_lr=0.02, muon_momentum=0.95, beta1=0.9, beta2=0.99,
                  weight_decay=0.1, grad_clip=1.0, lr_schedule="wsd", decay_fraction=0.3, warmup_steps=50,
                  min_lr_ratio=0.1),
    steps=100, batch_size=16, context=128)

DEFAULT_EVAL_EVERY = 5
DEFAULT_VAL_FRACTION = 0.1


# ---------------------------------------------------------------------------------------- text
def read_race_text(path: str | Path) -> str:
    """The text of `path`; `DataError` naming it when it is missing, unreadable, not UTF-8 or blank."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    return text


def split_text(text: str, val_fraction: float = DEFAULT_VAL_FRACTION, eval_chars: int | None = None
               ) -> tuple[str, str]:
    """(training text, validation text): cut at the last line break before the last `val_fraction` of
    the text that ends a non-blank line and starts one beginning with a non-space character, so the
    validation text starts with a line break that every tokenizer here encodes as a token of its own.
    `eval_chars` keeps the validation text's first lines up to about that many characters."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    target = int(len(text) * (1.0 - val_fraction))
    cut = _line_start_before(text, target)
    if cut <= 0:
        raise DataError("the text has no line break before its last part to cut a validation split at "
                        f"(val_fraction={val_fraction})")
    train, val = text[:cut], text[cut:]
    if eval_chars is not None and len(val) > eval_chars + 1:
        end = val.find(NEWLINE, eval_chars)
        val = val if end == -1 else val[:end + 1]
    return train, val


def _line_start_before(text: str, position: int) -> int:
    """The largest i <= position with text[i] a line break after a non-space character and before one."""
    i = text.rfind(NEWLINE, 0, position + 1)
    while i > 0:
        if i + 1 < len(text) and not text[i - 1].isspace() and not text[i + 1].isspace():
            return i
        i = text.rfind(NEWLINE, 0, i)
    return -1


class CharVocabulary:
    """One token per character: the sorted characters of a text (nanoGPT's shakespeare_char)."""

    def __init__(self, text: str) -> None:
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        return [self.index[c] for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i] for i in ids)


def build_tokenizer(recipe: Recipe, text: str, train_text: str) -> CharVocabulary | BPETokenizer:
    """The recipe's tokenizer: the character vocabulary of the whole text, or a byte-level BPE trained on
    the training text alone."""
    if recipe.tokenizer == "char":
        return CharVocabulary(text)
    tokenizer = BPETokenizer(vocab_size=recipe.vocab_size)
    tokenizer.train([train_text])
    return tokenizer


# ---------------------------------------------------------------------------------------- one side
@dataclass
class Runner:
    """One side of the race: its trainer, batches, clock and evaluations."""

    name: str
    recipe: Recipe
    trainer: Trainer
    tokenizer: Any
    val_data: LanguageModelingDataset
    val_chars: int
    val_bytes: int
    eval_batch_size: int
    seconds: float = 0.0
    curve: list[dict[str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._batches: Iterator[dict[str, torch.Tensor]] = self.trainer._batches()  # the trainer's own, endless

    @property
    def done(self) -> bool:
        return self.trainer.step >= self.recipe.steps

    def train(self, steps: int) -> None:
        """`steps` optimizer steps (fewer at the end of the budget), on this run's clock."""
        steps = min(steps, self.recipe.steps - self.trainer.step)
        device = self.trainer.device
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            self.trainer._optimizer_step([next(self._batches)])
        _synchronize(device)
        self.seconds += time.perf_counter() - start

    def evaluate(self) -> dict[str, float]:
        """Validation nats per character and bits per byte now, appended to the curve."""
        loader = PretrainDataLoader(self.val_data, self.eval_batch_size, shuffle=False)
        loss = self.trainer.evaluate(loader, max_batches=0)["val_loss"]  # mean over the predicted tokens
        nats = loss * (self.val_data.num_tokens() - 1)  # every token but the first (the line break) is predicted
        point = {"step": self.trainer.step, "seconds": self.seconds, "tokens": self.trainer.tokens_seen,
                 "val_loss_per_token": loss, "nats_per_char": nats / self.val_chars,
                 "bits_per_byte": nats / math.log(2) / self.val_bytes}
        self.curve.append(point)
        return point


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_runner(name: str, recipe: Recipe, text: str, train_text: str, val_text: str, *, device: torch.device,
                 precision: str, seed: int, eval_batch_size: int) -> Runner:
    """Tokenizer, datasets, model and trainer of one side, its optimizer set up for its budget."""
    tokenizer = build_tokenizer(recipe, text, train_text)
    train_ids = np.asarray(tokenizer.encode(train_text), dtype=np.int64)
    val_ids = np.asarray(tokenizer.encode(val_text), dtype=np.int64)
    if tokenizer.decode(val_ids[:1].tolist()) != NEWLINE:
        raise RuntimeError(f"{name}: the validation text does not start with a line-break token")
    if len(train_ids) < recipe.context:
        raise DataError(f"the training text has {len(train_ids)} {name} tokens, fewer than one window of "
                        f"{recipe.context}")
    if len(val_ids) < 2:
        raise DataError("the validation text is too short to score")
    torch.manual_seed(seed)
    config = MiniGPTConfig(**{**recipe.model, "vocab_size": len(tokenizer),
                              "max_position_embeddings": recipe.context,
                              "bos_token_id": None, "eos_token_id": None, "pad_token_id": None})
    model = MiniGPT(config)
    training = TrainingConfig(**{**recipe.training, "max_steps": recipe.steps, "batch_size": recipe.batch_size,
                                 "seed": seed, "precision": precision, "progress": False})
    trainer = Trainer(model, config=training, device=device,
                      train_data=LanguageModelingDataset(train_ids, max_length=recipe.context))
    trainer._setup_optimizer(recipe.steps)  # the trainer's own optimizer and schedule, as `train()` sets them up
    return Runner(name, recipe, trainer, tokenizer, LanguageModelingDataset(val_ids, max_length=recipe.context),
                  val_chars=len(val_text) - 1, val_bytes=len(val_text[1:].encode("utf-8")),
                  eval_batch_size=eval_batch_size)


# ---------------------------------------------------------------------------------------- the race
def run_race(text_path: str | Path, *, plain: Recipe | None = None, ours: Recipe | None = None,
             plain_steps: int | None = None, our_steps: int | None = None,
             eval_every: int = DEFAULT_EVAL_EVERY, val_fraction: float = DEFAULT_VAL_FRACTION,
             eval_chars: int | None = None, eval_batch_size: int = 64, device: str = "auto",
             precision: str = "fp32", threads: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Race `ours` against `plain` (default: `OURS`, `PLAIN`) on the text file `text_path` and return the
    settings, both runs (sizes, steps, tokens, training seconds, final validation nats per character
    and bits per byte, evaluation curve) and the outcome (see the module docstring). `plain_steps` and
    `our_steps` override the recipes' budgets; `threads` sets torch's CPU threads."""
    plain = copy.deepcopy(plain or PLAIN)
    ours = copy.deepcopy(ours or OURS)
    if plain_steps is not None:
        plain = dataclasses.replace(plain, steps=plain_steps)
    if our_steps is not None:
        ours = dataclasses.replace(ours, steps=our_steps)
    if eval_every < 1:
        raise ValueError(f"eval_every must be at least 1, got {eval_every}")
    if threads is not None:
        torch.set_num_threads(threads)
    resolved = resolve_device(device)
    text = read_race_text(text_path)
    train_text, val_text = split_text(text, val_fraction, eval_chars)
    runners = [build_runner(name, recipe, text, train_text, val_text, device=resolved, precision=precision,
                            seed=seed, eval_batch_size=eval_batch_size)
               for name, recipe in ((PLAIN_NAME, plain), (OURS_NAME, ours))]
    plain_run, our_run = runners

    # One round = `eval_every` steps of ours and the same share of plain's budget, so both runs spread
    # over the whole race and meet the same neighbours.
    rounds = math.ceil(ours.steps / eval_every)
    plain_chunk = math.ceil(plain.steps / rounds)
    pressure = [cpu_pressure()]
    log.info("race: %d rounds of %d plain and %d of our steps", rounds, plain_chunk, eval_every)
    while not (plain_run.done and our_run.done):
        if not plain_run.done:
            plain_run.train(plain_chunk)
        if not our_run.done:
            our_run.train(eval_every)
            point = our_run.evaluate()
            log.info("ours step %d: %.4f nats/char after %.1f s", point["step"], point["nats_per_char"],
                     point["seconds"])
        pressure.append(cpu_pressure())
    target = plain_run.evaluate()
    log.info("plain step %d: %.4f nats/char after %.1f s", target["step"], target["nats_per_char"],
             target["seconds"])

    known = [p for p in pressure if p is not None]
    return {
        "text": str(text_path),
        "chars": len(text),
        "train_chars": len(train_text),
        "val_chars": len(val_text) - 1,
        "val_bytes": len(val_text[1:].encode("utf-8")),
        "settings": {"device": str(resolved), "precision": precision, "threads": torch.get_num_threads(),
                     "seed": seed, "eval_every": eval_every, "rounds": rounds, "plain_steps_per_round": plain_chunk,
                     "val_fraction": val_fraction, "eval_chars": eval_chars, "torch": torch.__version__,
                     "machine": platform.machine(), "cpu_pressure_max": max(known) if known else None},
        "parameter_count": "distinct parameters (a tied head counts once); without embeddings: less the token "
                           "and position embeddings",
        PLAIN_NAME: _run_summary(plain_run),
        OURS_NAME: _run_summary(our_run),
        "outcome": time_to_target(our_run.curve, target["nats_per_char"], plain_run.seconds),
    }


def time_to_target(curve: list[dict[str, float]], target: float, plain_seconds: float) -> dict[str, Any]:
    """When a run whose evaluations are `curve` first reached `target` nats per character: the evaluation
    point (step and clock), the clock interpolated linearly in the loss between that evaluation and the one
    before, and the ratios of both to `plain_seconds`; `reached` False (and no times) when it never did."""
    outcome: dict[str, Any] = {"target_nats_per_char": target, "plain_seconds": plain_seconds, "reached": False,
                               "step": None, "seconds": None, "seconds_interpolated": None, "ratio": None,
                               "ratio_interpolated": None}
    for i, point in enumerate(curve):
        if point["nats_per_char"] <= target:
            seconds = interpolated = point["seconds"]
            if i > 0:
                before = curve[i - 1]
                share = (before["nats_per_char"] - target) / (before["nats_per_char"] - point["nats_per_char"])
                interpolated = before["seconds"] + share * (point["seconds"] - before["seconds"])
            outcome.update(reached=True, step=point["step"], seconds=seconds, seconds_interpolated=interpolated,
                           ratio=seconds / plain_seconds, ratio_interpolated=interpolated / plain_seconds)
            break
    return outcome


def _run_summary(runner: Runner) -> dict[str, Any]:
    recipe, model = runner.recipe, runner.trainer.base_model
    final = runner.curve[-1]
    return {
        "recipe": dataclasses.asdict(recipe),
        "tokenizer": recipe.tokenizer,
        "vocab_size": len(runner.tokenizer),
        "parameters": model.num_parameters(),
        "parameters_without_embeddings": model.num_parameters(exclude_embeddings=True),
        "steps": runner.trainer.step,
        "tokens": runner.trainer.tokens_seen,
        "seconds": runner.seconds,
        "val_tokens": runner.val_data.num_tokens(),
        "chars_per_token": runner.val_chars / max(runner.val_data.num_tokens() - 1, 1),
        "final_nats_per_char": final["nats_per_char"],
        "final_bits_per_byte": final["bits_per_byte"],
        "curve": runner.curve,
    }


# ---------------------------------------------------------------------------------------- the report
def format_race(result: dict[str, Any]) -> str:
    """The result of `run_race` as a plain-text table and a verdict line."""
    s, plain, ours, outcome = result["settings"], result[PLAIN_NAME], result[OURS_NAME], result["outcome"]

    def both(fn) -> list[str]:
        return [fn(plain), fn(ours)]

    def recipe_line(r: dict[str, Any]) -> str:
        t = r["recipe"]["training"]
        optimizer = "Muon + AdamW" if t.get("optimizer") == "muon" else "AdamW"
        return f"{optimizer}, {t.get('lr_schedule', 'cosine')}"

    rows = [
        ("tokenizer", both(lambda r: f"{r['tokenizer']} ({r['vocab_size']})")),
        ("model", both(lambda r: _architecture(r["recipe"]["model"]))),
        ("optimizer, schedule", both(recipe_line)),
        ("batch × context", both(lambda r: f"{r['recipe']['batch_size']} × {r['recipe']['context']}")),
        ("parameters", both(lambda r: f"{r['parameters']:,}")),
        ("  without embeddings", both(lambda r: f"{r['parameters_without_embeddings']:,}")),
        ("steps", both(lambda r: f"{r['steps']:,}")),
        ("tokens", both(lambda r: f"{r['tokens']:,}")),
        ("characters per token", both(lambda r: f"{r['chars_per_token']:.2f}")),
        ("training seconds", both(lambda r: f"{r['seconds']:.1f}")),
        ("final val nats/char", both(lambda r: f"{r['final_nats_per_char']:.4f}")),
        ("final val bits/byte", both(lambda r: f"{r['final_bits_per_byte']:.4f}")),
    ]
    target = outcome["target_nats_per_char"]
    if outcome["reached"]:
        rows.append((f"seconds to {target:.4f} nats/char",
                     [f"{plain['seconds']:.1f}",
                      f"{outcome['seconds']:.1f} (step {outcome['step']})"]))
    width = max(len(label) for label, _ in rows)
    widths = [max(len(v[i]) for _, v in rows) for i in range(2)]
    widths = [max(w, len(n)) for w, n in zip(widths, (PLAIN_NAME, OURS_NAME))]
    lines = [f"minillm bench race: {result['text']} ({result['chars']:,} characters; validation: "
             f"{result['val_chars']:,} characters after the first {result['train_chars']:,})",
             f"{s['device']}, {s['precision']}, {s['threads']} threads, torch {s['torch']}; ours evaluated every "
             f"{s['eval_every']} steps, the runs interleaved in {s['rounds']} rounds",
             "parameters: " + result["parameter_count"],
             "",
             "  ".join([" " * width, PLAIN_NAME.rjust(widths[0]), OURS_NAME.rjust(widths[1])])]
    lines += ["  ".join([label.ljust(width), values[0].rjust(widths[0]), values[1].rjust(widths[1])])
              for label, values in rows]
    lines.append("")
    if outcome["reached"]:
        lines.append(f"ours reached plain's final {target:.4f} nats/char in {outcome['ratio']:.2f}x plain's "
                     f"training time (at the evaluation of step {outcome['step']}; interpolated between "
                     f"evaluations: {outcome['ratio_interpolated']:.2f}x)")
    else:
        lines.append(f"ours did NOT reach plain's final {target:.4f} nats/char within its {ours['steps']} steps "
                     f"({ours['seconds']:.1f} s; ratio > {ours['seconds'] / plain['seconds']:.2f}x)")
    pressure = s.get("cpu_pressure_max")
    if pressure is not None and pressure > BUSY_PRESSURE:
        lines.append(f"note: other work competed for the CPU (up to {pressure:.0%} of the time); both runs met "
                     "it alike (interleaved), but absolute seconds are inflated")
    return "\n".join(lines)


def _architecture(model: dict[str, Any]) -> str:
    kind = "GPT-2" if model.get("norm_type") == "layernorm" else "Llama"
    if model.get("qk_norm"):
        kind += "+QK-norm"
    return f"{kind} {model['num_hidden_layers']}×{model['hidden_size']}"


# ---------------------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `minillm bench race` options."""
    parser.add_argument("--text", required=True, type=Path, help="a UTF-8 text file to train and validate on")
    parser.add_argument("--steps", type=int, help=f"plain's optimizer steps (default: {PLAIN.steps})")
    parser.add_argument("--our-steps", type=int, help=f"our optimizer steps (default: {OURS.steps})")
    parser.add_argument("--eval-every", type=int, default=DEFAULT_EVAL_EVERY,
                        help=f"evaluate ours every N steps (default: {DEFAULT_EVAL_EVERY})")
    parser.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION,
                        help=f"the last part of the text held out for validation (default: {DEFAULT_VAL_FRACTION})")
    parser.add_argument("--eval-chars", type=int,
                        help="score only the first lines of the validation text, about this many characters "
                             "(default: all of it)")
    parser.add_argument("--set", action="append", default=[], metavar="SIDE.KEY=VALUE", dest="overrides",
                        help="change a recipe, repeatable: plain.batch_size=32, ours.vocab_size=1024, "
                             "ours.training.muon_lr=0.03, ours.model.qk_norm=false")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ... (default: auto)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16", "auto"),
                        help="training precision of both runs (default: fp32)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the result as JSON here")


def apply_overrides(plain: Recipe, ours: Recipe, overrides: Sequence[str]) -> tuple[Recipe, Recipe]:
    """Copies of the recipes with `side.key=value` overrides (`side` plain or ours; `key` a Recipe field, or
    `model.FIELD` / `training.FIELD`; the value read as YAML)."""
    recipes = {PLAIN_NAME: copy.deepcopy(plain), OURS_NAME: copy.deepcopy(ours)}
    for item in overrides:
        key, sep, raw = item.partition("=")
        side, _, name = key.partition(".")
        if not sep or side not in recipes or not name:
            raise ValueError(f"--set {item!r}: expected plain.KEY=VALUE or ours.KEY=VALUE")
        value = yaml.safe_load(raw)
        recipe = recipes[side]
        section, _, sub = name.partition(".")
        if sub and section in ("model", "training"):
            getattr(recipe, section)[sub] = value
        elif not sub and name in {f.name for f in dataclasses.fields(Recipe)} - {"model", "training"}:
            recipes[side] = dataclasses.replace(recipe, **{name: value})
        else:
            raise ValueError(f"--set {item!r}: unknown key {name!r} (a recipe field, model.FIELD or training.FIELD)")
    return recipes[PLAIN_NAME], recipes[OURS_NAME]


def run_from_args(args: argparse.Namespace) -> int:
    """Run the race from parsed `add_arguments` options, print the table, write `--out`; exit status."""
    plain, ours = apply_overrides(PLAIN, OURS, args.overrides)
    result = run_race(args.text, plain=plain, ours=ours, plain_steps=args.steps, our_steps=args.our_steps,
                      eval_every=args.eval_every, val_fraction=args.val_fraction, eval_chars=args.eval_chars,
                      device=args.device, precision=args.precision, threads=args.threads, seed=args.seed)
    return report(format_race(result), result, args.out)


__all__ = ["OURS", "PLAIN", "CharVocabulary", "Recipe", "add_arguments", "apply_overrides", "build_runner",
           "format_race", "read_race_text", "run_from_args", "run_race", "split_text", "time_to_target"]
