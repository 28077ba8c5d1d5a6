"""The `minillm` command: a thin layer of argument parsing over the library; no logic of its own."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

EXAMPLES = {
    "tokenizer train": """examples:
  minillm tokenizer train --data builtin --vocab-size 4096 --out runs/tokenizer
  minillm tokenizer train --data corpus.txt --vocab-size 8000 --out runs/tokenizer""",
    "train": """examples:
  minillm train --config configs/pretrain_tiny.yaml
  minillm train --config pretrain_tiny max_steps=100 model.preset=micro training.lr=5e-4
  minillm train --preset micro --data corpus.txt --epochs 5 --out-dir runs/mine
  minillm train --config pretrain_tiny save_every=50 --resume      # continue after a crash or Ctrl-C
  minillm train --config pretrain_small --dry-run                    # memory estimate, nothing allocated""",
    "generate": """examples:
  minillm generate runs/pretrain_tiny/final --prompt "小明有3个苹果"
  minillm generate runs/pretrain_tiny/final --prompt "Once" --temperature 0 --max-new-tokens 40""",
    "chat": """examples:
  minillm chat runs/sft_tiny/final
  minillm chat runs/sft_tiny/final --system "你是一个乐于助人的助手。" --temperature 0
in the chat: /reset clears the conversation, /system TEXT sets the system prompt, /exit leaves""",
    "data download": """examples:
  minillm data download --list
  minillm data download tinyshakespeare --out data/raw
  minillm data download https://example.com/corpus.jsonl --sha256 HEX --out data/raw
  minillm data download hf:roneneldan/TinyStories/TinyStories-valid.txt --out data/raw""",
    "data prepare": """examples:
  minillm data prepare raw.jsonl --out data/clean --val-fraction 0.02
  minillm data prepare sft_a.jsonl sft_b.json --kind conversation --out data/sft --skip-bad
  minillm data prepare corpus/ --out data/clean --min-chars 50 --sample 0.1 --normalize NFKC""",
    "data inspect": """examples:
  minillm data inspect data/clean/train.jsonl
  minillm data inspect corpus.txt --tokenizer runs/pretrain_tiny/final
  minillm data inspect runs/pretrain_tiny/data""",
    "tokenizer eval": """examples:
  minillm tokenizer eval --data builtin --tokenizer runs/pretrain_tiny/final --tokenizer cl100k_base
  minillm tokenizer eval --data corpus.txt --tokenizer gpt2 --tokenizer runs/tok""",
    "serve": """examples:
  minillm serve runs/sft_tiny/final                       # http://127.0.0.1:8000: chat page and /v1 API
  minillm serve runs/sft_tiny/final --port 8080 --api-key secret --model-name mini
  # OpenAI clients then use base_url http://127.0.0.1:8080/v1, api_key secret, model mini""",
    "plot": """examples:
  minillm plot runs/pretrain_tiny""",
    "eval": """examples:
  minillm eval runs/pretrain_tiny/final --perplexity data/clean/val.jsonl
  minillm eval runs/pretrain_tiny/final --perplexity book.txt --max-length 256 --stride 128
  minillm eval runs/sft_tiny/final --multiple-choice ceval/val --few-shot 5 --out ceval.json
  minillm eval runs/sft_tiny/final --multiple-choice cmmlu/test/agronomy.csv --method letter
  minillm eval runs/sft_tiny/final --word-problems 200 --references qa.jsonl --out results.json
  minillm eval runs/pretrain_tiny/final --references prompts.jsonl --prompt-format plain
  minillm eval runs/classifier/final --classification builtin
  minillm eval runs/classifier/final --classification test.jsonl --vocab vocab.json
several tasks in one call print one table each; --out saves them all as JSON""",
    "export onnx": """examples:
  minillm export onnx runs/sft_tiny/final --out exported/sft_tiny_onnx
  minillm export onnx runs/sft_tiny/final --out exported/sft_tiny_onnx_kv --kv-cache
then: onnxruntime.InferenceSession("exported/sft_tiny_onnx/model.onnx").run(None, {"input_ids": ..., "attention_mask": ...})""",
    "export hf": """examples:
  minillm export hf runs/sft_tiny/final --out exported/sft_tiny
  minillm export hf runs/sft_tiny/final --out exported/sft_bf16 --dtype bfloat16
then, in Python: transformers.AutoModelForCausalLM.from_pretrained("exported/sft_tiny")""",
    "bench": """examples:
  minillm bench --quick                    # seconds: the tiny preset against transformers' LlamaForCausalLM
  minillm bench --preset micro --threads 1 --out bench.json
  minillm bench --preset mini --compile    # also a torch.compile'd copy of our model
  minillm bench race --text data/raw/tinyshakespeare.txt --threads 1   # plain recipe against ours, same size
on a shared machine use --threads below the number of cores: a descheduled OpenMP thread stalls every op""",
    "bench race": """examples:
  minillm data download tinyshakespeare --out data/raw
  minillm bench race --text data/raw/tinyshakespeare.txt --threads 1 --out race.json
  minillm bench race --text corpus.txt --steps 500 --our-steps 200 --eval-every 20     # a shorter race
  minillm bench race --text corpus.txt --set ours.training.muon_lr=0.03 --set ours.vocab_size=2048
the table gives each recipe's parameters, steps, training seconds and final validation nats per character and
bits per byte, and how long ours took to reach plain's final loss, as a ratio of plain's time""",
    "quickstart": """examples:
  minillm quickstart                       # about 8 minutes on a 2-core CPU; writes runs/quickstart/report.md
  minillm quickstart grpo.max_steps=200    # any stage's run config key: pretrain., sft., dpo., grpo.
  minillm quickstart --no-chat             # run again after a stop: finished stages are skipped""",
}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `minillm train: error: argument --batch-size: invalid int value: 'x'
    (see minillm train --help)`, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="minillm", description="Train small language models from scratch, Chinese first.",
        epilog="Run `minillm COMMAND --help` for a command's options and examples.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also MINILLM_DEBUG=1); anywhere on the line")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_tokenizer, _add_data, _add_train, _add_generate_and_chat, _add_serve,
                _add_eval, _add_export, _add_plot, _add_bench, _add_quickstart):
        add(commands)
    return parser


