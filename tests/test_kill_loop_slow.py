"""Fault suite, the kill loop: training SIGKILLed again and again at random moments (mid-step, during a
checkpoint save, right after an epoch's last batch) and restarted each time ends with weights bit-identical
to a run never interrupted, and leaves no temporary or half-written directory behind."""

from __future__ import annotations

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

from minillm.training.checkpoint import (
    STATE_DIR,
    STEP_PREFIX,
    is_complete,
    latest_checkpoint,
    rolling_checkpoints,
)

pytestmark = pytest.mark.slow

RUN = ["--preset", "tiny", "--data", "builtin", "--max-length", "32", "--batch-size", "8", "--precision", "fp32",
       "--epochs", "4", "save_every=1", "training.keep_last=2", "eval_every=7", "data.num_documents=400",
       "data.val_fraction=0.1", "tokenizer.vocab_size=300", "model.hidden_size=32", "model.num_hidden_layers=1",
       "model.intermediate_size=64", "model.dropout=0.1", "training.progress=false", "training.warmup_steps=2"]
KILLS = 14


def command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "minillm.cli", "train", *RUN, "--out-dir", str(out), *extra]


def saving(out: Path) -> bool:
    """A checkpoint is being written (its temporary directory exists)."""
    return out.is_dir() and any(p.name.startswith(f".{STEP_PREFIX}") and ".tmp-" in p.name for p in out.iterdir())


def newest_step(out: Path) -> int:
    checkpoints = rolling_checkpoints(out) if out.is_dir() else []
    return int(checkpoints[-1].name[len(STEP_PREFIX):]) if checkpoints else -1


def at_epoch_end(out: Path, after: int) -> bool:
    """The newest checkpoint is newer than step `after` and was saved after an epoch's last batch."""
    checkpoints = rolling_checkpoints(out) if out.is_dir() else []
    if not checkpoints or newest_step(out) <= after:
        return False
    try:
        return json.loads((checkpoints[-1] / STATE_DIR / "state.json").read_text())["loader"]["batch_index"] == 0
    except (OSError, ValueError, KeyError):
        return False


def restart(out: Path) -> list[str]:
    """What a user runs after a kill: --resume from the newest checkpoint, or start again when there is none."""
    if out.is_dir() and latest_checkpoint(out) is not None:
        return ["--resume"]
    return ["--overwrite"]


def test_sigkill_at_many_moments_then_resume_gives_identical_weights_and_no_leftovers(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MINILLM_CACHE_DIR": str(tmp_path / "cache")}
    reference = tmp_path / "reference"
    subprocess.run(command(reference), check=True, env=env, capture_output=True, timeout=600)

    out = tmp_path / "killed"
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    moments: list[str] = []
    finished = False
    while len(moments) < KILLS and not finished:
        process = subprocess.Popen(command(out, *restart(out)), env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE)
        moment, start_step = rng.choice(["time", "save", "epoch"]), newest_step(out)
        deadline = time.time() + (rng.uniform(0.5, 4.0) if moment == "time" else 60)
        while process.poll() is None and time.time() < deadline:
            if (moment == "save" and saving(out)) or (moment == "epoch" and at_epoch_end(out, start_step)):
                break
            time.sleep(0.001)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            moments.append(moment)
        error = process.communicate()[1].decode()
        finished = process.returncode == 0
        assert finished or process.returncode == -signal.SIGKILL, f"seed {seed}: {error[-2000:]}"
        newest = latest_checkpoint(out) if out.is_dir() else None
        assert newest is None or is_complete(newest), f"seed {seed}: {newest} is incomplete"
    if not finished:
        finish = subprocess.run(command(out, *restart(out)), env=env, capture_output=True, text=True, timeout=600)
        assert finish.returncode == 0, finish.stderr[-2000:]
    assert len(moments) >= KILLS // 2, f"seed {seed}: only {moments} before the run finished"
    print(f"seed {seed}: killed at {moments}")

    final, expected = load_file(str(out / "final" / "model.safetensors")), load_file(
        str(reference / "final" / "model.safetensors"))
    for key, value in expected.items():
        assert torch.equal(value, final[key]), f"seed {seed}: {key} differs after kills at {moments}"
    leftovers = [p.name for p in out.iterdir() if ".tmp" in p.name or p.name.endswith(".old")]
    assert leftovers == [], f"seed {seed}: {leftovers}"
    steps = [p for p in out.iterdir() if p.name.startswith(STEP_PREFIX)]
    assert all(is_complete(p) for p in steps) and len(steps) <= 2, [p.name for p in steps]
