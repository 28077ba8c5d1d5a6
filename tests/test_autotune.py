"""`precision: auto` and `compile: auto` decide by the measured step times of the model (autotune.py)."""

import json
import logging

import pytest
import torch

from minillm.model import MiniGPT, MiniGPTConfig
from minillm.training import autotune
from minillm.training.autotune import (
    ProbeRun,
    choose_compile,
    choose_precision,
    cpu_has_native_bf16,
    probe_run,
)
from minillm.training.trainer import Trainer, TrainingConfig

WITH_BF16 = "processor : 0\nflags : fpu sse2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
WITHOUT_BF16 = "processor : 0\nflags : fpu sse2 avx2 fma avx512f\n"
RUN = ProbeRun(batch_size=4, seq_len=16, total_steps=100_000)


class FakeProbe:
    """Stands in for `StepProbe`: each copy's step "takes" the seconds given; counts what was asked."""

    instances: list["FakeProbe"] = []

    def __init__(self, seconds: dict[str, float], fail_compile: bool = False) -> None:
        self.seconds, self.fail_compile = seconds, fail_compile
        self.added: list[str] = []
        self.timed: list[str] = []
        self.compile_steps = 0

    def __call__(self, model, device, batch_size, seq_len) -> "FakeProbe":
        FakeProbe.instances.append(self)
        return self

    def add(self, name, autocast_dtype, compiled=False) -> None:
        self.added.append(name)

    def time(self, name) -> float:
        self.timed.append(name)
        if name == "compiled":
            if self.fail_compile:
                raise RuntimeError("no C++ compiler found")
            self.compile_steps += 1
            if self.compile_steps <= autotune.COMPILE_WARMUP_STEPS:  # the compiling steps
                return self.seconds["compile_s"] / autotune.COMPILE_WARMUP_STEPS + self.seconds["compiled"]
        return self.seconds[name]


@pytest.fixture
def model():
    torch.manual_seed(0)
    return MiniGPT(MiniGPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, intermediate_size=32, max_position_embeddings=32))


@pytest.fixture(autouse=True)
def measuring(monkeypatch):
    monkeypatch.setenv(autotune.SWITCH_ENV, "1")


def test_cpu_flags_decide_whether_bf16_is_a_candidate(model, tmp_path):
    assert cpu_has_native_bf16(WITH_BF16) and not cpu_has_native_bf16(WITHOUT_BF16)
    assert not cpu_has_native_bf16("flags : avx512f\nbugs : amx_bf16\n")  # only the flags line counts
    probe = FakeProbe({"fp32": 0.010, "bf16": 0.001})  # bf16 "faster", but emulated here: never tried
    decision = choose_precision(model, "cpu", RUN, probe_factory=probe, cache_file=tmp_path / "c.json",
                                cpuinfo=WITHOUT_BF16)
    assert decision.choice == "fp32" and decision.source == "rule"
    assert probe.added == [] and not (tmp_path / "c.json").exists()


@pytest.mark.parametrize(("fp32", "bf16", "expected"), [(0.004, 0.003, "bf16"), (0.004, 0.005, "fp32")])
def test_precision_follows_the_measured_step_times(model, tmp_path, caplog, fp32, bf16, expected):
    probe = FakeProbe({"fp32": fp32, "bf16": bf16})
    with caplog.at_level(logging.INFO, logger="minillm.training"):
        decision = choose_precision(model, "cpu", RUN, probe_factory=probe, cache_file=tmp_path / "c.json",
                                    cpuinfo=WITH_BF16)
    assert decision.choice == expected and decision.source == "measured"
    assert decision.ms_per_step == {"fp32": fp32 * 1e3, "bf16": bf16 * 1e3}
    assert sorted(set(probe.added)) == ["bf16", "fp32"]
    assert probe.timed.count("bf16") >= autotune.ROUNDS  # interleaved rounds, not one sample
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("precision auto"))
    other = "fp32" if expected == "bf16" else "bf16"
    assert line.startswith(f"precision auto: {expected} (")
    assert f"{fp32 * 1e3:.1f} ms/step" in line and f"{bf16 * 1e3:.1f} ms/step" in line and other in line
    assert str(tmp_path / "c.json") in line


