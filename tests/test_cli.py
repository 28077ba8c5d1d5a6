"""The `minillm` command: training from flags and configs, generation, tokenizer training, errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from minillm.cli import main
from minillm.data.builtin import builtin_corpus
from minillm.model import MiniGPT
from minillm.recipes.config import CONFIG_DIR, RunConfigError, load_run_config
from minillm.tokenizer import BPETokenizer

TINY_MODEL = ["model.hidden_size=64", "model.num_hidden_layers=2", "model.num_attention_heads=4",
              "model.num_key_value_heads=2", "model.intermediate_size=128"]


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in builtin_corpus(600)),
                    encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, corpus_file) -> Path:
    out = tmp_path_factory.mktemp("run")
    code = main(["train", "--preset", "tiny", "--data", str(corpus_file), "--max-steps", "8",
                 "--max-length", "64", "--batch-size", "4", "--out-dir", str(out), "--precision", "fp32",
                 "tokenizer.vocab_size=400", "eval_every=4", "training.progress=false", *TINY_MODEL])
    assert code == 0
    return out


def test_train_from_flags_writes_a_complete_run_directory(trained_run):
    names = {p.name for p in trained_run.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "data", "best", "final", "plots", "tensorboard"} <= names
    for plot in ("loss.png", "lr.png", "throughput.png"):
        assert (trained_run / "plots" / plot).stat().st_size > 1000
    assert any(p.stat().st_size > 0 for p in (trained_run / "tensorboard").rglob("events.out.tfevents*"))
    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["mfu"] < 1 for r in records if "loss" in r)
    config = yaml.safe_load((trained_run / "config.yaml").read_text(encoding="utf-8"))
    assert config["model"]["preset"] == "tiny" and config["max_steps"] == 8
    model = MiniGPT.from_pretrained(trained_run / "final")
    assert model.config.vocab_size == len(BPETokenizer.from_pretrained(trained_run / "final")) == 400
    assert model.config.hidden_size == 64


def test_generate_prints_a_continuation_per_prompt(trained_run, capsys):
    code = main(["generate", str(trained_run / "final"), "--prompt", "小明有3个苹果，", "--prompt", "Tom has",
                 "--max-new-tokens", "8", "--seed", "1"])
    assert code == 0
    out = capsys.readouterr().out
    assert "小明有3个苹果，" in out and "Tom has" in out


def test_tokenizer_train_saves_a_loadable_tokenizer(tmp_path, corpus_file, capsys):
    assert main(["tokenizer", "train", "--data", str(corpus_file), "--vocab-size", "300",
                 "--out", str(tmp_path / "tok")]) == 0
    tokenizer = BPETokenizer.from_pretrained(tmp_path / "tok")
    assert len(tokenizer) == 300
    assert tokenizer.decode(tokenizer.encode("小红有5本书。")) == "小红有5本书。"


def test_shipped_configs_load_and_name_their_stage():
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert {"pretrain_tiny", "sft_tiny"} <= set(names)
    for name in names:
        if name.startswith("rlhf"):  # a pipeline: one run config per stage
            from minillm.recipes.rlhf import RLHFPipeline

            configs = RLHFPipeline.from_config(name).configs
            assert [c["stage"] for c in configs.values()] == ["sft", "reward", "ppo"]
            continue
        config = load_run_config(name)
        assert config["stage"] == name.split("_")[0]


def test_overrides_and_flags_reach_the_config():
    config = load_run_config("pretrain_tiny", ["max_steps=7", "model.preset=micro", "training.lr=5e-4"],
                             {"data": {"source": "x.txt"}})
    assert config["max_steps"] == 7 and config["model"]["preset"] == "micro"
    assert config["training"]["lr"] == 5e-4 and config["data"]["source"] == "x.txt"


@pytest.mark.parametrize("overrides, message", [
    (["max_stepz=3"], "unknown key 'max_stepz'"),
    (["data.sourc=x"], "unknown key 'data.sourc'"),
    (["model.preset=huge"], "model.preset='huge': unknown preset"),
    (["model.num_attention_heads=5"], "num_attention_heads=5 must divide"),
    (["model.hidden_sise=5"], "unknown key 'model.hidden_sise'"),
    (["training.max_steps=5"], "set max_steps at the top level"),
    (["stage=ppq"], "stage='ppq': input should be 'pretrain'"),
    (["stage=ppo"], "stage ppo needs init_from"),
    (["distributed=zero3"], "distributed='zero3': input should be 'none', 'ddp' or 'fsdp'"),
    (["lora.rank=0"], "lora: LoRAConfig.rank must be an integer >= 1"),
    (["memory.micro_batch_size=0"], "memory: micro_batch_size must be a positive integer"),
    (["memory.offload=true"], "unknown key 'memory.offload'"),
    (["maxsteps"], "must look like key=value"),
])
def test_bad_run_configs_are_refused_naming_the_key(overrides, message):
    with pytest.raises(RunConfigError, match=message):
        load_run_config("pretrain_tiny", overrides)


def test_bad_input_fails_before_training_with_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "好的开始"}\n{"text": "缺了引号}\n', encoding="utf-8")
    code = main(["train", "--data", str(bad), "--out-dir", str(tmp_path / "run"), "--max-steps", "2"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: malformed JSON" in err
    assert not (tmp_path / "run" / "final").exists()

    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    assert main(["train", "--data", str(empty_dir), "--out-dir", str(tmp_path / "run2")]) == 2
    assert "contains no text files" in capsys.readouterr().err

    assert main(["train", "--config", "no_such_config"]) == 2
    assert "config file no_such_config not found" in capsys.readouterr().err

    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err


@pytest.mark.parametrize("command", [[], ["train"], ["generate"], ["quickstart"], ["plot"], ["tokenizer", "train"],
                                     ["tokenizer", "eval"], ["data", "download"], ["data", "prepare"],
                                     ["data", "inspect"]])
def test_every_command_has_help_with_examples(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: minillm" in out
    if command:
        assert "examples:" in out


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "minillm"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "quickstart" in result.stdout


# ------------------------------------------------------------------------------ data and tokenizer commands
def test_data_download_lists_the_registry_and_reports_offline_clearly(tmp_path, capsys):
    assert main(["data", "download", "--list"]) == 0
    listing = capsys.readouterr().out
    assert "tinyshakespeare" in listing and "minimind-sft" in listing
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/corpus.txt"
    assert main(["data", "download", url, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "could not reach" in err and url in err


def test_data_prepare_and_inspect(tmp_path, capsys):
    raw = tmp_path / "raw.jsonl"
    texts = builtin_corpus(200, seed=4)
    lines = [json.dumps({"text": t}, ensure_ascii=False) for t in texts + texts[:20]] + ['{"text": broken']
    raw.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert main(["data", "prepare", str(raw), "--out", str(tmp_path / "clean"), "--val-fraction", "0.1",
                 "--skip-bad"]) == 0
    report = capsys.readouterr().out
    assert "duplicate" in report and "malformed" in report
    kept = sum(1 for _ in open(tmp_path / "clean" / "train.jsonl")) + sum(1 for _ in open(tmp_path / "clean" / "val.jsonl"))
    assert kept <= 200
    assert main(["data", "inspect", str(tmp_path / "clean" / "train.jsonl")]) == 0
    assert "text" in capsys.readouterr().out


def test_tokenizer_eval_compares_tokenizers_side_by_side(tmp_path, corpus_file, capsys):
    assert main(["tokenizer", "train", "--data", str(corpus_file), "--vocab-size", "300", "--out", str(tmp_path / "a")]) == 0
    assert main(["tokenizer", "train", "--data", str(corpus_file), "--vocab-size", "800", "--out", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    assert main(["tokenizer", "eval", "--data", str(corpus_file), "--tokenizer", str(tmp_path / "a"),
                 "--tokenizer", str(tmp_path / "b")]) == 0
    table = capsys.readouterr().out
    assert str(tmp_path / "a") in table and str(tmp_path / "b") in table


def test_plot_redraws_a_runs_plots(trained_run, capsys):
    (trained_run / "plots" / "loss.png").unlink()
    assert main(["plot", str(trained_run)]) == 0
    assert (trained_run / "plots" / "loss.png").exists()
    assert "loss.png" in capsys.readouterr().out


def test_dry_run_prints_the_memory_estimate_without_training(tmp_path, capsys):
    assert main(["train", "--config", "pretrain_small", "--out-dir", str(tmp_path / "run"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "training memory estimate" in out and "activations" in out and "total" in out
    assert not (tmp_path / "run").exists()
    # the memory: section counts: checkpointing and a smaller micro-batch shrink the activations
    from minillm.recipes.config import load_run_config
    from minillm.recipes.run import estimate_run_memory

    plain = estimate_run_memory(load_run_config("pretrain_small"))
    saving = estimate_run_memory(load_run_config("pretrain_small", ["memory.gradient_checkpointing=true",
                                                                    "memory.micro_batch_size=2"]))
    assert (saving.batch_size, saving.gradient_checkpointing) == (2, True)
    assert saving.activations < plain.activations / 10 and saving.weights == plain.weights


def test_metrics_record_memory(trained_run):
    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["rss_mb"] > 0 and r["peak_rss_mb"] >= r["rss_mb"] for r in records if "loss" in r)