def _command(parent, name: str, help_text: str, key: str | None = None) -> argparse.ArgumentParser:
    """A (sub)command whose help shows its description and its examples (`EXAMPLES[key or name]`)."""
    return parent.add_parser(name, help=help_text, description=help_text, epilog=EXAMPLES.get(key or name),
                             formatter_class=argparse.RawDescriptionHelpFormatter)


def _group(commands: argparse._SubParsersAction, name: str, help_text: str,
           metavar: str = "ACTION") -> argparse._SubParsersAction:
    """A command with actions of its own (`minillm NAME ACTION`); the action is `args.NAME_command`."""
    return commands.add_parser(name, help=help_text).add_subparsers(dest=f"{name}_command", required=True,
                                                                    metavar=metavar)


def _sampling_flags(sub: argparse.ArgumentParser, max_new_tokens: int, temperature: float, top_p: float) -> None:
    sub.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    sub.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    sub.add_argument("--top-k", type=int, default=0)
    sub.add_argument("--top-p", type=float, default=top_p)
    sub.add_argument("--repetition-penalty", type=float, default=1.0)
    sub.add_argument("--seed", type=int)


def _add_tokenizer(commands: argparse._SubParsersAction) -> None:
    """`tokenizer train` and `tokenizer eval`."""
    tokenizer_commands = _group(commands, "tokenizer", "train or compare tokenizers")
    tok_train = _command(tokenizer_commands, "train", "train a byte-level BPE tokenizer on a corpus",
                         "tokenizer train")
    tok_train.add_argument("--data", default="builtin", help="'builtin' or a text/JSONL file or directory")
    tok_train.add_argument("--vocab-size", type=int, default=4096,
                           help="tokens in all, at least 260 (256 byte symbols and 4 special tokens)")
    tok_train.add_argument("--num-documents", type=int, default=20000,
                           help="documents of the built-in corpus to train on")
    tok_train.add_argument("--text-field", default="text", help="JSONL field holding the text")
    tok_train.add_argument("--out", required=True, help="directory to save the tokenizer to")
    tok_train.add_argument("--overwrite", action="store_true", help="replace --out if it is not empty (else refused)")
    tok_eval = _command(tokenizer_commands, "eval", "compare tokenizers on a corpus: characters and bytes per token",
                        "tokenizer eval")
    tok_eval.add_argument("--data", default="builtin", help="'builtin' or a text/JSONL file or directory")
    tok_eval.add_argument("--tokenizer", action="append", required=True, dest="tokenizers",
                          help="a tokenizer directory, tokenizer.json, or tiktoken name (gpt2, cl100k_base); repeat")
    tok_eval.add_argument("--max-documents", type=int, default=2000,
                          help="compare on this many documents (each cut to its first 2M characters)")


def _add_data(commands: argparse._SubParsersAction) -> None:
    """`data download`, `data prepare`, `data inspect`."""
    data_commands = _group(commands, "data", "download, prepare and inspect datasets")
    download = _command(data_commands, "download", "download a named public dataset, a URL or a Hub dataset",
                        "data download")
    download.add_argument("name", nargs="?", help="a registry name (see --list), an http(s) URL, or hf:owner/name[/path]")
    download.add_argument("--out", default="data/raw", help="directory to download into")
    download.add_argument("--sha256", help="expected digest of a single URL")
    download.add_argument("--force", action="store_true", help="download again even if present and verified")
    download.add_argument("--list", action="store_true", help="list the registry and exit")
    prepare = _command(data_commands, "prepare",
                       "clean, de-duplicate, filter, sample and split a dataset, with a report", "data prepare")
    prepare.add_argument("inputs", nargs="+", help="text/JSONL/JSON files or directories")
    prepare.add_argument("--out", required=True, help="output directory (train.jsonl, val.jsonl, report.json)")
    prepare.add_argument("--kind", choices=("text", "conversation", "preference", "labelled"),
                         help="record kind (default: detected from the first record)")
    prepare.add_argument("--normalize", default="NFC", choices=("NFC", "NFKC", "none"),
                         help="Unicode normalisation (NFKC also turns full-width punctuation into ASCII)")
    prepare.add_argument("--min-chars", type=int, default=1)
    prepare.add_argument("--max-chars", type=int)
    prepare.add_argument("--no-dedup", action="store_true", help="keep exact duplicates")
    prepare.add_argument("--near-dup-threshold", type=float, default=0.8,
                         help="MinHash Jaccard similarity at which a record counts as a near duplicate")
    prepare.add_argument("--no-near-dup", action="store_true", help="skip near-duplicate removal")
    prepare.add_argument("--sample", type=float, help="keep this fraction (0-1] or this many records (> 1)")
    prepare.add_argument("--val-fraction", type=float, default=0.0)
    prepare.add_argument("--seed", type=int, default=0)
    prepare.add_argument("--skip-bad", action="store_true", help="skip and count malformed records instead of stopping")
    prepare.add_argument("--overwrite", action="store_true",
                         help="replace --out if it is not empty (else refused; its old contents are deleted)")
    inspect = _command(data_commands, "inspect", "record counts, lengths and a length histogram", "data inspect")
    inspect.add_argument("path", help="a text/JSONL/JSON file or directory, or a token shard directory")
    inspect.add_argument("--tokenizer", help="count tokens with this tokenizer (directory or tiktoken name)")