def test_cache_is_hit_for_the_same_key_and_missed_when_it_changes(model, tmp_path, monkeypatch):
    cache = tmp_path / "autotune.json"
    first = FakeProbe({"fp32": 0.004, "bf16": 0.002})
    assert choose_precision(model, "cpu", RUN, probe_factory=first, cache_file=cache, cpuinfo=WITH_BF16).choice == "bf16"
    entries = json.loads(cache.read_text())
    assert len(entries) == 1 and next(iter(entries.values()))["key"]["batch"] == [4, 16]

    again = FakeProbe({"fp32": 0.001, "bf16": 0.009})  # would flip the choice if it were asked
    decision = choose_precision(model, "cpu", RUN, probe_factory=again, cache_file=cache, cpuinfo=WITH_BF16)
    assert (decision.choice, decision.source) == ("bf16", "cached") and again.timed == []

    other_shape = ProbeRun(batch_size=4, seq_len=32, total_steps=100_000)
    decision = choose_precision(model, "cpu", other_shape, probe_factory=again, cache_file=cache, cpuinfo=WITH_BF16)
    assert (decision.choice, decision.source) == ("fp32", "measured") and again.timed

    monkeypatch.setattr(autotune, "device_name", lambda device: "another CPU")
    elsewhere = FakeProbe({"fp32": 0.001, "bf16": 0.009})
    decision = choose_precision(model, "cpu", RUN, probe_factory=elsewhere, cache_file=cache, cpuinfo=WITH_BF16)
    assert decision.source == "measured" and elsewhere.timed
    assert len(json.loads(cache.read_text())) == 3


def test_short_runs_and_the_switch_are_not_measured(model, tmp_path, monkeypatch):
    probe = FakeProbe({"fp32": 0.004, "bf16": 0.002})
    short = ProbeRun(4, 16, autotune.MIN_STEPS - 1)
    assert choose_precision(model, "cpu", short, probe_factory=probe, cpuinfo=WITH_BF16).choice is None
    quick = FakeProbe({"fp32": autotune.MIN_RUN_S / RUN.total_steps / 2, "bf16": 0.0})
    assert choose_precision(model, "cpu", RUN, probe_factory=quick, cache_file=tmp_path / "c.json",
                            cpuinfo=WITH_BF16).source == "skipped"
    assert "bf16" not in quick.added  # one fp32 step showed the run is short
    monkeypatch.setenv(autotune.SWITCH_ENV, "0")
    assert choose_precision(model, "cpu", RUN, probe_factory=probe, cpuinfo=WITH_BF16).choice is None
    assert choose_compile(model, "cpu", RUN, None, probe_factory=probe).choice == "eager"
    assert probe.added == []


@pytest.mark.parametrize(("steps", "expected"), [(10_000, "compiled"), (1_000, "eager")])
def test_compile_auto_amortises_the_compile_time(model, tmp_path, steps, expected):
    # 10 ms saved per step against 30 s of compiling: it pays from 3000 steps on
    probe = FakeProbe({"eager": 0.100, "compiled": 0.090, "compile_s": 30.0})
    decision = choose_compile(model, "cpu", ProbeRun(4, 16, steps), None, probe_factory=probe,
                              cache_file=tmp_path / "c.json")
    assert decision.choice == expected and decision.source == "measured"
    assert decision.compile_s == pytest.approx(30.0, abs=0.01)
    # the cached timings are judged again with the next run's length
    again = FakeProbe({"eager": 0.1, "compiled": 0.01, "compile_s": 0.0})
    other = choose_compile(model, "cpu", ProbeRun(4, 16, 20_000 if expected == "eager" else 1_000), None,
                           probe_factory=again, cache_file=tmp_path / "c.json")
    assert other.source == "cached" and other.choice != expected and again.timed == []


def test_compile_is_not_tried_when_it_could_not_pay_off(model, tmp_path):
    probe = FakeProbe({"eager": 0.010, "compiled": 0.001, "compile_s": 0.0})
    # 2000 steps of 10 ms: even 1.5x faster steps would save under 7 s, less than compiling takes
    decision = choose_compile(model, "cpu", ProbeRun(4, 16, 2000), None, probe_factory=probe,
                              cache_file=tmp_path / "c.json")
    assert (decision.choice, decision.source) == ("eager", "bound") and "compiled" not in probe.added


