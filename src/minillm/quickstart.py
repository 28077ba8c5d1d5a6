"""`minillm quickstart`: the whole pipeline on the built-in data, ending in a report card.

    tokenizer → pretraining → SFT → DPO and GRPO (each from the SFT model) → evaluation → chat

Each stage is the shipped run config (`configs/{pretrain,sft,dpo,grpo}_tiny.yaml`) in its own directory
under `out_dir`, started from the previous stage's `final/`; `key=value` overrides reach into a stage
(`grpo.max_steps=100`). After each stage the model answers held-out built-in word problems (greedy, never
seen in training) and its perplexity on held-out built-in text is measured; `report.md` then gathers the
environment, time, tokens, validation metrics and accuracy of every stage, sample conversations and the
training plots. A stage that finished is not run again (its `result.json`), one that was stopped resumes
from its newest checkpoint, so running the command again after an interruption picks up where it was.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import minillm
from minillm.data.builtin import builtin_corpus
from minillm.device import resolve_device
from minillm.evaluation.perplexity import evaluate_perplexity
from minillm.evaluation.word_problems import evaluate_word_problems
from minillm.inference.generator import GenerationConfig, TextGenerator
from minillm.io import atomic_write_json, atomic_write_text
from minillm.model.transformer import MiniGPT
from minillm.recipes.config import RunConfigError, load_run_config
from minillm.recipes.run import run_stage
from minillm.tokenizer import BPETokenizer
from minillm.training.mfu import device_name
from minillm.training.precision import resolve_precision

logger = logging.getLogger("minillm.quickstart")

__all__ = ["STAGES", "Stage", "run_quickstart", "unigram_entropy", "write_report"]


@dataclass(frozen=True)
class Stage:
    name: str
    config: str  # the shipped run config it starts from
    init_from: str | None  # the stage whose final/ it starts from
    chat: bool  # asked in the chat template (what SFT teaches) or as plain text (the pretraining layout)
    overrides: dict[str, Any] = field(default_factory=dict)
    what: str = ""


STAGES = (
    # 800 steps rather than the config's 300: the 1M model then learns some arithmetic, which is what
    # the later stages have to work with (300 steps teach the answer format but hardly the sums). With
    # Muon a step costs ~10% more than AdamW's, so 800 Muon steps take the time 900 AdamW steps took.
    Stage("pretrain", "pretrain_tiny", None, chat=False, overrides={"max_steps": 800, "eval_every": 400},
          what="next-token prediction on the built-in stories and word problems"),
    Stage("sft", "sft_tiny", "pretrain", chat=True, what="assistant-only loss on the built-in conversations"),
    Stage("dpo", "dpo_tiny", "sft", chat=True, what="DPO (+ RPO term) on right-vs-wrong answer pairs"),
    Stage("grpo", "grpo_tiny", "sft", chat=True, what="GRPO, 8 replies per prompt scored by the answer checker"),
)
ALIGNMENT = ("dpo", "grpo")
EVAL_FILE = "quickstart_eval.json"
CHAT_PROMPTS = ("你是谁？", "讲一个关于小猫的故事。", "Tell me a story about a dog.")


def unigram_entropy(documents: list[str], tokenizer: Any) -> float:
    """Entropy (nats per token) of the corpus' token frequencies: the loss of a model that ignores context."""
    counts = torch.bincount(torch.tensor([t for ids in tokenizer.encode_batch(documents) for t in ids]))
    probs = counts[counts > 0].double() / counts.sum()
    return float(-(probs * probs.log()).sum())


def _stage_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, list[str]]:
    by_stage: dict[str, list[str]] = {s.name: [] for s in STAGES}
    for item in overrides:
        key, sep, raw = item.partition("=")
        head, dot, rest = key.partition(".")
        if not sep or head not in by_stage or not dot or not rest:
            raise RunConfigError(f"override {item!r} must look like STAGE.key=value with STAGE one of "
                                 f"{', '.join(by_stage)} (e.g. grpo.max_steps=100)")
        by_stage[head].append(f"{rest}={raw}")
    return by_stage


def _stage_config(stage: Stage, out_dir: Path, overrides: list[str]) -> dict[str, Any]:
    values = {**stage.overrides, "out_dir": str(out_dir / stage.name), "resume": None,
              "init_from": str(out_dir / stage.init_from / "final") if stage.init_from else None}
    config = load_run_config(stage.config, overrides, values)
    for key in ("out_dir", "init_from"):
        if config[key] != values[key]:
            raise RunConfigError(f"quickstart: {stage.name}.{key} is set by the pipeline; remove the override")
    return config


