"""Fetch public corpora: a registry of named datasets, resumable verified HTTP, and the Hugging Face Hub.

`download("tinyshakespeare", "data/raw")` fetches every file of a registry entry; a direct http(s)
URL fetches one file; `hf:owner/dataset[/path]` goes through `huggingface_hub`.

An HTTP download streams into `<file>.part` and resumes it with a `Range` request, both after a
connection is cut mid-body and on the next run. The size and sha256, where known, are checked before
the file is renamed into place, so a final file is always a verified one. A file with no published
checksum gets `<file>.sha256` recorded on first download, and later runs verify against that.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from minillm.data.formats import DataError
from minillm.io import atomic_write_text, fsync_dir

logger = logging.getLogger("minillm.data")

CHUNK_SIZE = 1 << 20
RETRY_BACKOFF_S = 1.0  # seconds before retry n is n * RETRY_BACKOFF_S
USER_AGENT = "mini-llm-downloader/1"
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class RemoteFile:
    url: str
    filename: str
    size: int | None = None  # bytes; None where no trustworthy source states it
    sha256: str | None = None  # hex digest; None where unpublished (recorded on first download)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    description: str
    files: tuple[RemoteFile, ...]
    license: str
    format: str  # "text" | "jsonl" | "json" | "parquet"
    stage: str  # the stage it suits: "pretrain" | "sft" | "dpo" | "eval"


# Sizes and checksums come from published sources, never from guesses: the Git LFS pointers of the
# pinned Hub commits below (WikiText, TinyStories) and TensorFlow Datasets' checksum list (Tiny
# Shakespeare). minimind's files are replaced in place on `main` and the Chinese Wikipedia file has no
# published digest, so theirs are None and recorded at the first download instead.
_HF = "https://huggingface.co/datasets"
_WIKITEXT = f"{_HF}/Salesforce/wikitext/resolve/b08601e04326c79dfdd32d625aee71d232d685c3"
_TINYSTORIES = f"{_HF}/roneneldan/TinyStories/resolve/5485261731eaac25dd8e5ebbc3839d0a9870b185"
_MINIMIND = f"{_HF}/jingyaogong/minimind_dataset/resolve/main"
_WIKITEXT_VALID = ("validation-00000-of-00001.parquet", 657209,
                   "204929b7ff9d6184953f867dedb860e40aa69c078fc1e54b3baaa8fb28511c4c")
_WIKITEXT_TEST = ("test-00000-of-00001.parquet", 732610,
                  "5f1bea067869d04849c0f975a2b29c4ff47d867f484f5010ea5e861eab246d91")


def _wikitext(config: str, prefix: str, shards: list[tuple[str, int | None, str | None]]) -> tuple[RemoteFile, ...]:
    return tuple(RemoteFile(f"{_WIKITEXT}/{config}/{name}", f"{prefix}-{name}", size, digest)
                 for name, size, digest in shards)


DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in [
    DatasetSpec(
        "tinyshakespeare", "Tiny Shakespeare (karpathy/char-rnn): 1.1 MB of plays, the classic char-level corpus",
        (RemoteFile("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
                    "tinyshakespeare.txt", 1115394,
                    "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),),
        "public domain text", "text", "pretrain"),
    DatasetSpec(
        "wikitext-2", "WikiText-2 raw (Salesforce/wikitext): 2M tokens of English Wikipedia, train/valid/test",
        _wikitext("wikitext-2-raw-v1", "wikitext-2", [
            ("train-00000-of-00001.parquet", 6357543,
             "e83889baabc497075506f91975be5fac0d45c5290b6b20582c8cd1e853d0c9f7"),
            _WIKITEXT_VALID, _WIKITEXT_TEST]),
        "CC BY-SA 3.0 / GFDL", "parquet", "pretrain"),
    DatasetSpec(
        "wikitext-103", "WikiText-103 raw (Salesforce/wikitext): 103M tokens of English Wikipedia",
        _wikitext("wikitext-103-raw-v1", "wikitext-103", [
            ("train-00000-of-00002.parquet", 156987808,
             "74da360f23826045b3e6ac6375411fdb15f003030aa74f2596ed08b857cb9212"),
            ("train-00001-of-00002.parquet", 157088770,
             "ba090ac30dbf5461e8dcbdd1a1b8e6f3cf9c2c756d64f0c1220450acd514f720"),
            _WIKITEXT_VALID, _WIKITEXT_TEST]),
        "CC BY-SA 3.0 / GFDL", "parquet", "pretrain"),
    DatasetSpec(
        "wikipedia-zh", "中文维基百科 (pleisto/wikipedia-cn-20230720-filtered): ~250k articles, one JSON array",
        (RemoteFile(f"{_HF}/pleisto/wikipedia-cn-20230720-filtered/resolve/main/wikipedia-cn-20230720-filtered.json",
                    "wikipedia-cn-20230720-filtered.json"),),
        "CC BY-SA 3.0 (Wikipedia text)", "json", "pretrain"),
    DatasetSpec(
        "minimind-pretrain", "minimind pretraining corpus (jingyaogong/minimind_dataset): ~1.6 GB Chinese {text}",
        (RemoteFile(f"{_MINIMIND}/pretrain_hq.jsonl", "pretrain_hq.jsonl"),),
        "Apache-2.0", "jsonl", "pretrain"),
    DatasetSpec(
        "minimind-sft", "minimind SFT conversations, ≤512 chars (jingyaogong/minimind_dataset): ~1.2 GB",
        (RemoteFile(f"{_MINIMIND}/sft_mini_512.jsonl", "sft_mini_512.jsonl"),),
        "Apache-2.0", "jsonl", "sft"),
    DatasetSpec(
        "minimind-dpo", "minimind preference pairs {chosen, rejected} (jingyaogong/minimind_dataset)",
        (RemoteFile(f"{_MINIMIND}/dpo.jsonl", "dpo.jsonl"),),
        "Apache-2.0", "jsonl", "dpo"),
    DatasetSpec(
        "tinystories", "TinyStories (roneneldan/TinyStories): simple English stories, train 1.9 GB + valid 19 MB",
        (RemoteFile(f"{_TINYSTORIES}/TinyStories-train.txt", "TinyStories-train.txt", 1924281556,
                    "c5cf5e22ff13614e830afbe61a99fbcbe8bcb7dd72252b989fa1117a368d401f"),
         RemoteFile(f"{_TINYSTORIES}/TinyStories-valid.txt", "TinyStories-valid.txt", 19447282,
                    "94e431816c4cce81ff71e4408ff8d3bda9a42e8d2663986697c3954288cb38b4")),
        "CDLA-Sharing-1.0", "text", "pretrain"),
]}


class _Interrupted(Exception):
    """The transfer stopped part-way; what reached the disk is kept for the next attempt."""


def download(name_or_url: str, out_dir: str | Path, *, sha256: str | None = None, force: bool = False,
             progress: bool = True, timeout: float = 30, retries: int = 3) -> list[Path]:
    """Download a registry dataset, an http(s) URL or an `hf:owner/dataset[/path]` into `out_dir`.

    Returns the local paths. Files already present and verified are not fetched again (unless
    `force`); `sha256` is the expected digest of a single URL.
    """
    out_dir = Path(out_dir)
    if name_or_url.startswith("hf:"):
        return _download_hf(name_or_url[3:], out_dir, force=force)
    if urllib.parse.urlparse(name_or_url).scheme in ("http", "https"):
        if sha256 is not None and not _SHA256_RE.fullmatch(sha256.lower()):
            raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}")
        filename = Path(urllib.parse.unquote(urllib.parse.urlparse(name_or_url).path)).name or "download"
        files: tuple[RemoteFile, ...] = (RemoteFile(name_or_url, filename, None, sha256 and sha256.lower()),)
    elif name_or_url in DATASETS:
        if sha256 is not None:
            raise ValueError("sha256= is for a direct URL; registry datasets carry their own checksums")
        files = DATASETS[name_or_url].files
    else:
        raise DataError(f"unknown dataset {name_or_url!r}; known datasets: {', '.join(sorted(DATASETS))} "
                        "(or pass an http(s) URL, or hf:owner/dataset[/path])")
    out_dir.mkdir(parents=True, exist_ok=True)
    return [_fetch(f, out_dir, force=force, progress=progress, timeout=timeout, retries=retries) for f in files]


def _download_hf(spec: str, out_dir: Path, *, force: bool) -> list[Path]:
    parts = spec.strip("/").split("/", 2)
    if len(parts) < 2 or not all(parts):
        raise DataError(f"expected hf:owner/dataset[/path], got 'hf:{spec}'")
    try:
        import huggingface_hub
    except ImportError as exc:
        raise DataError("hf: downloads need the `huggingface_hub` package: pip install huggingface_hub") from exc
    repo_id = "/".join(parts[:2])
    try:
        if len(parts) == 3:
            return [Path(huggingface_hub.hf_hub_download(repo_id, parts[2], repo_type="dataset",
                                                         local_dir=out_dir, force_download=force))]
        root = Path(huggingface_hub.snapshot_download(repo_id, repo_type="dataset", local_dir=out_dir,
                                                      force_download=force))
    except Exception as exc:  # huggingface_hub raises many types (HTTP, offline, auth, not found)
        raise DataError(f"could not download hf:{spec} from the Hugging Face Hub: {exc}") from exc
    return sorted(p for p in root.rglob("*") if p.is_file() and ".cache" not in p.relative_to(root).parts)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_SIZE):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch(file: RemoteFile, out_dir: Path, *, force: bool, progress: bool, timeout: float, retries: int) -> Path:
    dest = out_dir / file.filename
    part = dest.with_name(dest.name + ".part")
    record = dest.with_name(dest.name + ".sha256")
    if force:
        for stale in (dest, part, record):
            stale.unlink(missing_ok=True)
    expected = file.sha256 or _read_record(record)
    if dest.exists():
        problem = _check(dest, file.size, expected)
        if problem is None:
            logger.info("%s is already downloaded and verified; skipping", dest)
            if expected is None:
                _write_record(record, dest, sha256_file(dest))
            return dest
        logger.warning("%s does not match (%s); downloading it again", dest, problem)
        dest.unlink()

    attempt = 0
    while True:
        try:
            _transfer(file.url, part, dest, timeout=timeout, progress=progress)
            break
        except _Interrupted as exc:
            attempt += 1
            have = part.stat().st_size if part.exists() else 0
            if attempt > retries:
                raise DataError(f"download of {file.url} failed {attempt} times ({exc}); rerun to resume from "
                                f"the {have} bytes kept in {part}") from exc
            logger.warning("download of %s interrupted (%s); resuming from byte %d (retry %d/%d)",
                           file.url, exc, have, attempt, retries)
            time.sleep(RETRY_BACKOFF_S * attempt)

    problem = _check(part, file.size, expected)
    if problem is not None:
        part.unlink()
        hint = f" (recorded in {record.name} at the first download)" if file.sha256 is None and expected else ""
        raise DataError(f"{file.filename} from {file.url} failed verification: {problem}{hint}; the "
                        "partial file was deleted, rerun to download it again")
    os.replace(part, dest)
    fsync_dir(dest.parent)
    if expected is None:
        _write_record(record, dest, sha256_file(dest))
    logger.info("downloaded %s", dest)
    return dest


def _transfer(url: str, part: Path, dest: Path, *, timeout: float, progress: bool) -> None:
    """Fetch `url` into `part`, continuing from the bytes already there; raise `_Interrupted` if cut short."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:
            _, total = _content_range(err.headers.get("Content-Range"))
            if total is None or total == offset:
                return  # nothing after `offset`: the partial file is complete; verification decides
            part.unlink()
            raise _Interrupted(f"{part.name} has {offset} bytes but the file has {total}; restarting") from err
        if err.code >= 500:
            raise _Interrupted(f"HTTP {err.code} {err.reason}") from err
        raise DataError(f"HTTP {err.code} {err.reason} for {url}") from err
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        reason = getattr(err, "reason", err)
        if isinstance(reason, (TimeoutError, ConnectionResetError, http.client.HTTPException)):
            raise _Interrupted(f"no response: {reason!r}") from err
        host = urllib.parse.urlparse(url).hostname
        raise DataError(f"could not reach {host} ({reason}); check your connection, or download {url} "
                        f"by hand and place it at {dest}") from err

    with response:
        if response.status == 206:
            start, total = _content_range(response.headers.get("Content-Range"))
            if start != offset:
                part.unlink()
                raise _Interrupted(f"server answered a different range than bytes={offset}-; restarting")
            mode = "ab"
        else:
            if offset:
                logger.info("server ignored the range request; restarting %s from zero", dest.name)
            mode, offset = "wb", 0
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        with open(part, mode) as f, tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                                         unit_divisor=1024, desc=dest.name, disable=not progress) as bar:
            try:
                while True:
                    try:
                        chunk = response.read(CHUNK_SIZE)
                    except (http.client.HTTPException, OSError) as err:  # reset or timeout mid-body
                        raise _Interrupted(f"connection lost: {err!r}") from err
                    if not chunk:
                        break
                    f.write(chunk)
                    bar.update(len(chunk))
            finally:
                f.flush()
                os.fsync(f.fileno())
    if total is not None and part.stat().st_size < total:
        raise _Interrupted(f"connection closed after {part.stat().st_size} of {total} bytes")


