"""Exact resume: a run killed with SIGKILL at a random step and resumed ends with the same weights."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minillm.cli import main
from minillm.training.checkpoint import latest_checkpoint, rolling_checkpoints

RUN = ["--preset", "tiny", "--data", "builtin", "--max-steps", "16", "--max-length", "32", "--batch-size", "4",
       "--precision", "fp32", "save_every=2", "training.keep_last=2", "eval_every=5", "data.num_documents=300",
       "tokenizer.vocab_size=320", "model.hidden_size=64", "model.num_hidden_layers=2",
       "model.intermediate_size=128", "model.dropout=0.1", "training.progress=false"]


def train_command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "minillm.cli", "train", *RUN, "--out-dir", str(out), *extra]


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def steps_logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.exists():
        return 0
    return max([json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.strip()] or [0])


@pytest.mark.parametrize("recipe", [(), ("training.optimizer=muon", "training.lr_schedule=wsd")],
                         ids=["adamw", "muon-wsd"])
def test_sigkill_at_a_random_step_then_resume_equals_the_uninterrupted_run(tmp_path, recipe):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = tmp_path / "reference"
    subprocess.run(train_command(reference, *recipe), check=True, env=env, capture_output=True, timeout=300)

    interrupted = tmp_path / "interrupted"
    kill_after = random.Random().randint(3, 13)
    process = subprocess.Popen(train_command(interrupted, *recipe), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while steps_logged(interrupted) < kill_after and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (interrupted / "final").exists(), "the run finished before it could be killed"
    assert rolling_checkpoints(interrupted), "a checkpoint was saved before the kill"
    resumed = subprocess.run(train_command(interrupted, *recipe, "--resume"), env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected, got = weights(reference / "final"), weights(interrupted / "final")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected), f"killed after step {kill_after}"
    assert len(rolling_checkpoints(interrupted)) <= 2  # keep_last


def test_sigint_saves_a_checkpoint_and_resume_finishes_the_run(tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(train_command(out, "--max-steps", "400"), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while steps_logged(out) < 3 and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    assert "--resume" in err
    checkpoint = latest_checkpoint(out)
    step = json.loads((checkpoint / "trainer_state" / "state.json").read_text())["step"]
    assert step >= 3 and not (out / "final").exists()


def test_resuming_a_different_run_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*("train", *RUN), "--out-dir", str(out), "--max-steps", "4"]) == 0
    # More steps: allowed.
    assert main([*("train", *RUN), "--out-dir", str(out), "--max-steps", "6", "--resume"]) == 0
    # Another model shape or batch size: refused, naming what changed.
    assert main([*("train", *RUN), "--out-dir", str(out), "--max-steps", "8", "model.num_hidden_layers=3",
                 "--resume"]) == 2
    assert "the model changed (num_hidden_layers)" in capsys.readouterr().err
    assert main([*("train", *RUN), "--out-dir", str(out), "--max-steps", "8", "--batch-size", "8",
                 "--resume"]) == 2
    assert "batch_size changed (batch_size: 4 -> 8)" in capsys.readouterr().err


@pytest.mark.parametrize("missing", ["nothing"])
def test_resume_with_no_checkpoint_says_so(tmp_path, capsys, missing):
    assert main([*("train", *RUN), "--out-dir", str(tmp_path / missing), "--resume"]) == 2
    assert "no checkpoint with training state" in capsys.readouterr().err