def evaluate_stage(stage: Stage, stage_dir: Path, problems: int, held_out_text: list[str]) -> dict[str, Any]:
    """Held-out word-problem accuracy, perplexity on held-out text and sample replies of `stage_dir/final`
    (cached in the stage's directory, so a rerun does not evaluate again)."""
    cache = stage_dir / EVAL_FILE
    if cache.is_file():
        saved = json.loads(cache.read_text(encoding="utf-8"))
        if saved.get("problems") == problems:
            return saved
    started = time.time()
    model = MiniGPT.from_pretrained(stage_dir / "final").eval()
    tokenizer = BPETokenizer.from_pretrained(stage_dir / "final")
    generator = TextGenerator(model, tokenizer, fast_decode=False)  # the same answers every run (see "auto")
    answered = evaluate_word_problems(generator, problems, chat=stage.chat)
    result: dict[str, Any] = {
        "problems": problems, "accuracy": answered.accuracy, "format": "chat" if stage.chat else "plain text",
        "examples": [{"question": e["question"], "answer": e["response"].strip(), "expected": e["expected"]}
                     for e in answered.examples[:3]],
    }
    text = evaluate_perplexity(model, tokenizer, held_out_text)
    result.update(heldout_text_loss=text.loss, heldout_text_perplexity=text.perplexity,
                  heldout_next_token_accuracy=text.accuracy, heldout_text_tokens=text.tokens)
    if stage.chat:
        config = GenerationConfig(max_new_tokens=64, do_sample=False)
        result["conversations"] = [{"user": q, "assistant": generator.chat([{"role": "user", "content": q}],
                                                                           config).strip()}
                                   for q in CHAT_PROMPTS]
    else:
        config = GenerationConfig(max_new_tokens=60, temperature=0.8, top_p=0.95, seed=0)
        result["samples"] = [{"prompt": p, "continuation": generator.generate(p, config).rstrip()}
                             for p in ("春天的一个早晨，", "One sunny day, Tom")]
    result["seconds"] = round(time.time() - started, 1)
    atomic_write_json(cache, result)
    return result


def environment() -> dict[str, Any]:
    device = resolve_device("auto")
    precision = resolve_precision("auto", device)
    return {
        "minillm": minillm.__version__, "python": platform.python_version(), "torch": torch.__version__,
        "platform": platform.platform(), "cpu": device_name("cpu"), "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(), "device": device_name(device) if device.type != "cpu" else "cpu",
        "precision": str(precision or torch.float32).removeprefix("torch."),
    }


