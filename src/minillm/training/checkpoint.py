"""Checkpoints: a Hugging Face model directory (config, safetensors weights, tokenizer), written atomically.

The directory is assembled under a temporary name and renamed into place; an existing checkpoint of
the same name is moved aside first and deleted only after the new one is in place, so a crash at any
moment leaves a whole checkpoint (the new one, or the previous one under `NAME.old`, which
`resolve_checkpoint` picks up).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from minillm.checkpoint_files import OLD_SUFFIX, load_torch_file, read_json_object
from minillm.errors import CheckpointError
from minillm.io import atomic_write_json, fsync_dir, staged_directory

STATE_DIR = "trainer_state"
STEP_PREFIX = "step_"


def save_checkpoint(directory: str | Path, model: nn.Module, tokenizer: Any = None,
                    extra_files: dict[str, Any] | None = None,
                    write_state: Callable[[Path], None] | None = None,
                    write_files: Callable[[Path], None] | None = None, weights: bool = True) -> Path:
    """Save `model` (and `tokenizer`, and JSON `extra_files`) as the model directory `directory`;
    `write_state(dir)` adds the training state (`trainer_state/`) and `write_files(dir)` any other files
    (a LoRA adapter) inside the same atomic write. `weights=False` writes the model's config only."""
    directory = Path(directory)
    with staged_directory(directory, overwrite=True, aside=directory.name + OLD_SUFFIX) as tmp:
        generation = {}
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
            generation = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
        model.save_pretrained(tmp, generation_config=generation, weights=weights)
        if write_files is not None:
            write_files(tmp)
        for name, data in (extra_files or {}).items():
            atomic_write_json(tmp / name, data)
        if write_state is not None:
            (tmp / STATE_DIR).mkdir()
            write_state(tmp / STATE_DIR)
            fsync_dir(tmp / STATE_DIR)
    return directory


def rolling_checkpoints(out_dir: str | Path) -> list[Path]:
    """The whole `step_N/` checkpoints of a run that hold training state, oldest first."""
    found = []
    for path in Path(out_dir).glob(f"{STEP_PREFIX}*"):
        suffix = path.name[len(STEP_PREFIX):]
        if suffix.isdigit() and (path / STATE_DIR / "state.json").is_file() and is_complete(path):
            found.append((int(suffix), path))
    return [path for _, path in sorted(found)]


def prune_checkpoints(out_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` rolling checkpoints. Each is first renamed to a temporary name, so a
    kill during the deletion leaves a leftover `clean_leftovers` recognises, never a half `step_N/`."""
    for path in rolling_checkpoints(out_dir)[:-keep] if keep > 0 else []:
        doomed = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


# What an interrupted write of this project leaves in a run directory: a checkpoint, export or token-shard
# directory assembled under `.NAME.tmp-PID`, and a file written through `io.atomic_write` (`.NAME.XXXX.tmp`).
_TMP_DIR = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")
_TMP_FILE = re.compile(r"^\..+\.tmp$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def is_complete(directory: str | Path) -> bool:
    """Whether a saved checkpoint directory is whole: its config, and its training state if it has any."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        return False
    return not (directory / STATE_DIR).exists() or (directory / STATE_DIR / "state.json").is_file()


def clean_leftovers(out_dir: str | Path) -> list[Path]:
    """Delete what interrupted writes left in the run directory `out_dir` (and its `plots/`): temporary
    directories and files named as this project names them (of processes no longer running), `NAME.old`
    copies whose `NAME` is whole again, and `step_N/` checkpoints a kill left incomplete. Nothing else is
    touched. Returns what was deleted."""
    out_dir = Path(out_dir)
    removed = []
    for folder in (out_dir, out_dir / "plots"):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            name, match = path.name, _TMP_DIR.match(path.name)
            if not path.is_dir():
                stale = _TMP_FILE.match(name) is not None
            elif match is not None:
                stale = not _alive(int(match["pid"]))
            elif folder == out_dir and name.endswith(OLD_SUFFIX):
                stale = is_complete(path.with_name(name[:-len(OLD_SUFFIX)]))
            else:
                step = name[len(STEP_PREFIX):]
                stale = folder == out_dir and name.startswith(STEP_PREFIX) and step.isdigit() and not is_complete(path)
            if stale:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The checkpoint to resume a run from: the newest `step_N/`, or `final/` when it is newer."""
    candidates = rolling_checkpoints(out_dir)
    final = Path(out_dir) / "final"
    if (final / STATE_DIR / "state.json").is_file():
        state_path = final / STATE_DIR / "state.json"
        step = read_json_object(state_path).get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise CheckpointError(f"{state_path}: \"step\" must be an integer, got {step!r}")
        newest = int(candidates[-1].name[len(STEP_PREFIX):]) if candidates else -1
        if step >= newest:
            return final
    return candidates[-1] if candidates else None



def load_state_file(path: str | Path) -> Any:
    """A training-state file (`optimizer.pt`, `state.pt`, `loader.pt`); `CheckpointError` naming it when
    it is missing or corrupt."""
    return load_torch_file(path, "training-state file")