def _check(path: Path, size: int | None, sha256: str | None) -> str | None:
    """Why `path` is not the expected file, or None if it is."""
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        return f"expected {size} bytes, got {actual_size}"
    if sha256 is not None:
        actual = sha256_file(path)
        if actual != sha256:
            return f"expected sha256 {sha256}, got {actual}"
    return None


def _read_record(record: Path) -> str | None:
    if not record.exists():
        return None
    fields = record.read_text(encoding="utf-8").split()
    digest = fields[0].lower() if fields else ""
    if not _SHA256_RE.fullmatch(digest):
        raise DataError(f"{record}: not a sha256 record; delete it to accept the file as downloaded")
    return digest


def _write_record(record: Path, dest: Path, digest: str) -> None:
    atomic_write_text(record, f"{digest}  {dest.name}\n")
    logger.info("sha256 %s  %s (no published checksum; recorded in %s, later runs verify against it)",
                digest, dest.name, record.name)


def _content_range(header: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) from a `Content-Range` such as `bytes 100-199/200` or `bytes */200`."""
    match = re.fullmatch(r"bytes (?:(\d+)-\d+|\*)/(\d+|\*)", (header or "").strip())
    if match is None:
        return None, None
    start, total = match.groups()
    return (int(start) if start else None), (int(total) if total.isdigit() else None)
