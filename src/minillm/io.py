"""Crash-safe file writes (a kill at any moment leaves either the old file or the new one, never half of
one) and the cache directory they often go to."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from minillm.errors import OutputExistsError


def cache_root() -> Path:
    """The per-user cache directory (trained tokenizers, autotune timings): `$MINILLM_CACHE_DIR`, else
    `~/.cache/minillm`."""
    return Path(os.environ.get("MINILLM_CACHE_DIR") or Path.home() / ".cache" / "minillm")


def read_json_cache(path: str | Path) -> dict[str, Any]:
    """A cache file's entries; {} when it is missing, unreadable or not a JSON object (a cache is never
    a reason to fail)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside `path` durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` to produce the file, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def check_output_dir(path: str | Path, overwrite: bool = False, flag: str = "--overwrite") -> Path:
    """Refuse an output directory that exists and is not empty (or is a file) unless `overwrite`: no
    command replaces a user's files without being asked to. Call it before any expensive work."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{path}: exists and is not a directory")
    if not overwrite and path.is_dir() and any(path.iterdir()):
        raise OutputExistsError(f"{path}: directory is not empty; pass {flag} to replace it, or choose another")
    return path


@contextlib.contextmanager
def staged_directory(out_dir: str | Path, overwrite: bool = False, aside: str | None = None) -> Iterator[Path]:
    """A temporary sibling of `out_dir` (`.NAME.tmp-PID`) to write into; it takes `out_dir`'s place only if
    the block succeeds, so a failed or killed write never leaves a half-written directory. A non-empty
    `out_dir` is refused unless `overwrite`; then the old one is moved aside (to the sibling `aside`,
    default `.NAME.old-PID`) before the rename and deleted after it, so that at every moment one whole
    version exists."""
    out_dir = check_output_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    old = out_dir.with_name(aside or f".{out_dir.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        fsync_dir(tmp)
        if out_dir.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        fsync_dir(out_dir.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