def run_quickstart(out_dir: str | Path = "runs/quickstart", overrides: list[str] | tuple[str, ...] = (),
                   problems: int = 200, stages: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Run the pipeline (or the named `stages`, each needing its predecessor's final/), evaluate each stage
    and write `out_dir/report.md` and `report.json`; returns what the report shows."""
    out_dir = Path(out_dir)
    started = time.time()
    selected = [s for s in STAGES if stages is None or s.name in stages]
    by_stage = _stage_overrides(overrides)
    configs = {s.name: _stage_config(s, out_dir, by_stage[s.name]) for s in selected}  # fail before training
    held_out_text = builtin_corpus(200, seed=99_991)  # a seed no stage trains on
    report: dict[str, Any] = {"environment": environment(), "problems": problems, "stages": {}}
    for i, stage in enumerate(selected, 1):
        print(f"[{i}/{len(selected)}] {stage.name}: {stage.what}", flush=True)
        result = run_stage(configs[stage.name])
        evaluation = evaluate_stage(stage, out_dir / stage.name, problems, held_out_text)
        report["stages"][stage.name] = {"config": stage.config, "what": stage.what, "result": result,
                                        "evaluation": evaluation}
        print(f"    {_seconds(result.get('total_seconds', result.get('seconds', 0)))}, held-out word problems "
              f"{evaluation['accuracy']:.1%} ({evaluation['format']})", flush=True)
    if "pretrain" in report["stages"]:
        tokenizer = BPETokenizer.from_pretrained(out_dir / "pretrain" / "final")
        report["unigram_entropy"] = unigram_entropy(held_out_text, tokenizer)
    report["minutes"] = round((time.time() - started) / 60, 2)
    path = write_report(out_dir, report)
    print(f"\nreport card: {path}  ({report['minutes']:.1f} min)")
    return report


def _seconds(value: float) -> str:
    return f"{value:.0f} s" if value < 120 else f"{value / 60:.1f} min"


def _validation(result: dict[str, Any]) -> str:
    """The stage's own validation metrics (loss for LM stages, DPO loss and reward accuracy, val_reward)."""
    shown = []
    for key, value in result.items():
        if key.startswith("val_") and isinstance(value, (int, float)):
            shown.append(f"{key} {value:.3f}" if abs(value) < 1e4 else f"{key} {value:.3g}")
    return ", ".join(shown) or "—"


def write_report(out_dir: str | Path, report: dict[str, Any]) -> Path:
    """`out_dir/report.md` (and the numbers in `report.json`) from `run_quickstart`'s measurements."""
    out_dir = Path(out_dir)
    stages = report["stages"]
    env = report["environment"]
    lines = ["# Mini-LLM quickstart report card", ""]
    lines += [f"The whole pipeline on the built-in data in {report['minutes']:.1f} min. Accuracy is on "
              f"{report['problems']} held-out built-in word problems (never trained on), answered greedily and "
              "scored by the built-in checker; the pretrained model is asked in the plain-text layout of its "
              "corpus, the others in the chat template.", ""]
    lines += ["## Stages", "",
              "| stage | config | time | steps | tokens | validation | held-out text: loss (ppl), next-token acc. | "
              "accuracy | change |",
              "|---|---|---|---|---|---|---|---|---|"]
    sft_accuracy = stages.get("sft", {}).get("evaluation", {}).get("accuracy")
    previous = None
    for name, stage in stages.items():
        result, evaluation = stage["result"], stage["evaluation"]
        accuracy = evaluation["accuracy"]
        reference = sft_accuracy if name in ALIGNMENT else previous
        change = "—" if reference is None else f"{(accuracy - reference) * 100:+.1f} pts"
        loss, next_token = evaluation["heldout_text_loss"], evaluation["heldout_next_token_accuracy"]
        lines.append(f"| {name} | `{stage['config']}` | {_seconds(result.get('total_seconds', result.get('seconds', 0)))}"
                     f" | {result.get('steps', '—')} | {result.get('tokens', 0):,} | {_validation(result)} | "
                     f"{loss:.3f} ({math.exp(min(loss, 50)):.1f}), {next_token:.1%} | {accuracy:.1%} | {change} |")
        previous = accuracy
    lines += ["", "Tokens are the tokens trained on (for GRPO: the sampled replies). The validation column is each "
              "stage's own metric: loss in nats/token for pretraining and SFT, the DPO loss and reward "
              "accuracy on held-out pairs, GRPO's greedy reward on held-out prompts. \"change\" compares DPO and "
              "GRPO with the SFT model they start from, the others with the stage before. The held-out text is 200 "
              "built-in documents no stage trained on (`minillm.evaluation.evaluate_perplexity`)."]
    if "unigram_entropy" in report:
        lines += ["", f"A model that ignores context (unigram frequencies) would score "
                  f"{report['unigram_entropy']:.3f} nats/token on the held-out text."]
    lines += ["", "## Environment", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in env.items()]
    lines += ["", "## Sample conversations", ""]
    for name, stage in stages.items():
        evaluation = stage["evaluation"]
        lines += [f"### {name}", ""]
        for sample in evaluation.get("samples", []):
            lines += [f"- **{sample['prompt']}**{_one_line(sample['continuation'])}"]
        for turn in evaluation.get("conversations", []):
            lines += [f"- **user:** {turn['user']}", f"  **assistant:** {_one_line(turn['assistant'])}"]
        for example in evaluation["examples"]:
            lines += [f"- **problem:** {example['question']}", f"  **answer:** {_one_line(example['answer'])} "
                      f"(expected {example['expected']})"]
        lines.append("")
    lines += ["## Training curves", ""]
    for name in stages:
        plots = sorted((out_dir / name / "plots").glob("*.png"))
        if plots:
            lines += [f"### {name}", "", *[f"![{name} {p.stem}]({name}/plots/{p.name})" for p in plots], ""]
    lines += ["## Next", "", f"- chat: `minillm chat {out_dir / _best_chat_stage(stages) / 'final'}`",
              f"- serve: `minillm serve {out_dir / _best_chat_stage(stages) / 'final'}`",
              f"- export: `minillm export hf {out_dir / 'sft' / 'final'} --out exported/quickstart`", ""]
    atomic_write_json(out_dir / "report.json", report)
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def _one_line(text: str) -> str:
    """A reply inside a markdown list item: line breaks shown as ⏎, markup characters escaped."""
    return text.replace("\n", " ⏎ ").replace("|", "\\|").replace("*", "\\*") or "(empty)"


def _best_chat_stage(stages: dict[str, Any]) -> str:
    chat = {name: s["evaluation"]["accuracy"] for name, s in stages.items() if name != "pretrain"}
    return max(chat, key=chat.get) if chat else "pretrain"


def chat_with_best(out_dir: str | Path, report: dict[str, Any]) -> None:
    """A terminal chat with the aligned model that answered the most held-out problems."""
    from minillm.inference.chat import ChatSession, run_chat

    name = _best_chat_stage(report["stages"])
    directory = Path(out_dir) / name / "final"
    print(f"\nchatting with {directory} (the best held-out accuracy); /exit to leave")
    generator = TextGenerator(MiniGPT.from_pretrained(directory).eval(), BPETokenizer.from_pretrained(directory))
    run_chat(ChatSession(generator))


def interactive() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()
