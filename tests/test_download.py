"""Downloads against a local HTTP server on 127.0.0.1: resume, verification, offline errors, registry."""

from __future__ import annotations

import hashlib
import random
import re
import socket
import sys
import threading
import types
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import pytest

from minillm.data import download as dl
from minillm.data.download import DATASETS, DatasetSpec, RemoteFile, download
from minillm.data.formats import DataError

SIZE = 256 * 1024
DATA = random.Random(0).randbytes(SIZE)
DIGEST = hashlib.sha256(DATA).hexdigest()


@dataclass
class FileServer:
    """Serves files from `root`; `cut_after` bytes, for the first `cuts` responses, then drops the connection."""

    root: Path
    ignore_range: bool = False
    cut_after: int | None = None
    cuts: int = 1
    requests: int = 0
    ranges: list[str | None] = field(default_factory=list)
    bytes_sent: int = 0
    url: str = ""

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        self.requests += 1
        requested = handler.headers.get("Range")
        self.ranges.append(requested)
        path = self.root / handler.path.lstrip("/")
        if not path.is_file():
            handler.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        if requested and not self.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", requested)[1])
            if start >= len(data):
                handler.send_response(416)
                handler.send_header("Content-Range", f"bytes */{len(data)}")
                handler.send_header("Content-Length", "0")
                handler.end_headers()
                return
            handler.send_response(206)
            handler.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            handler.send_response(200)
        body = data[start:]
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if self.cut_after is not None and self.cuts > 0:
            self.cuts -= 1
            body = body[: self.cut_after]  # the headers promised more: the client sees a cut connection
        handler.wfile.write(body)
        self.bytes_sent += len(body)


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    (root / "blob.bin").write_bytes(DATA)
    state = FileServer(root)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            state.handle(self)

        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/blob.bin"
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch):
    monkeypatch.setattr(dl, "RETRY_BACKOFF_S", 0.0)


def fetch(url: str, out: Path, **kwargs) -> list[Path]:
    return download(url, out, progress=False, timeout=5, **kwargs)


def test_download_with_checksum(server, tmp_path):
    (path,) = fetch(server.url, tmp_path / "out", sha256=DIGEST)
    assert path == tmp_path / "out" / "blob.bin"
    assert path.read_bytes() == DATA
    assert not path.with_name("blob.bin.part").exists()
    assert server.ranges == [None]


def test_cut_connection_resumes_with_range(server, tmp_path):
    server.cut_after = SIZE // 2
    (path,) = fetch(server.url, tmp_path / "out", sha256=DIGEST)
    assert path.read_bytes() == DATA
    assert server.ranges == [None, f"bytes={SIZE // 2}-"]
    assert server.bytes_sent < 2 * SIZE


def test_retries_exhausted_keeps_part_for_next_run(server, tmp_path):
    server.cut_after, server.cuts = 10_000, 3
    out = tmp_path / "out"
    with pytest.raises(DataError, match="rerun to resume"):
        fetch(server.url, out, sha256=DIGEST, retries=2)
    assert (out / "blob.bin.part").stat().st_size == 30_000
    assert not (out / "blob.bin").exists()
    (path,) = fetch(server.url, out, sha256=DIGEST)
    assert path.read_bytes() == DATA
    assert server.ranges[-1] == "bytes=30000-"


def test_leftover_part_is_resumed(server, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "blob.bin.part").write_bytes(DATA[:100_000])
    (path,) = fetch(server.url, out, sha256=DIGEST)
    assert path.read_bytes() == DATA
    assert server.ranges == ["bytes=100000-"]
    assert server.bytes_sent == SIZE - 100_000


def test_complete_part_answered_416_is_finished(server, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "blob.bin.part").write_bytes(DATA)
    (path,) = fetch(server.url, out, sha256=DIGEST)
    assert path.read_bytes() == DATA
    assert server.requests == 1 and server.bytes_sent == 0


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    server.ignore_range = True
    out = tmp_path / "out"
    out.mkdir()
    (out / "blob.bin.part").write_bytes(b"garbage that must not survive")
    (path,) = fetch(server.url, out, sha256=DIGEST)
    assert path.read_bytes() == DATA
    assert server.ranges == ["bytes=29-"]


