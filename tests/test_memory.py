import pytest
import torch

from minillm.model.config import MiniGPTConfig
from minillm.model.transformer import MiniGPT
from minillm.training.memory import (
    MemoryConfig,
    MemoryEstimate,
    MemoryMonitor,
    count_parameters,
    estimate_memory,
    measure_peak_training_memory,
)

MB = 2 ** 20

CONFIGS = [  # (preset, overrides, batch, seq_len)
    ("tiny", {}, 4, 128),
    ("tiny", {}, 16, 256),
    ("micro", {"vocab_size": 4096}, 4, 128),
    ("micro", {"vocab_size": 4096}, 4, 256),
    ("gpt-micro", {"vocab_size": 4096}, 4, 128),
]


def _compare(preset, overrides, batch, seq_len, checkpointing):
    torch.manual_seed(0)
    config = MiniGPTConfig.from_preset(preset, **overrides)
    model = MiniGPT(config)
    model.gradient_checkpointing_enable(checkpointing)
    measured = measure_peak_training_memory(model, batch, seq_len)
    estimate = estimate_memory(config, batch, seq_len, gradient_checkpointing=checkpointing)
    ratio = estimate.total / measured
    print(f"{preset:>9} {overrides!s:<22} B={batch:<3} T={seq_len:<4} ckpt={checkpointing!s:<5} "
          f"estimate {estimate.total / MB:7.1f} MB  measured {measured / MB:7.1f} MB  ratio {ratio:.2f}")
    return estimate.total, measured, ratio


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("preset,overrides,batch,seq_len", CONFIGS)
def test_estimate_within_30_percent_of_measured_peak(preset, overrides, batch, seq_len, checkpointing):
    _, _, ratio = _compare(preset, overrides, batch, seq_len, checkpointing)
    assert 0.7 <= ratio <= 1.3


def test_checkpointing_reduces_estimate_and_measurement():
    plain_est, plain_meas, _ = _compare("micro", {"vocab_size": 4096}, 16, 128, False)
    ckpt_est, ckpt_meas, _ = _compare("micro", {"vocab_size": 4096}, 16, 128, True)
    assert ckpt_est < 0.7 * plain_est
    assert ckpt_meas < 0.7 * plain_meas


@pytest.mark.parametrize("preset,overrides", [
    ("tiny", {}), ("micro", {}), ("gpt-micro", {}), ("gpt2", {}), ("minimind-moe", {}),
    ("tiny", {"qk_norm": True, "qkv_bias": True, "tie_word_embeddings": False}),
])
def test_count_parameters_matches_the_model(preset, overrides):
    config = MiniGPTConfig.from_preset(preset, **overrides)
    assert count_parameters(config) == MiniGPT(config).num_parameters()


def test_static_components_match_hand_computation():
    config = MiniGPTConfig.from_preset("tiny")
    params = MiniGPT(config).num_parameters()
    rope_tables = 2 * config.max_position_embeddings * config.attention_head_dim * 4  # cos + sin, fp32
    est = estimate_memory(config, batch_size=2, seq_len=64)
    assert est.weights == params * 4 + rope_tables
    assert est.gradients == params * 4
    assert est.optimizer == params * 8  # AdamW: exp_avg + exp_avg_sq
    assert est.total == est.weights + est.gradients + est.optimizer + est.activations
    # mixed precision keeps fp32 weights, gradients and optimizer state; activations shrink
    bf16 = estimate_memory(config, batch_size=2, seq_len=64, precision="bf16")
    assert (bf16.weights, bf16.gradients, bf16.optimizer) == (est.weights, est.gradients, est.optimizer)
    assert estimate_memory(config, 2, 64, optimizer="sgd").optimizer == 0


def test_trainable_fraction_shrinks_gradients_and_optimizer():
    config = MiniGPTConfig.from_preset("micro")
    full = estimate_memory(config, 4, 128)
    lora = estimate_memory(config, 4, 128, trainable_fraction=0.01)
    assert lora.weights == full.weights and lora.activations == full.activations
    assert lora.gradients == pytest.approx(full.gradients * 0.01, rel=1e-3)
    assert lora.optimizer == pytest.approx(full.optimizer * 0.01, rel=1e-3)
    assert lora.total < full.total


def test_estimate_scales_and_formats():
    config = MiniGPTConfig.from_preset("micro")
    small, large = estimate_memory(config, 4, 128), estimate_memory(config, 8, 128)
    assert large.activations == pytest.approx(2 * small.activations, rel=0.01)
    table = estimate_memory(MiniGPTConfig.from_preset("gpt2"), 8, 1024).format()
    for word in ("weights", "gradients", "optimizer", "activations", "total", "GB"):
        assert word in table
    assert isinstance(small, MemoryEstimate)


@pytest.mark.parametrize("kwargs,field", [
    ({"batch_size": 0, "seq_len": 8}, "batch_size"),
    ({"batch_size": 1, "seq_len": 8, "optimizer": "adagrad"}, "optimizer"),
    ({"batch_size": 1, "seq_len": 8, "precision": "fp8"}, "precision"),
    ({"batch_size": 1, "seq_len": 8, "trainable_fraction": 1.5}, "trainable_fraction"),
])
def test_estimate_rejects_bad_arguments(kwargs, field):
    with pytest.raises(ValueError, match=field):
        estimate_memory(MiniGPTConfig.from_preset("tiny"), **kwargs)


def test_memory_monitor_on_cpu():
    monitor = MemoryMonitor("cpu")
    before = monitor.snapshot()
    assert before["rss_mb"] > 10 and before["peak_rss_mb"] >= before["rss_mb"] > 0
    assert not any(key.startswith("cuda") for key in before)
    block = torch.ones(128 * MB // 4)  # 128 MB, touched (the allocator may reuse freed pages, so
    after = monitor.snapshot()          # RSS need not grow by as much; it must hold the block)
    assert after["rss_mb"] >= 128 and after["peak_rss_mb"] >= after["rss_mb"]
    del block
    monitor.reset_peak()
    assert monitor.snapshot()["peak_rss_mb"] > 0


@pytest.mark.parametrize("kwargs,field", [
    ({"micro_batch_size": 0}, "micro_batch_size"),
    ({"grad_accum_steps": -2}, "grad_accum_steps"),
    ({"grad_accum_steps": 1.5}, "grad_accum_steps"),
    ({"gradient_checkpointing": "yes"}, "gradient_checkpointing"),
    ({"optimizer_offload": 1}, "optimizer_offload"),
])
def test_memory_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MemoryConfig(**kwargs)


def test_memory_config_defaults_and_effective_batch():
    assert MemoryConfig().effective_batch_size(16) == 16
    assert MemoryConfig(micro_batch_size=4, grad_accum_steps=8).effective_batch_size(16) == 32