def _add_train(commands: argparse._SubParsersAction) -> None:
    """`train`."""
    train = _command(commands, "train", "train a model from a YAML config and/or flags")
    train.add_argument("--config", help="a YAML run config, or the name of one in configs/")
    train.add_argument("overrides", nargs="*", metavar="key=value",
                       help="config overrides, dotted for sections (model.preset=micro)")
    train.add_argument("--preset", help="model preset (model.preset)")
    train.add_argument("--data", help="'builtin' or a text/JSONL file or directory (data.source)")
    train.add_argument("--tokenizer", help="a tokenizer directory, tokenizer.json or tiktoken name "
                       "(gpt2, cl100k_base) (tokenizer.path); default: train one on the data")
    train.add_argument("--epochs", type=float)
    train.add_argument("--max-steps", type=int)
    train.add_argument("--batch-size", type=int, help="micro-batch size (training.batch_size)")
    train.add_argument("--lr", type=float, help="peak learning rate (training.lr)")
    train.add_argument("--optimizer", choices=("adamw", "muon"),
                       help="adamw, or muon on the hidden matrices with AdamW on the rest (training.optimizer)")
    train.add_argument("--max-length", type=int, help="tokens per window (data.max_length)")
    train.add_argument("--out-dir")
    train.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"))
    train.add_argument("--seed", type=int)
    train.add_argument("--distributed", choices=("none", "ddp", "fsdp"),
                       help="data parallelism under torchrun: torchrun --nproc_per_node=N -m minillm train "
                       "... --distributed ddp (batch size is per process)")
    train.add_argument("--dry-run", action="store_true",
                       help="print the memory one training step needs (weights, gradients, optimizer, "
                       "activations) and exit without building anything")
    train.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                       help="continue a run exactly: from the newest checkpoint in out_dir, or from CHECKPOINT")
    train.add_argument("--overwrite", action="store_true", default=None,
                       help="start a new run in an out_dir that holds another run's checkpoints, deleting them "
                       "(without it that is refused)")
    # The transformers/TRL spellings are accepted as they are (`--max_steps 20`, `--learning_rate 3e-4`),
    # hidden from --help: the same settings under the names those users type.
    for alias, dest, kind in (("--max_steps", "max_steps", int), ("--learning_rate", "lr", float),
                              ("--num_train_epochs", "epochs", float), ("--batch_size", "batch_size", int),
                              ("--per_device_train_batch_size", "batch_size", int), ("--max_length", "max_length", int),
                              ("--output_dir", "out_dir", str), ("--out_dir", "out_dir", str)):
        train.add_argument(alias, dest=dest, type=kind, help=argparse.SUPPRESS)


def _add_generate_and_chat(commands: argparse._SubParsersAction) -> None:
    """`generate` and `chat`."""
    generate = _command(commands, "generate", "generate text from a checkpoint")
    generate.add_argument("checkpoint", help="a model directory (e.g. runs/pretrain_tiny/final)")
    generate.add_argument("--prompt", action="append", required=True,
                          help="prompt text; repeat for a batch")
    _sampling_flags(generate, max_new_tokens=100, temperature=0.8, top_p=0.95)

    chat = _command(commands, "chat", "talk with a checkpoint in the terminal (multi-turn, streamed)")
    chat.add_argument("checkpoint", help="a model directory with a chat template (e.g. runs/sft_tiny/final)")
    chat.add_argument("--system", help="system prompt")
    _sampling_flags(chat, max_new_tokens=256, temperature=0.7, top_p=0.9)


def _add_serve(commands: argparse._SubParsersAction) -> None:
    """`serve`."""
    serve = _command(commands, "serve", "serve a checkpoint over an OpenAI-compatible HTTP API, with a chat page")
    serve.add_argument("checkpoint", help="a model directory (e.g. runs/sft_tiny/final)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default: this machine only; 0.0.0.0 for every interface)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=os.environ.get("MINILLM_API_KEY"),
                       help="require 'Authorization: Bearer KEY' on /v1/ requests (default: $MINILLM_API_KEY)")
    serve.add_argument("--model-name", action="append",
                       help="the model id /v1/models lists and responses carry (default: from CHECKPOINT's path, "
                            "e.g. sft_tiny-final); repeat to add aliases requests may name too")
    serve.add_argument("--max-tokens-limit", type=int, default=1024,
                       help="the largest max_tokens a request may ask for, and the default")
    serve.add_argument("--max-concurrent", type=int, default=32,
                       help="requests admitted at once (one generates, the rest wait in line); more get 503")
    serve.add_argument("--request-timeout", type=float, default=30.0, metavar="SECONDS",
                       help="time a client has to send a request's head, then its body; slower ones get 408 "
                            "(default: 30)")
    serve.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")