def test_wrong_checksum_leaves_nothing_behind(server, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DataError) as info:
        fetch(server.url, out, sha256="0" * 64)
    message = str(info.value)
    assert "blob.bin" in message and "0" * 64 in message and DIGEST in message
    assert not (out / "blob.bin").exists() and not (out / "blob.bin.part").exists()
    (path,) = fetch(server.url, out, sha256=DIGEST)
    assert path.read_bytes() == DATA
    assert server.ranges == [None, None]


def test_unreachable_server_gives_offline_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    url = f"http://127.0.0.1:{port}/corpus.txt"
    with pytest.raises(DataError) as info:
        fetch(url, tmp_path / "out")
    message = str(info.value)
    assert "could not reach 127.0.0.1" in message and url in message
    assert str(tmp_path / "out" / "corpus.txt") in message


def test_verified_file_is_not_fetched_again(server, tmp_path):
    out = tmp_path / "out"
    fetch(server.url, out, sha256=DIGEST)
    assert server.requests == 1
    (path,) = fetch(server.url, out, sha256=DIGEST)
    assert path.read_bytes() == DATA and server.requests == 1
    fetch(server.url, out, sha256=DIGEST, force=True)
    assert server.requests == 2


def test_unpublished_checksum_is_recorded_and_enforced(server, tmp_path):
    out = tmp_path / "out"
    (path,) = fetch(server.url, out)
    record = out / "blob.bin.sha256"
    assert record.read_text() == f"{DIGEST}  blob.bin\n"
    fetch(server.url, out)
    assert server.requests == 1  # verified against the record, no network
    path.write_bytes(b"corrupted")
    fetch(server.url, out)  # a damaged copy is fetched again and checked against the record
    assert server.requests == 2 and path.read_bytes() == DATA
    (server.root / "blob.bin").write_bytes(DATA[::-1])  # upstream changed: the record catches it
    path.unlink()
    with pytest.raises(DataError, match="blob.bin.sha256"):
        fetch(server.url, out)


def test_registry_name_downloads_and_checks_size(server, tmp_path, monkeypatch):
    good = DatasetSpec("local", "test corpus", (RemoteFile(server.url, "corpus.bin", SIZE, DIGEST),),
                       "CC0", "text", "pretrain")
    monkeypatch.setitem(DATASETS, "local", good)
    (path,) = download("local", tmp_path / "out", progress=False, timeout=5)
    assert path.name == "corpus.bin" and path.read_bytes() == DATA
    bad = DatasetSpec("bad", "wrong size", (RemoteFile(server.url, "bad.bin", SIZE + 1, None),), "CC0", "text",
                      "pretrain")
    monkeypatch.setitem(DATASETS, "bad", bad)
    with pytest.raises(DataError, match=f"expected {SIZE + 1} bytes, got {SIZE}"):
        download("bad", tmp_path / "out", progress=False, timeout=5)
    assert not (tmp_path / "out" / "bad.bin").exists()


def test_registry_entries_are_well_formed():
    filenames = []
    for name, spec in DATASETS.items():
        assert spec.name == name and spec.description and spec.license and spec.files
        assert spec.format in {"text", "jsonl", "json", "parquet"}
        assert spec.stage in {"pretrain", "sft", "dpo", "eval"}
        for f in spec.files:
            assert urlparse(f.url).scheme == "https" and urlparse(f.url).hostname
            assert f.size is None or (isinstance(f.size, int) and f.size > 0)
            assert f.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", f.sha256)
            filenames.append(f.filename)
    assert len(filenames) == len(set(filenames))
    assert {"tinyshakespeare", "wikitext-2", "wikitext-103", "wikipedia-zh", "minimind-pretrain",
            "minimind-sft", "minimind-dpo", "tinystories"} <= set(DATASETS)


def test_unknown_name_lists_known_names(tmp_path):
    with pytest.raises(DataError) as info:
        download("no-such-corpus", tmp_path)
    assert "no-such-corpus" in str(info.value)
    assert all(name in str(info.value) for name in DATASETS)


def test_hf_without_huggingface_hub_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(DataError, match="huggingface_hub"):
        download("hf:owner/data/train.jsonl", tmp_path)


def test_hf_file_goes_through_hf_hub_download(tmp_path, monkeypatch):
    calls = []

    def hf_hub_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs))
        return str(tmp_path / filename)

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=hf_hub_download))
    paths = download("hf:owner/data/sub/train.jsonl", tmp_path)
    assert paths == [tmp_path / "sub" / "train.jsonl"]
    assert calls == [("owner/data", "sub/train.jsonl",
                      {"repo_type": "dataset", "local_dir": tmp_path, "force_download": False})]
