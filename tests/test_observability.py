"""TensorBoard scalars, run plots and MFU (src/minillm/training/{logging,plots,mfu}.py)."""

import json
import logging

import pytest
import torch

from minillm.training import mfu as mfu_module
from minillm.training.logging import MetricsLogger, tensorboard_tag
from minillm.training.mfu import datasheet_peak_flops, measure_peak_flops, mfu, mfu_estimator, peak_flops
from minillm.training.plots import plot_run, read_metrics, series

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    directory = tmp_path / "cache"
    monkeypatch.setenv("MINILLM_CACHE_DIR", str(directory))
    return directory


def _train_records(steps=(10, 20, 30)):
    return [{"step": s, "loss": 5.0 - 0.1 * s, "grad_norm": 1.5, "lr": 1e-3 * s / 30, "tokens": 1000 * s,
             "tokens_per_s": 2000.0 + s, "mfu": 0.01 * s / 10} for s in steps]


# ---------------------------------------------------------------------------------------- TensorBoard
def test_tensorboard_tags():
    assert tensorboard_tag("loss") == "train/loss"
    assert tensorboard_tag("lr") == "train/lr"
    assert tensorboard_tag("val_loss") == "val/loss"
    assert tensorboard_tag("val_ppl") == "val/ppl"


def test_metrics_logger_writes_jsonl_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = MetricsLogger(tmp_path, total_steps=30, progress=False)
    for record in _train_records():
        logger.log(record)
    logger.log({"step": 30, "val_loss": 2.25, "val_ppl": 9.49})
    logger.close()

    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [10, 20, 30, 30]
    assert lines[0]["loss"] == pytest.approx(4.0) and "time" in lines[0]

    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/mfu", "val/loss",
            "val/ppl"} <= tags
    assert "train/step" not in tags and "train/time" not in tags
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [10, 20, 30]
    assert [e.value for e in loss] == pytest.approx([4.0, 3.0, 2.0])
    (val,) = acc.Scalars("val/loss")
    assert val.step == 30 and val.value == pytest.approx(2.25)


def test_metrics_logger_without_out_dir_or_tensorboard(tmp_path, monkeypatch, caplog):
    logger = MetricsLogger(None, total_steps=3, progress=False)
    logger.log({"step": 1, "loss": 1.0})
    logger.close()  # nothing written, nothing raised

    import builtins

    import minillm.training.logging as logging_module

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    monkeypatch.setattr(logging_module, "_warned_no_tensorboard", False)
    with caplog.at_level(logging.WARNING, logger="minillm.training"):
        for step in range(2):  # a run and its resumption
            logger = MetricsLogger(tmp_path, total_steps=3, initial_step=step, progress=False)
            logger.log({"step": step + 1, "loss": 1.0})
            logger.close()
    assert sum("TensorBoard logging is off" in r.getMessage() for r in caplog.records) == 1
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    assert not (tmp_path / "tensorboard").exists()


# ---------------------------------------------------------------------------------------- plots
def _write_metrics(run_dir, records):
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1024, path


def test_plot_run_writes_three_pngs(tmp_path):
    records = _train_records(range(10, 110, 10))
    records += [{"step": 50, "val_loss": 3.1, "val_ppl": 22.2}, {"step": 100, "val_loss": 2.5, "val_ppl": 12.2}]
    _write_metrics(tmp_path, sorted(records, key=lambda r: r["step"]))
    paths = plot_run(tmp_path)
    assert sorted(p.name for p in paths) == ["loss.png", "lr.png", "throughput.png"]
    for path in paths:
        assert path.parent == tmp_path / "plots"
        _assert_png(path)
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["loss.png", "lr.png", "throughput.png"]


def test_plot_run_skips_empty_series(tmp_path):
    _write_metrics(tmp_path, [{"step": 5, "val_loss": 3.0}, {"step": 10, "val_loss": 2.0}])
    paths = plot_run(tmp_path)
    assert [p.name for p in paths] == ["loss.png"]
    _assert_png(paths[0])


def test_plot_run_missing_or_empty_metrics(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_run(tmp_path / "nowhere")
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="metrics.jsonl"):
        plot_run(tmp_path)


def test_series_after_resume_keeps_latest_records(tmp_path):
    # Steps 10..30 logged, the run died and resumed from step 20: the second 30 replaces the first.
    _write_metrics(tmp_path, [{"step": 10, "loss": 3.0}, {"step": 20, "loss": 2.0}, {"step": 30, "loss": 9.0},
                              {"step": 30, "loss": 1.5}, {"step": 40, "loss": 1.0}])
    (tmp_path / "metrics.jsonl").open("a").write('{"step": 50, "lo')  # killed mid-write
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert series(records, "loss") == ([10.0, 20.0, 30.0, 40.0], [3.0, 2.0, 1.5, 1.0])