def test_a_failing_torch_compile_falls_back_to_eager(model, tmp_path, caplog):
    probe = FakeProbe({"eager": 0.100, "compiled": 0.001, "compile_s": 0.0}, fail_compile=True)
    with caplog.at_level(logging.WARNING, logger="minillm.training"):
        decision = choose_compile(model, "cpu", RUN, None, probe_factory=probe, cache_file=tmp_path / "c.json")
    assert decision.choice == "eager" and "no C++ compiler found" in decision.reason
    assert any("torch.compile failed" in r.getMessage() for r in caplog.records)
    again = FakeProbe({"eager": 0.100, "compiled": 0.001, "compile_s": 0.0})
    assert choose_compile(model, "cpu", RUN, None, probe_factory=again,
                          cache_file=tmp_path / "c.json").choice == "eager" and again.timed == []


def test_the_step_probe_times_real_steps_and_leaves_the_rng_alone(model):
    state = torch.get_rng_state()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe = autotune.StepProbe(model, torch.device("cpu"), 2, 8)
    probe.add("fp32", None)
    assert probe.time("fp32") > 0 and probe.time("fp32") > 0
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # a copy trained, not it


def test_probe_run_reads_the_shape_without_drawing_a_batch():
    windows = torch.utils.data.TensorDataset(torch.zeros(10, 33))

    class Windows(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return {"input_ids": torch.zeros(33, dtype=torch.long)}

    assert probe_run(Windows(), batch_size=4, max_steps=None, epochs=2) == ProbeRun(4, 33, 6)
    assert probe_run(torch.utils.data.DataLoader(Windows(), batch_size=5), 4, max_steps=7) == ProbeRun(5, 33, 7)
    batches = [{"input_ids": torch.zeros(3, 12, dtype=torch.long)}] * 4
    assert probe_run(batches, 16, grad_accum_steps=2) == ProbeRun(3, 12, 2)
    assert probe_run(iter(batches), 16) is None and probe_run(windows, 4) is None and probe_run(None, 4) is None


def test_trainer_uses_and_records_the_choices(model, monkeypatch):
    monkeypatch.setattr(autotune, "cpu_has_native_bf16", lambda cpuinfo=None: True)

    def fake_precision(model, device, run, **kwargs):
        assert run == ProbeRun(2, 8, 500)
        return autotune.Decision("bf16", "measured", {"fp32": 4.0, "bf16": 3.0})

    def fake_compile(model, device, run, autocast_dtype, **kwargs):
        assert autocast_dtype is torch.bfloat16
        return autotune.Decision("eager", "measured", {"eager": 3.0, "compiled": 2.9}, compile_s=30.0)

    monkeypatch.setattr("minillm.training.precision.choose_precision", fake_precision)
    monkeypatch.setattr("minillm.training.precision.choose_compile", fake_compile)
    batches = [{"input_ids": torch.zeros(2, 8, dtype=torch.long), "labels": torch.zeros(2, 8, dtype=torch.long)}]
    trainer = Trainer(model, config=TrainingConfig(max_steps=500, compile="auto", progress=False), device="cpu",
                      train_data=batches)
    assert trainer.autocast_dtype is torch.bfloat16
    assert trainer.autotune["precision"]["choice"] == "bf16"
    assert trainer.autotune["compile"] == {"choice": "eager", "source": "measured",
                                           "ms_per_step": {"eager": 3.0, "compiled": 2.9}, "compile_s": 30.0}
    explicit = Trainer(model, config=TrainingConfig(precision="fp32", compile=False, progress=False), device="cpu")
    assert explicit.autocast_dtype is None and explicit.autotune == {}


def test_compile_setting_accepts_auto_and_refuses_other_strings():
    assert TrainingConfig(compile="auto").compile == "auto"
    with pytest.raises(ValueError, match="compile must be true, false or auto"):
        TrainingConfig(compile="yes")