def _add_eval(commands: argparse._SubParsersAction) -> None:
    """`eval`."""
    evaluate = _command(commands, "eval", "evaluate a checkpoint: perplexity, label-token classification, multiple "
                        "choice (C-Eval/CMMLU), word problems, BLEU/ROUGE against references")
    evaluate.add_argument("checkpoint", help="a model directory (e.g. runs/sft_tiny/final)")
    evaluate.add_argument("--perplexity", action="append", metavar="FILE",
                          help="perplexity and next-token accuracy on a text file (one document), a JSONL of "
                               "{text} or conversations (assistant tokens scored), or a directory; repeat")
    evaluate.add_argument("--max-length", type=int,
                          help="perplexity window in tokens (default: the model's context)")
    evaluate.add_argument("--stride", type=int, help="perplexity: tokens between windows (default: half a window)")
    evaluate.add_argument("--classification", action="append", metavar="FILE_OR_builtin",
                          help="label-token classification on a JSONL of {tokens, label}, or 'builtin' "
                               "(held-out built-in labelled sequences); repeat")
    evaluate.add_argument("--vocab", help="word-level vocab.json for --classification (default: the "
                                          "checkpoint's vocab.json, or the built-in vocabulary for 'builtin')")
    evaluate.add_argument("--multiple-choice", action="append", metavar="PATH",
                          help="C-Eval/CMMLU CSV, JSONL, or a directory of them; repeat")
    evaluate.add_argument("--few-shot", type=int, default=0, metavar="K", help="answered dev examples per prompt")
    evaluate.add_argument("--dev", help="dev questions for --few-shot (default: {subject}_dev.csv beside the "
                                        "questions or in a sibling dev/ directory)")
    evaluate.add_argument("--method", choices=("letter", "option", "both"), default="both",
                          help="multiple choice: the answer letter's likelihood, the option text's "
                               "(per character), or both")
    evaluate.add_argument("--word-problems", type=int, metavar="N",
                          help="answer N held-out built-in word problems (greedy) and check them")
    evaluate.add_argument("--references", action="append", metavar="FILE",
                          help="JSONL of {prompt, reference(s)}: greedy replies scored with BLEU and ROUGE; repeat")
    evaluate.add_argument("--prompt-format", choices=("chat", "plain"), default="chat",
                          help="word problems and references: through the chat template (SFT models) or as "
                               "plain text (pretrained models)")
    evaluate.add_argument("--max-new-tokens", type=int,
                          help="generation length (default: 48 for word problems, 128 for references)")
    evaluate.add_argument("--bleu-tokenize", default="auto",
                          help="sacrebleu tokenizer (auto: zh for Chinese references, else 13a)")
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    evaluate.add_argument("--out", help="write every result as JSON to this file")


def _add_export(commands: argparse._SubParsersAction) -> None:
    """`export hf`, `export onnx`, `export gguf`."""
    export_commands = _group(commands, "export", "export a checkpoint for other tools", metavar="FORMAT")

    def export_format(name: str, help_text: str, out_help: str, overwrite_help: str) -> argparse.ArgumentParser:
        parser = _command(export_commands, name, help_text, f"export {name}")
        parser.add_argument("checkpoint", help="a model directory (e.g. runs/sft_tiny/final)")
        parser.add_argument("--out", required=True, help=out_help)
        parser.add_argument("--overwrite", action="store_true", help=overwrite_help)
        return parser

    export_hf = export_format("hf", "a native Hugging Face model directory (Llama, Qwen2, Qwen3 or GPT-2, chosen by "
                              "the config) that AutoModelForCausalLM loads", "the directory to write",
                              "replace --out if it is not empty (else refused)")
    export_hf.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                           help="weight dtype (auto: the checkpoint's)")
    export_hf.add_argument("--max-shard-size", default="2GB", help="larger weights are split into shards with an index")

    export_onnx = export_format("onnx", "an ONNX graph (input_ids, attention_mask -> logits; any batch and sequence "
                                "length), checked against onnxruntime",
                                "the directory to write (model.onnx and the tokenizer)",
                                "replace --out if it is not empty (else refused)")
    export_onnx.add_argument("--opset", type=int, help="ONNX opset version (default: the exporter's)")
    export_onnx.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")
    export_onnx.add_argument("--kv-cache", action="store_true",
                             help="the graph also takes past_key_values.N.key|value and returns present.N.key|value, "
                                  "for decoding one token per call")

    export_gguf = export_format("gguf", "one GGUF file (Llama, Qwen2 or Qwen3, chosen by the config; the tokenizer "
                                "and chat template inside) for llama.cpp and Ollama", "the .gguf file to write",
                                "replace --out if it exists (else refused)")
    export_gguf.add_argument("--dtype", default="f16", choices=("f32", "f16", "bf16", "q8_0"),
                             help="weight type of the 2-D tensors (norms and biases stay f32; default: f16)")


def _add_plot(commands: argparse._SubParsersAction) -> None:
    """`plot`."""
    plot = _command(commands, "plot", "redraw a run's plots (plots/*.png) from its metrics.jsonl")
    plot.add_argument("run_dir", help="a run directory holding metrics.jsonl")


def _add_bench(commands: argparse._SubParsersAction) -> None:
    """`bench` and `bench race`."""
    bench = _command(commands, "bench", "training, prefill and decode speed, MFU and peak memory of presets, side by "
                     "side with the same model in transformers")
    from minillm.benchmarks.performance import add_arguments as bench_arguments

    bench_arguments(bench)
    bench_commands = bench.add_subparsers(dest="bench_command", title="subcommand", metavar="race")
    race = _command(bench_commands, "race", "train the plain recipe (nanoGPT-style: GPT-2 block, characters, AdamW) and "
                    "ours (Llama block, BPE, Muon, warmup-stable-decay) at the same size on one text, interleaved, "
                    "and time how long ours takes to reach plain's final validation loss per character",
                    "bench race")
    from minillm.benchmarks.race import add_arguments as race_arguments

    race_arguments(race)


