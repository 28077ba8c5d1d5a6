"""`minillm bench` (minillm.benchmarks.performance): the quick run measures both implementations on the same
weights and reports ratios; the command-line entry writes JSON. Speed itself is never asserted (the test
machines are shared and noisy)."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from minillm.benchmarks.performance import (
    BenchmarkSettings,
    config_runs,
    format_table,
    run_benchmark,
    training_shape,
)

pytest.importorskip("transformers")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def quick_result():
    return run_benchmark(quick=True, device="cpu", repeats=1)


def test_quick_run_measures_both_implementations(quick_result):
    (preset,) = quick_result["presets"]
    assert preset["preset"] == "tiny" and preset["transformers_model"] == "LlamaForCausalLM"
    for name in ("minillm", "transformers"):
        assert preset["training"][name]["tokens_per_s"] > 0
        assert 0 < preset["training"][name]["mfu"]
        assert preset["training"][name]["peak_memory_mb"] > 0
        for kind in ("prefill", "decode"):
            assert preset["generation"][name][f"{kind}_tokens_per_s"] > 0
    assert quick_result["peak_flops"]["measured"] > 0
    json.dumps(quick_result)  # JSON-ready as it is


def test_transformers_twin_runs_on_the_same_weights(quick_result):
    checks = quick_result["presets"][0]["checks"]
    initial = checks["initial_loss"]
    # the same weights and batch give the same loss; independent weights would differ by far more
    assert initial["minillm"] == pytest.approx(initial["transformers"], abs=1e-5)
    assert checks["max_logit_diff"] < 1e-4
    assert checks["max_loss_diff"] < 1e-3
    assert checks["identical_greedy"]


def test_table_reports_ratios(quick_result):
    table = format_table(quick_result)
    assert "ratio" in table
    for row in ("train tokens/s", "train MFU", "train peak memory MB", "prefill tokens/s", "decode tokens/s"):
        assert row in table
    assert "greedy tokens identical" in table


def test_bench_command_writes_json(tmp_path, capsys):
    from minillm.cli import main

    out = tmp_path / "bench" / "results.json"
    assert main(["bench", "--quick", "--device", "cpu", "--repeats", "1", "--no-transformers",
                 "--out", str(out)]) == 0
    data = json.loads(out.read_text(encoding="utf-8"))
    (preset,) = data["presets"]
    assert preset["training"]["minillm"]["tokens_per_s"] > 0
    assert "transformers" not in preset["training"] and preset["transformers_model"] is None
    assert "train tokens/s" in capsys.readouterr().out


def test_training_shapes_are_read_from_the_pretrain_configs():
    runs = config_runs()
    for path in sorted(CONFIGS.glob("pretrain_*.yaml")):
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
        preset = config["model"]["preset"]
        assert training_shape(preset, BenchmarkSettings(torch.device("cpu"), "fp32")) == (
            config["training"]["batch_size"], config["data"]["max_length"], config["tokenizer"]["vocab_size"]), path.name
        assert runs[preset]["max_steps"] == config["max_steps"], path.name


def test_unknown_preset_is_refused_by_name():
    with pytest.raises(ValueError, match="nano"):
        run_benchmark(["nano"], quick=True)
