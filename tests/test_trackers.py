"""`training.report_to`: the trackers beside metrics.jsonl (src/minillm/training/logging.py).

Each real tracker (Trackio, Weights & Biases offline, SwanLab offline) gets a tiny training run in a child
process whose environment points the library's data directory into tmp_path; what the library stored is
read back and must hold exactly the metrics.jsonl values under the same names and steps. The libraries
are optional: their tests skip where one is not installed."""

from __future__ import annotations

import json
import os
import sqlite3
import struct
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

import minillm.training.logging as logging_module
from minillm.data.pretrain import LanguageModelingDataset
from minillm.errors import MiniLLMError
from minillm.model import MiniGPT, MiniGPTConfig
from minillm.recipes.config import RunConfigError, load_run_config
from minillm.recipes.run import training_config
from minillm.training.logging import TRACKERS, MetricsLogger, TrackerUnavailableError
from minillm.training.trainer import PreTrainer, TrainingConfig

RUN_NAME = "tiny-run"
# A tiny run: 4 steps, every step logged, validation at steps 2 and 4 (two records at those steps).
TRAIN = """
import sys
import numpy as np, torch
from minillm.data.pretrain import LanguageModelingDataset
from minillm.model import MiniGPT, MiniGPTConfig
from minillm.training.trainer import PreTrainer
torch.manual_seed(0)
model = MiniGPT(MiniGPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                              num_key_value_heads=1, intermediate_size=64, max_position_embeddings=32))
data = LanguageModelingDataset(np.random.default_rng(0).integers(0, 64, 2000), None, 16)
PreTrainer(model, None, train_data=data, eval_data=data, max_steps=4, log_every=1, eval_every=2, eval_batches=2,
           batch_size=4, out_dir=sys.argv[1], progress=False, precision="fp32",
           report_to=sys.argv[2].split(",")).train()
"""


def _tiny_trainer(out_dir: Path | None, **options) -> PreTrainer:
    torch.manual_seed(0)
    model = MiniGPT(MiniGPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  num_key_value_heads=1, intermediate_size=64, max_position_embeddings=32))
    data = LanguageModelingDataset(np.random.default_rng(0).integers(0, 64, 2000), None, 16)
    return PreTrainer(model, None, train_data=data, eval_data=data, max_steps=4, log_every=1, eval_every=2,
                      eval_batches=2, batch_size=4, out_dir=str(out_dir) if out_dir else None, progress=False,
                      precision="fp32", **options)


def _expected(run_dir: Path) -> dict[int, dict[str, float]]:
    """metrics.jsonl by step: every numeric field but `step` and `time`, the records of a step merged."""
    by_step: dict[int, dict[str, float]] = defaultdict(dict)
    for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        by_step[record["step"]].update({k: v for k, v in record.items() if k not in ("step", "time")
                                        and isinstance(v, (int, float)) and not isinstance(v, bool)})
    return dict(by_step)