def _add_quickstart(commands: argparse._SubParsersAction) -> None:
    """`quickstart`."""
    quickstart = _command(commands, "quickstart",
                          "the whole pipeline on the built-in data (tokenizer, pretraining, SFT, DPO, GRPO), each "
                          "stage evaluated, then report.md and a chat with the best model")
    quickstart.add_argument("overrides", nargs="*", metavar="STAGE.key=value",
                            help="override a stage's run config, e.g. grpo.max_steps=200 (stages: pretrain, sft, "
                                 "dpo, grpo)")
    quickstart.add_argument("--out-dir", default="runs/quickstart")
    quickstart.add_argument("--problems", type=int, default=200,
                            help="held-out word problems each stage answers (greedy)")
    quickstart.add_argument("--no-chat", action="store_true",
                            help="do not open a chat at the end (it opens only in an interactive terminal)")


# `minillm train` flags and the run config keys they set.
_TRAIN_FLAGS = {"preset": ("model", "preset"), "data": ("data", "source"), "max_length": ("data", "max_length"),
                "tokenizer": ("tokenizer", "path"), "batch_size": ("training", "batch_size"), "lr": ("training", "lr"),
                "optimizer": ("training", "optimizer"), **{key: (key,) for key in (
                    "epochs", "max_steps", "out_dir", "precision", "seed", "resume", "distributed", "overwrite")}}


def _train(args: argparse.Namespace) -> int:
    from minillm.recipes.config import load_run_config
    from minillm.recipes.rlhf import is_pipeline_config
    from minillm.recipes.run import run_training
    from minillm.training.trainer import TrainingInterrupted

    if is_pipeline_config(args.config):
        return _train_pipeline(args)

    flags: dict[str, Any] = {}
    sources = {}
    for name, path in _TRAIN_FLAGS.items():
        value = getattr(args, name)
        if value is not None:
            *sections, key = path
            cursor = flags
            for section in sections:
                cursor = cursor.setdefault(section, {})
            cursor[key] = value
            sources[path] = f"--{name.replace('_', '-')}"
    if args.max_steps is None and args.epochs is not None:
        flags["max_steps"] = None  # --epochs alone means "train by epochs" even if the config sets steps
    config = load_run_config(args.config, args.overrides, flags, sources)
    if args.dry_run:
        from minillm.recipes.run import check_run_fits, estimate_run_memory

        estimate = estimate_run_memory(config)
        print(estimate.format())
        check_run_fits(config, estimate)  # exit 2 when it cannot fit
        return 0
    from minillm.training import distributed

    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun only rank 0 reports progress
        logging.getLogger("minillm").setLevel(logging.WARNING)
    try:
        result = run_training(config)
        main_process = distributed.is_main()
    except TrainingInterrupted as e:
        if distributed.is_main():
            print(f"minillm train: stopped by {e}; continue with: minillm train ... --resume", file=sys.stderr)
        return 130
    finally:
        distributed.cleanup()
    if main_process:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


def _train_pipeline(args: argparse.Namespace) -> int:
    """`minillm train --config rlhf_tiny`: SFT → reward model → PPO (minillm.recipes.rlhf)."""
    from minillm.recipes.config import RunConfigError
    from minillm.recipes.rlhf import RLHFPipeline
    from minillm.training.trainer import TrainingInterrupted

    unsupported = [f"--{name.replace('_', '-')}" for name in (
        "preset", "data", "tokenizer", "max_length", "batch_size", "lr", "optimizer", "epochs", "max_steps", "resume",
        "distributed", "overwrite") if getattr(args, name, None) is not None] + (["--dry-run"] if args.dry_run else [])
    if unsupported:
        raise RunConfigError(f"{', '.join(unsupported)} cannot apply to a pipeline config (stage: rlhf); give "
                             "per-stage overrides like ppo.max_steps=50 (it resumes by itself when run again)")
    overrides = list(args.overrides) + [f"{k}={getattr(args, k)}" for k in ("out_dir", "seed", "precision")
                                        if getattr(args, k) is not None]
    try:
        results = RLHFPipeline.from_config(args.config, overrides).run()
    except TrainingInterrupted as e:
        print(f"minillm train: stopped by {e}; run the same command again to continue", file=sys.stderr)
        return 130
    print(json.dumps(results, indent=2, ensure_ascii=False))
    return 0


def _tokenizer_train(args: argparse.Namespace) -> int:
    from minillm.data.builtin import builtin_corpus
    from minillm.data.pretrain import iter_documents
    from minillm.errors import MiniLLMError
    from minillm.io import check_output_dir, staged_directory
    from minillm.tokenizer import BPETokenizer
    from minillm.tokenizer.bpe_tokenizer import BYTE_ALPHABET_SIZE, SPECIAL_TOKENS, TRAIN_MAX_TEXT_CHARS

    minimum = BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
    if args.vocab_size < minimum:
        raise MiniLLMError(f"--vocab-size must be at least {minimum} ({BYTE_ALPHABET_SIZE} byte symbols and "
                           f"{len(SPECIAL_TOKENS)} special tokens), got {args.vocab_size}")
    if args.data == "builtin" and args.num_documents < 1:
        raise MiniLLMError(f"--num-documents must be at least 1, got {args.num_documents}")
    check_output_dir(args.out, args.overwrite)  # before the training, which can take a while
    tokenizer = BPETokenizer(vocab_size=args.vocab_size)
    if args.data == "builtin":
        tokenizer.train(builtin_corpus(args.num_documents), source="builtin")
    else:
        tokenizer.train(iter_documents(args.data, args.text_field, max_chars=TRAIN_MAX_TEXT_CHARS), source=args.data)
    with staged_directory(args.out, args.overwrite) as staged:
        tokenizer.save_pretrained(staged)
    print(f"saved a {len(tokenizer)}-token tokenizer to {args.out}")
    return 0