# ---------------------------------------------------------------------------------------- MFU
def test_measure_peak_flops_cpu_is_cached(cache_dir, monkeypatch):
    first = measure_peak_flops("cpu", torch.float32)
    assert 1e8 < first < 1e14  # 0.1 GFLOP/s .. 100 TFLOP/s
    assert (cache_dir / "peak_flops.json").is_file()

    def fail(*args, **kwargs):
        raise AssertionError("timed again instead of reading the cache")

    monkeypatch.setattr(mfu_module, "time_matmul", fail)
    assert measure_peak_flops("cpu", torch.float32) == first
    assert peak_flops("cpu") == first  # CPUs have no datasheet entry: the measured value
    with pytest.raises(AssertionError):  # another dtype is another key
        measure_peak_flops("cpu", torch.float64)
    with pytest.raises(AssertionError):  # another thread count is another key
        monkeypatch.setattr(torch, "get_num_threads", lambda: 999)
        measure_peak_flops("cpu", torch.float32)


def test_corrupt_cache_is_remeasured(cache_dir, monkeypatch):
    cache_dir.mkdir()
    (cache_dir / "peak_flops.json").write_text("{not json")
    monkeypatch.setattr(mfu_module, "time_matmul", lambda device, dtype, n: 2 * n**3 / 5e10)
    assert measure_peak_flops("cpu", torch.float32) == pytest.approx(5e10)
    assert list(json.loads((cache_dir / "peak_flops.json").read_text()).values()) == [pytest.approx(5e10)]


def test_mfu_arithmetic():
    # 10k tokens/s × 6·1e9 FLOPs/token = 6e13 FLOP/s on a 312 TFLOP/s A100 ≈ 19.2 %
    assert mfu(10_000, 6e9, 312e12) == pytest.approx(6e13 / 312e12)
    assert mfu(0, 6e9, 1e12) == 0
    with pytest.raises(ValueError):
        mfu(1, 1, 0)


def test_mfu_estimator(monkeypatch):
    class Model:
        def flops_per_token(self, seq_len=None):
            return 1e6 if seq_len is None else 1e6 + seq_len

    monkeypatch.setattr(mfu_module, "peak_flops", lambda device, dtype=None: 1e10)
    estimate = mfu_estimator(Model(), "cpu", None)
    assert estimate(1000) == pytest.approx(0.1)
    assert estimate(1000, 1000) == pytest.approx(0.1001)
    assert mfu_estimator(object(), "cpu") is None


@pytest.mark.parametrize("name, dtype, expected", [
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312e12),
    ("NVIDIA A100 80GB PCIe", torch.float16, 312e12),
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989e12),
    ("NVIDIA H100 PCIe", torch.bfloat16, 756e12),
    ("NVIDIA H200", torch.bfloat16, 989e12),
    ("NVIDIA GH200 480GB", torch.bfloat16, 989e12),
    ("Tesla V100-SXM2-16GB", torch.float16, 125e12),
    ("Tesla V100-SXM2-16GB", torch.bfloat16, None),
    ("NVIDIA GeForce RTX 4090", torch.bfloat16, 165e12),
    ("NVIDIA A10", torch.bfloat16, 125e12),
    ("NVIDIA L4", torch.bfloat16, 121e12),
    ("Tesla T4", torch.float16, 65e12),
    ("NVIDIA A100-SXM4-80GB", torch.float32, None),  # fp32: measured, not looked up
    ("Some Future GPU", torch.bfloat16, None),
])
def test_datasheet_lookup(name, dtype, expected):
    assert datasheet_peak_flops(name, dtype) == expected


def test_peak_flops_uses_datasheet_for_known_gpu(monkeypatch):
    monkeypatch.setattr(mfu_module, "device_name", lambda device: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(mfu_module, "measure_peak_flops", lambda *a: pytest.fail("measured a known GPU"))
    assert peak_flops("cuda", torch.bfloat16) == 989e12
    monkeypatch.setattr(mfu_module, "measure_peak_flops", lambda device, dtype: 1.0)
    assert peak_flops("cuda", torch.float32) == 1.0


def test_measuring_the_peak_leaves_the_global_rng_alone(tmp_path, monkeypatch):
    from minillm.training import mfu as mfu_module
    from minillm.training.precision import cpu_bf16_is_fast

    monkeypatch.setenv("MINILLM_CACHE_DIR", str(tmp_path))
    state = torch.get_rng_state()
    mfu_module.measure_peak_flops(torch.device("cpu"), torch.float32)
    cpu_bf16_is_fast.cache_clear()
    cpu_bf16_is_fast()
    assert torch.equal(torch.get_rng_state(), state)


def test_metrics_of_steps_after_the_resume_point_are_not_kept_twice(tmp_path):
    """A run killed at step 30 after saving step 20 logs 21..30 again when resumed; a fresh run into the
    same directory starts a new file."""
    logger = MetricsLogger(tmp_path, total_steps=30, progress=False)
    for record in _train_records():
        logger.log(record)
    logger.close()
    with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 31, "lo')  # a line cut by the kill
    resumed = MetricsLogger(tmp_path, total_steps=40, initial_step=20, progress=False)
    resumed.log({"step": 30, "loss": 2.5})
    resumed.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in lines] == [(10, 4.0), (20, 3.0), (30, 2.5)]
    MetricsLogger(tmp_path, total_steps=5, progress=False).close()
    assert (tmp_path / "metrics.jsonl").read_text() == ""
