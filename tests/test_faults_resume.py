"""Fault suite, resume: a run continues from any checkpoint, including one saved at the end of an epoch and
one whose run is given more epochs; what interrupted saves left is cleaned on start, and nothing else."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minillm.cli import main
from minillm.training.checkpoint import STATE_DIR, clean_leftovers, latest_checkpoint, rolling_checkpoints

RUN = ["--preset", "tiny", "--data", "builtin", "--max-length", "32", "--batch-size", "8", "--precision", "fp32",
       "data.num_documents=40", "data.val_fraction=0.1", "tokenizer.vocab_size=300", "model.hidden_size=32",
       "model.num_hidden_layers=1", "model.intermediate_size=64", "training.progress=false", "eval_every=4",
       "training.warmup_steps=2"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINILLM_CACHE_DIR", str(tmp_path / "cache"))


def train(out: Path, *extra: str) -> int:
    return main(["train", *RUN, "--out-dir", str(out), *extra])


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    left, right = weights(a), weights(b)
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key


def loader_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE_DIR / "state.json").read_text())["loader"]


def test_a_checkpoint_saved_at_an_epoch_end_resumes_to_the_uninterrupted_weights(tmp_path):
    reference = tmp_path / "reference"
    assert train(reference, "--epochs", "3", "save_every=1", "training.keep_last=1000") == 0
    # the position saved after an epoch's last batch is the start of the next epoch
    ends = [c for c in rolling_checkpoints(reference) if loader_state(c)["batch_index"] == 0]
    assert [loader_state(c)["epoch"] for c in ends] == [1, 2, 3], "a checkpoint at each epoch end"
    for end in ends[:2]:
        resumed = tmp_path / f"resumed_{end.name}"
        shutil.copytree(end, resumed / end.name)  # as if killed right after this save
        assert train(resumed, "--epochs", "3", "save_every=1", "training.keep_last=1000", "--resume") == 0
        assert_same_weights(reference / "final", resumed / "final")


def test_more_epochs_continue_a_finished_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, "--epochs", "1") == 0
    one = json.loads(capsys.readouterr().out)
    assert train(out, "--epochs", "2", "--resume") == 0
    two = json.loads(capsys.readouterr().out)
    assert two["steps"] == 2 * one["steps"]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert max(steps) == two["steps"], "the added epoch trained"
    assert json.loads((out / "final" / STATE_DIR / "state.json").read_text())["step"] == two["steps"]


def test_a_new_run_in_a_used_directory_is_refused_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, "--max-steps", "2") == 0
    capsys.readouterr()
    before = weights(out / "final")
    assert train(out, "--max-steps", "3") == 2
    err = capsys.readouterr().err
    assert "already holds a run (" in err and "final/" in err and "--overwrite" in err and err.count("\n") == 1
    assert_same_weights_dict(before, weights(out / "final"))
    (out / "notes.txt").write_text("mine")
    assert train(out, "--max-steps", "3", "--overwrite") == 0
    assert json.loads((out / "final" / STATE_DIR / "state.json").read_text())["step"] == 3
    assert (out / "notes.txt").read_text() == "mine", "only the run's own outputs are replaced"


def assert_same_weights_dict(left: dict, right: dict) -> None:
    assert all(torch.equal(left[k], right[k]) for k in left)


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_leftovers_of_interrupted_saves_are_cleaned_and_nothing_else(tmp_path):
    out = tmp_path / "run"
    assert train(out, "--max-steps", "4", "save_every=2") == 0
    dead = _dead_pid()
    stale = [out / f".step_6.tmp-{dead}", out / f".best.tmp-{dead}", out / f".data.tmp-{dead}",
             out / f".final.tmp-{dead}", out / "step_8", out / "final.old"]
    for path in stale:
        (path / STATE_DIR).mkdir(parents=True)
        (path / "model.safetensors").write_bytes(b"half")
    shutil.copy(out / "final" / "config.json", out / "final.old" / "config.json")
    (out / ".config.yaml.k2j4h.tmp").write_text("half")
    (out / "plots").mkdir(exist_ok=True)
    (out / "plots" / ".loss.123.tmp").write_text("half")
    stale += [out / ".config.yaml.k2j4h.tmp", out / "plots" / ".loss.123.tmp"]
    kept = [out / "notes.txt", out / "mine", out / f".step_6.tmp-{_live_pid()}", out / "step_x"]
    (out / "notes.txt").write_text("mine")
    for path in kept[1:]:
        path.mkdir()
    assert latest_checkpoint(out) == out / "final", "an incomplete step_8 is never resumed from"
    assert train(out, "--max-steps", "6", "save_every=2", "--resume") == 0
    assert [p for p in stale if p.exists()] == []
    assert all(p.exists() for p in kept)
    assert clean_leftovers(out) == []


def _live_pid() -> int:
    import os

    return os.getppid()  # alive for as long as this test runs


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MINILLM_CACHE_DIR", str(cache))
        assert train(out, "--max-steps", "4", "save_every=2") == 0
    return out


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _drop_key(key: str):
    def fault(path: Path) -> None:
        state = json.loads(path.read_text())
        del state[key]
        path.write_text(json.dumps(state))
    return fault


STATE_FAULTS = {
    "state.json not JSON": ("state.json", lambda p: p.write_text("{not json"), "state.json"),
    "state.json empty": ("state.json", lambda p: p.write_text(""), "state.json"),
    "state.json an array": ("state.json", lambda p: p.write_text("[1, 2]"), "state.json"),
    "state.json without step": ("state.json", _drop_key("step"), "trainer_state"),
    "state.json without loader": ("state.json", _drop_key("loader"), "trainer_state"),
    "optimizer.pt truncated": ("optimizer.pt", _truncate, "optimizer.pt"),
    "optimizer.pt garbage": ("optimizer.pt", lambda p: p.write_bytes(b"\x00garbage" * 10), "optimizer.pt"),
    "optimizer.pt missing": ("optimizer.pt", lambda p: p.unlink(), "optimizer.pt"),
    "state.pt truncated": ("state.pt", _truncate, "state.pt"),
    "state.pt missing": ("state.pt", lambda p: p.unlink(), "state.pt"),
}


@pytest.mark.parametrize("fault", STATE_FAULTS, ids=list(STATE_FAULTS))
def test_a_damaged_training_state_is_one_line_naming_the_file(fault, finished_run, tmp_path, capsys):
    name, damage, culprit = STATE_FAULTS[fault]
    out = tmp_path / "run"
    shutil.copytree(finished_run / "step_4", out / "step_4")
    damage(out / "step_4" / STATE_DIR / name)
    capsys.readouterr()
    assert train(out, "--max-steps", "6", "save_every=2", "--resume") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and "internal error" not in err, err
    assert culprit in err and str(out / "step_4") in err, err