def _tokenizer_eval(args: argparse.Namespace) -> int:
    from minillm.data.builtin import builtin_corpus
    from minillm.data.formats import DataError
    from minillm.data.pretrain import iter_documents
    from minillm.errors import MiniLLMError
    from minillm.tokenizer.manager import evaluate_tokenizers, format_tokenizer_table
    from minillm.tokenizer.pretrained import load_tokenizer

    if args.max_documents < 1:
        raise MiniLLMError(f"--max-documents must be at least 1, got {args.max_documents}")
    if args.data == "builtin":
        texts = builtin_corpus(args.max_documents, seed=123)
    else:
        texts = []
        for text in iter_documents(args.data, max_chars=1 << 21):
            if text and not text.isspace():
                texts.append(text)
                if len(texts) >= args.max_documents:
                    break
        if not texts:
            raise DataError(f"{args.data}: empty corpus: no non-blank document to compare the tokenizers on")
    tokenizers = {spec: load_tokenizer(spec) for spec in args.tokenizers}
    print(format_tokenizer_table(evaluate_tokenizers(tokenizers, texts)))
    return 0


def _data(args: argparse.Namespace) -> int:
    if args.data_command == "download":
        from minillm.data.download import DATASETS, download

        if args.list or not args.name:
            for name, spec in sorted(DATASETS.items()):
                print(f"{name:20s} {spec.stage:9s} {spec.description}")
            return 0
        for path in download(args.name, args.out, sha256=args.sha256, force=args.force):
            print(path)
        return 0
    if args.data_command == "prepare":
        from minillm.data.formats import DataError
        from minillm.data.prepare import PrepareOptionError, prepare_dataset

        sample = None if args.sample is None else (args.sample if args.sample <= 1 else int(args.sample))
        try:
            report = prepare_dataset(args.inputs, args.out, kind=args.kind,
                                     normalize=None if args.normalize == "none" else args.normalize,
                                     min_chars=args.min_chars, max_chars=args.max_chars, dedup=not args.no_dedup,
                                     near_dup_threshold=None if args.no_near_dup else args.near_dup_threshold,
                                     sample=sample, val_fraction=args.val_fraction, seed=args.seed,
                                     skip_bad=args.skip_bad, overwrite=args.overwrite)
        except PrepareOptionError as e:  # named by its flag, not the library's parameter
            raise DataError(f"--{e.option.replace('_', '-')} {e.detail}") from None
        print(report.format())
        return 0
    from minillm.data.prepare import format_inspection, inspect_dataset
    from minillm.tokenizer.pretrained import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    print(format_inspection(inspect_dataset(args.path, tokenizer=tokenizer)))
    return 0


def _load_generator(args: argparse.Namespace):
    """The checkpoint's model and tokenizer as a `TextGenerator`, and the sampling flags as a config."""
    from minillm.checkpoint_files import resolve_checkpoint
    from minillm.inference.generator import GenerationConfig, TextGenerator
    from minillm.model.transformer import MiniGPT
    from minillm.tokenizer import BPETokenizer

    directory = resolve_checkpoint(args.checkpoint)
    generator = TextGenerator(MiniGPT.from_pretrained(directory), BPETokenizer.from_pretrained(directory))
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              do_sample=args.temperature > 0, top_k=args.top_k, top_p=args.top_p,
                              repetition_penalty=args.repetition_penalty, seed=args.seed)
    return generator, config


def _generate(args: argparse.Namespace) -> int:
    generator, config = _load_generator(args)
    for prompt, text in zip(args.prompt, generator.generate(list(args.prompt), config)):
        print(prompt + text)
        print()
    return 0


def _chat(args: argparse.Namespace) -> int:
    from minillm.inference.chat import ChatSession, run_chat

    generator, config = _load_generator(args)
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    run_chat(ChatSession(generator, args.system, config))
    return 0


def _serve(args: argparse.Namespace) -> int:
    bounds = (("--port", args.port, 1, 65535), ("--max-tokens-limit", args.max_tokens_limit, 1, None),
              ("--max-concurrent", args.max_concurrent, 1, None))
    for flag, value, low, high in bounds:
        if value < low or (high is not None and value > high):
            allowed = f"between {low} and {high}" if high is not None else f"at least {low}"
            print(f"minillm serve: error: {flag} must be {allowed}, got {value}", file=sys.stderr)
            return 2
    if not 0 < args.request_timeout < float("inf"):  # also refuses nan
        print(f"minillm serve: error: --request-timeout must be a positive number of seconds, got "
              f"{args.request_timeout:g}", file=sys.stderr)
        return 2
    if args.api_key is not None and not args.api_key.strip():
        print("minillm serve: error: --api-key is empty", file=sys.stderr)
        return 2
    if any(not name.strip() for name in args.model_name or ()):
        print("minillm serve: error: --model-name is empty", file=sys.stderr)
        return 2

    from minillm.checkpoint_files import resolve_checkpoint
    from minillm.device import resolve_device
    from minillm.model.transformer import MiniGPT
    from minillm.serving import ServerLimits, create_app, default_model_id, run_server
    from minillm.tokenizer import BPETokenizer

    directory = resolve_checkpoint(args.checkpoint)
    device = resolve_device(args.device)
    model = MiniGPT.from_pretrained(directory, device=device)
    tokenizer = BPETokenizer.from_pretrained(directory)
    name, *aliases = dict.fromkeys(args.model_name or [default_model_id(args.checkpoint)])
    limits = ServerLimits(max_tokens_limit=args.max_tokens_limit, max_concurrent=args.max_concurrent,
                          request_timeout=args.request_timeout)
    app = create_app(model, tokenizer, model_name=name, aliases=aliases, api_key=args.api_key, limits=limits)
    host = f"[{args.host}]" if ":" in args.host else args.host
    also = f" (also as {', '.join(map(repr, aliases))})" if aliases else ""
    print(f"serving {name!r}{also} on {device}: chat page http://{host}:{args.port}/ , "
          f"API http://{host}:{args.port}/v1", file=sys.stderr)
    if args.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"minillm serve: warning: listening on {args.host} without --api-key: anyone who can reach "
              "this port can use the model", file=sys.stderr)
    run_server(app, host=args.host, port=args.port)
    return 0