def _train_in_child(tmp_path: Path, tracker: str, env: dict[str, str | None]) -> Path:
    """Train the tiny run in a fresh process (the libraries read their directories at import or setup);
    `env` sets variables, or unsets those it maps to None."""
    run_dir = tmp_path / RUN_NAME
    child_env = {**os.environ, **env}
    child_env = {name: value for name, value in child_env.items() if value is not None}
    done = subprocess.run([sys.executable, "-c", TRAIN, str(run_dir), tracker], env=child_env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = _expected(run_dir)
    assert sorted(expected) == [1, 2, 3, 4] and {"loss", "lr", "grad_norm", "val_loss"} <= set(expected[4])
    return run_dir


# ---------------------------------------------------------------------------------------- the option
def test_report_to_is_validated_and_normalised():
    assert TrainingConfig().report_to == ("tensorboard",)
    assert TrainingConfig(report_to=["wandb", "trackio", "wandb"]).report_to == ("wandb", "trackio")
    assert TrainingConfig(report_to="swanlab,tensorboard").report_to == ("swanlab", "tensorboard")
    for nothing in ([], (), "none", "", ["none"]):
        assert TrainingConfig(report_to=nothing).report_to == ()
    with pytest.raises(ValueError, match=r"unknown tracker 'mlflow'; allowed: tensorboard, wandb, swanlab, trackio"):
        TrainingConfig(report_to=["wandb", "mlflow"])


def test_report_to_in_run_configs(tmp_path):
    assert load_run_config()["training"].get("report_to") is None  # not set: the dataclass default
    assert training_config(load_run_config()).report_to == ("tensorboard",)
    assert training_config(load_run_config(overrides=["training.report_to=[wandb]"])).report_to == ("wandb",)
    assert training_config(load_run_config(overrides=["training.report_to=none"])).report_to == ()
    assert training_config(load_run_config(overrides=["training.report_to=[]"])).report_to == ()
    config = tmp_path / "cfg.yaml"
    config.write_text("training:\n  report_to:\n    - tensorboard\n    - trackio\n", encoding="utf-8")
    assert training_config(load_run_config(config)).report_to == ("tensorboard", "trackio")

    config.write_text("training:\n  batch_size: 4\n  report_to: [wandb, neptune]\n", encoding="utf-8")
    with pytest.raises(RunConfigError) as error:
        load_run_config(config)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{config}:3: training: report_to=")
    assert "unknown tracker 'neptune'" in message and all(name in message for name in TRACKERS)
    with pytest.raises(RunConfigError, match=r"override 'training.report_to=\[neptune\]'.*'neptune'"):
        load_run_config(overrides=["training.report_to=[neptune]"])
    with pytest.raises(RunConfigError, match=r"training.report_to=5: not a valid"):
        load_run_config(overrides=["training.report_to=5"])


@pytest.mark.parametrize("tracker", ["wandb", "swanlab", "trackio"])
def test_a_missing_library_fails_when_the_trainer_is_built(tmp_path, monkeypatch, tracker):
    monkeypatch.setitem(sys.modules, tracker, None)  # `import tracker` now raises ImportError
    with pytest.raises(TrackerUnavailableError) as error:
        _tiny_trainer(tmp_path / "run", report_to=["tensorboard", tracker])
    assert isinstance(error.value, MiniLLMError) and "\n" not in str(error.value)
    assert str(error.value).startswith(f"training.report_to includes {tracker!r} but the {tracker} package is "
                                       "not installed: pip install 'mini-llm[trackers]'")
    assert not (tmp_path / "run").exists()  # refused before anything ran
    _tiny_trainer(None, report_to=["tensorboard"])  # without that tracker the same trainer builds


# ---------------------------------------------------------------------------------------- the plumbing
class _Recorder:
    """A stand-in tracker that keeps what it was given."""

    made: list[_Recorder] = []

    def __init__(self, run_name, config):
        self.run_name, self.config, self.logged, self.closed = run_name, config, [], False
        _Recorder.made.append(self)

    def log(self, metrics, step):
        self.logged.append((step, dict(metrics)))

    def close(self):
        self.closed = True


@pytest.fixture
def recorder(monkeypatch):
    _Recorder.made = []
    monkeypatch.setitem(logging_module._TRACKER_CLASSES, "wandb", _Recorder)
    monkeypatch.setattr(logging_module, "_import_tracker", lambda name: None)
    return _Recorder


def test_trackers_get_the_metrics_jsonl_values_from_the_main_rank_only(tmp_path, recorder):
    _tiny_trainer(tmp_path / RUN_NAME, report_to=["wandb"]).train()
    (tracker,) = recorder.made
    assert tracker.closed and tracker.run_name == RUN_NAME
    assert tracker.config["training"]["max_steps"] == 4 and tracker.config["model"]["hidden_size"] == 32
    logged: dict[int, dict[str, float]] = defaultdict(dict)
    for step, metrics in tracker.logged:
        assert "step" not in metrics and "time" not in metrics
        logged[step].update(metrics)
    assert dict(logged) == _expected(tmp_path / RUN_NAME)
    assert not (tmp_path / RUN_NAME / "tensorboard").exists()  # not named, not written

    recorder.made = []
    trainer = _tiny_trainer(tmp_path / "other-rank", report_to=["wandb"])
    trainer.is_main = False  # what a torchrun rank other than 0 holds
    trainer.train()
    assert recorder.made == []


def test_metrics_logger_skips_records_without_numbers(tmp_path, recorder):
    logger = MetricsLogger(tmp_path, total_steps=2, progress=False, report_to=["wandb"], run_config={"a": 1})
    logger.log({"step": 0, "autotune": {"precision": {"choice": "fp32"}}, "note": "text", "flag": True})
    logger.log({"step": 1, "loss": 2.5, "tokens": 64, "flag": True})
    logger.close()
    (tracker,) = recorder.made
    assert tracker.logged == [(1, {"loss": 2.5, "tokens": 64})] and tracker.config == {"a": 1}
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_tensorboard_stays_the_default_and_can_be_turned_off(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _tiny_trainer(tmp_path / "default").train()
    acc = EventAccumulator(str(tmp_path / "default" / "tensorboard"))
    acc.Reload()
    expected = _expected(tmp_path / "default")
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == \
        [(s, pytest.approx(m["loss"])) for s, m in expected.items()]
    assert [e.step for e in acc.Scalars("val/loss")] == [2, 4]

    _tiny_trainer(tmp_path / "none", report_to="none").train()
    assert (tmp_path / "none" / "metrics.jsonl").is_file() and not (tmp_path / "none" / "tensorboard").exists()


# ---------------------------------------------------------------------------------------- the libraries
def _merge_by_step(rows) -> dict[int, dict[str, float]]:
    by_step: dict[int, dict[str, float]] = defaultdict(dict)
    for step, key, value in rows:
        by_step[step][key] = value
    return dict(by_step)


def test_trackio_stores_the_metrics_jsonl_values(tmp_path):
    pytest.importorskip("trackio")
    store = tmp_path / "trackio"
    run_dir = _train_in_child(tmp_path, "trackio", {"TRACKIO_DIR": str(store)})
    with sqlite3.connect(store / "minillm.db") as db:  # one database per project
        rows = db.execute("SELECT step, metrics FROM metrics WHERE run_name = ? ORDER BY id", (RUN_NAME,)).fetchall()
        (config,) = db.execute("SELECT config FROM configs WHERE run_name = ?", (RUN_NAME,)).fetchone()
    stored = _merge_by_step((step, k, v) for step, metrics in rows for k, v in json.loads(metrics).items())
    assert stored == _expected(run_dir)
    assert json.loads(config)["training"]["max_steps"] == 4


def _wandb_records(path: Path):
    """The protobuf records of a W&B transaction log (`run-*.wandb`): a 7-byte file header, then LevelDB
    log chunks (crc32c, length, type) in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_stores_the_metrics_jsonl_values(tmp_path):
    pytest.importorskip("wandb")
    store = tmp_path / "wandb-store"
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(store), "WANDB_SILENT": "true",
           "WANDB_CACHE_DIR": str(store / "cache"), "WANDB_CONFIG_DIR": str(store / "config"),
           "WANDB_DATA_DIR": str(store / "data")}
    env.update({name: None for name in ("WANDB_PROJECT", "WANDB_NAME")})
    run_dir = _train_in_child(tmp_path, "wandb", env)
    (log,) = store.glob("wandb/offline-run-*/run-*.wandb")
    rows, run = [], None
    for record in _wandb_records(log):
        if record.HasField("history"):  # one row per step; `_step`, `_runtime`, `_timestamp` are wandb's own
            rows += [(record.history.step.num, "/".join(item.nested_key) or item.key, json.loads(item.value_json))
                     for item in record.history.item]
        elif record.HasField("run"):
            run = record.run
    assert _merge_by_step(r for r in rows if not r[1].startswith("_")) == _expected(run_dir)
    assert run is not None and run.project == "minillm" and run.display_name == RUN_NAME
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["training"]["max_steps"] == 4 and config["model"]["hidden_size"] == 32


def test_swanlab_offline_stores_the_metrics_jsonl_values(tmp_path):
    pytest.importorskip("swanlab")
    try:
        from swanlab.proto.swanlab.record.v1.record_pb2 import Record
        from swanlab.sdk.internal.core_python.store import DataStoreReader
    except ImportError:
        pytest.skip("this swanlab version has no offline run reader")
    store = tmp_path / "swanlog"
    env = {"SWANLAB_MODE": "offline", "SWANLAB_LOG_DIR": str(store), "SWANLAB_ROOT": str(tmp_path / "swanroot"),
           "SWANLAB_PROJ_NAME": None, "SWANLAB_EXP_NAME": None}
    run_dir = _train_in_child(tmp_path, "swanlab", env)
    (log,) = store.glob("run-*/run-*.swanlab")
    reader = DataStoreReader()
    reader.open(log)
    rows, start = [], None
    for data in reader:
        record = Record()
        record.ParseFromString(data)
        if record.HasField("scalar"):
            rows.append((record.scalar.step, record.scalar.key, record.scalar.value.number))
        elif record.HasField("start"):
            start = record.start
    assert _merge_by_step(rows) == _expected(run_dir)
    assert start is not None and start.project == "minillm" and start.name == RUN_NAME
    assert "max_steps: 4" in next(store.glob("run-*/files/config.yaml")).read_text(encoding="utf-8")