def _eval(args: argparse.Namespace) -> int:
    tasks = ("perplexity", "classification", "multiple_choice", "word_problems", "references")
    if not any(getattr(args, task) for task in tasks):
        print("minillm eval: error: give at least one task: --perplexity, --classification, --multiple-choice, "
              "--word-problems or --references", file=sys.stderr)
        return 2
    inputs = {"--perplexity": args.perplexity, "--multiple-choice": args.multiple_choice,
              "--references": args.references, "--dev": [args.dev] if args.dev else [],
              "--classification": [d for d in args.classification or [] if d != "builtin"],
              "--vocab": [args.vocab] if args.vocab else []}
    for flag, paths in inputs.items():  # checked before the model loads, so a typo costs no time
        for path in paths or []:
            if not Path(path).exists():
                raise FileNotFoundError(f"{path}: no such file or directory ({flag})")

    from minillm import evaluation
    from minillm.checkpoint_files import resolve_checkpoint
    from minillm.device import resolve_device
    from minillm.inference.generator import TextGenerator
    from minillm.model.transformer import MiniGPT
    from minillm.tokenizer import BPETokenizer

    directory = resolve_checkpoint(args.checkpoint)
    device = resolve_device(args.device)
    model = MiniGPT.from_pretrained(directory, device=device)
    needs_text = args.perplexity or args.multiple_choice or args.word_problems or args.references
    # a classifier may have only a vocab.json; the others need the checkpoint's tokenizer files
    tokenizer = BPETokenizer.from_pretrained(directory) if needs_text else None
    chat = args.prompt_format == "chat"
    results = []
    try:
        for path in args.perplexity or []:
            results.append(evaluation.evaluate_perplexity(model, tokenizer, path, args.max_length, args.stride,
                                                          args.batch_size))
        for data in args.classification or []:
            results.append(_eval_classification(model, directory, data, args.vocab, args.batch_size))
        for path in args.multiple_choice or []:
            results.append(evaluation.evaluate_multiple_choice(model, tokenizer, path, args.few_shot, args.dev,
                                                               args.method, args.batch_size))
        if args.word_problems:
            results.append(evaluation.evaluate_word_problems(TextGenerator(model, tokenizer, fast_decode=False),
                                                             args.word_problems,
                                                             chat, args.max_new_tokens or 48))
        for path in args.references or []:
            results.append(evaluation.evaluate_references(TextGenerator(model, tokenizer, fast_decode=False), path, chat,
                                                          args.max_new_tokens or 128, args.bleu_tokenize,
                                                          args.batch_size))
    except ValueError as e:  # bad option values (a stride longer than the window, ...); DataError included
        print(f"minillm eval: error: {e}", file=sys.stderr)
        return 2
    print(evaluation.format_results(results))
    if args.out:
        evaluation.save_results(args.out, results, checkpoint=str(directory))
        print(f"\nwrote {args.out}")
    return 0


def _eval_classification(model, directory: Path, data: str, vocab: str | None, batch_size: int):
    """Label-token classification on a file or on the held-out built-in sequences, with the word-level
    vocabulary from --vocab, the checkpoint, or (for builtin data) the built-in one."""
    from minillm.data.builtin import HELDOUT_SEED, builtin_labelled_sequences, labelled_vocab
    from minillm.data.formats import DataError
    from minillm.data.labelled import WordLevelTokenizer
    from minillm.evaluation import evaluate_classification

    vocab_path = Path(vocab) if vocab else directory / "vocab.json"
    if vocab_path.is_file():
        tokenizer = WordLevelTokenizer.from_file(vocab_path)
    elif data == "builtin":
        tokenizer = WordLevelTokenizer(labelled_vocab())
    else:
        raise DataError(f"--classification {data} needs the word-level vocabulary: give --vocab vocab.json "
                        f"(there is no {vocab_path})")
    if data == "builtin":
        result = evaluate_classification(model, tokenizer, builtin_labelled_sequences(1000, seed=HELDOUT_SEED),
                                         batch_size=batch_size)
        result.source = "builtin (1000 held-out sequences)"
        return result
    return evaluate_classification(model, tokenizer, data, batch_size=batch_size)


def _export(args: argparse.Namespace) -> int:
    from minillm.errors import CheckpointError
    from minillm.export.hf import ExportError

    try:
        handlers = {"onnx": _export_onnx, "gguf": _export_gguf}
        return handlers.get(args.export_command, _export_hf)(args)
    except CheckpointError:  # already names the file of the checkpoint that is wrong
        raise
    except ExportError as e:  # named with the checkpoint it is about
        print(f"minillm export {args.export_command}: error: {args.checkpoint}: {e}", file=sys.stderr)
        return 2


def _export_hf(args: argparse.Namespace) -> int:
    from minillm.checkpoint_files import resolve_checkpoint
    from minillm.export.hf import export_hf

    out = export_hf(resolve_checkpoint(args.checkpoint), args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                    overwrite=args.overwrite)
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    print(f"wrote {out}: {config['architectures'][0]} ({config['model_type']}, {config['dtype']}); load it with "
          f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


def _export_gguf(args: argparse.Namespace) -> int:
    from minillm.checkpoint_files import resolve_checkpoint
    from minillm.export.gguf import export_gguf

    out = export_gguf(resolve_checkpoint(args.checkpoint), args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out} ({args.dtype}, {out.stat().st_size / 2**20:.1f} MiB); run it with llama-cli -m {out}, or "
          f"in Ollama with a Modelfile reading FROM {out}")
    return 0


def _export_onnx(args: argparse.Namespace) -> int:
    from minillm.checkpoint_files import resolve_checkpoint
    from minillm.export.onnx import export_onnx

    out, check = export_onnx(resolve_checkpoint(args.checkpoint), args.out, opset=args.opset, check=not args.no_check,
                             kv_cache=args.kv_cache, overwrite=args.overwrite)
    checked = (f"; onnxruntime matches PyTorch within {check.max_abs_diff:.1e} on (batch, length) {check.shapes}"
               + (f" and {check.decode_steps} calls through the returned KV cache" if check.decode_steps else "")
               if check else "")
    print(f"wrote {out / 'model.onnx'}{checked}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from minillm.training.plots import plot_run

    for path in plot_run(args.run_dir):
        print(path)
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.bench_command == "race":
        from minillm.benchmarks.race import run_from_args as run_race_from_args

        return run_race_from_args(args)
    from minillm.benchmarks.performance import run_from_args

    return run_from_args(args)


def _quickstart(args: argparse.Namespace) -> int:
    from minillm.quickstart import chat_with_best, interactive, run_quickstart

    report = run_quickstart(args.out_dir, args.overrides, problems=args.problems)
    if not args.no_chat and interactive():
        chat_with_best(args.out_dir, report)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("MINILLM_DEBUG", "").strip().lower() in ("1", "true", "yes")
    argv = [a for a in argv if a != "--debug"]  # accepted after the command too (`minillm train ... --debug`)
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options too (`--max-steps 8 model.preset=micro`).
    if args.command in ("train", "quickstart") and all("=" in item and not item.startswith("-") for item in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}{_flag_hint(argv, extra)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    handlers = {"train": _train, "generate": _generate, "chat": _chat, "quickstart": _quickstart, "bench": _bench,
                "data": _data, "plot": _plot, "serve": _serve, "export": _export, "eval": _eval}
    if args.command == "tokenizer":
        handler = _tokenizer_train if args.tokenizer_command == "train" else _tokenizer_eval
    else:
        handler = handlers[args.command]
    name = " ".join(filter(None, (args.command, getattr(args, f"{args.command}_command", None))))
    try:
        return handler(args)
    except KeyboardInterrupt:
        print(f"minillm {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # bad input: one line naming the culprit, exit 2; anything else: exit 1
        if debug:
            raise
        from minillm.errors import MiniLLMError

        if isinstance(e, (MiniLLMError, OSError)):
            print(f"minillm {name}: error: {_one_line(e)}", file=sys.stderr)
            return 2
        print(f"minillm {name}: internal error: {type(e).__name__}: {_one_line(e)} (run again with --debug for the "
              "traceback)", file=sys.stderr)
        return 1


def _flag_hint(argv: list[str], extra: list[str]) -> str:
    """A hint for an unknown `--flag`: the dashed flag where one exists (`--eval-every`), else, for
    `minillm train`, the config key of that name as an override (`--warmup_steps 10` → "did you mean
    training.warmup_steps=10?")."""
    for item in extra:
        name, _, value = item.partition("=")
        if not name.startswith("--"):
            continue
        dashed = name.replace("_", "-")
        if dashed != name and dashed in _known_flags(argv):
            return f"; did you mean {dashed}?"
        if "train" in argv:
            at = argv.index(item) if item in argv else -1
            if not value and 0 <= at < len(argv) - 1 and not argv[at + 1].startswith("-"):
                value = argv[at + 1]
            key = _config_key(name[2:].replace("-", "_"))
            if key is not None:
                return f"; did you mean {key}={value or '...'}?"
    return ""


def _config_key(name: str) -> str | None:
    """The run-config key `name` is, with its section (`training.warmup_steps`), or None."""
    from minillm.recipes.config import RunConfig, section_fields

    if name in RunConfig.model_fields:
        return name
    for section, fields in section_fields().items():
        if name in fields:
            return f"{section}.{name}"
    return None


def _known_flags(argv: list[str]) -> list[str]:
    """The option strings of the subcommand `argv` names."""
    parser: argparse.ArgumentParser = _parser()
    for word in argv:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not actions or word not in actions[0].choices:
            break
        parser = actions[0].choices[word]
    return [flag for action in parser._actions for flag in action.option_strings]


def _one_line(error: BaseException) -> str:
    """An exception as one line: OSError's `[Errno 2] No such file ...: 'x'` becomes `x: no such file ...`."""
    if isinstance(error, OSError) and error.strerror and error.filename is not None:
        return f"{error.filename}: {error.strerror[:1].lower()}{error.strerror[1:]}"
    text = str(error) or type(error).__name__
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
