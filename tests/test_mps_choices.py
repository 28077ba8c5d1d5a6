"""Apple GPUs (MPS) are chosen by `device=auto` after CUDA, and training there makes MPS-safe choices:
`precision: auto` is bf16 only where MPS computes in it (else fp32), never measured by timing; `compile:
auto` stays eager; fused AdamW only where torch has the kernel for the device. There is no Apple GPU here,
so these run on the CPU with the device's answers mocked; MPS is not yet measured on real hardware."""

from __future__ import annotations

import pytest
import torch

from minillm import device as device_module
from minillm.device import resolve_device
from minillm.training import autotune, precision
from minillm.training.precision import choose_autocast_dtype, choose_compiled, resolve_precision

MPS = torch.device("mps")


@pytest.fixture
def no_measuring(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("auto on MPS must not time candidates")
    monkeypatch.setattr(precision, "choose_precision", refuse)
    monkeypatch.setattr(precision, "choose_compile", refuse)


def test_auto_picks_mps_when_there_is_no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device_module, "_mps_available", lambda: True)
    assert resolve_device("auto") == MPS
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto").type == "cuda"


@pytest.mark.parametrize("bf16, expected", [(True, torch.bfloat16), (False, None)])
def test_auto_precision_on_mps_is_bf16_only_where_it_computes(monkeypatch, no_measuring, bf16, expected):
    monkeypatch.setattr(precision, "mps_supports_bf16", lambda: bf16)
    assert resolve_precision("auto", MPS) == expected
    dtype, decision = choose_autocast_dtype("auto", torch.nn.Linear(2, 2), MPS, None, distributed=False)
    assert dtype == expected and decision["reason"] == "rule (MPS)"
    assert decision["choice"] == ("bf16" if bf16 else "fp32")


def test_explicit_precisions_are_kept_on_mps(no_measuring):
    assert resolve_precision("fp32", MPS) is None and resolve_precision("bf16", MPS) == torch.bfloat16


def test_compile_auto_stays_eager_on_mps(no_measuring):
    compiled, decision = choose_compiled("auto", torch.nn.Linear(2, 2), MPS, None, None, distributed=False)
    assert compiled is False and decision["choice"] == "eager"
    assert choose_compiled(True, torch.nn.Linear(2, 2), MPS, None, None, distributed=False)[0] is True


@pytest.mark.parametrize("kernels, expected", [(["cuda", "cpu", "mps"], True), (["cuda", "cpu"], False)])
def test_fused_adamw_only_where_torch_has_the_kernel(monkeypatch, kernels, expected):
    import torch.utils._foreach_utils as foreach_utils

    monkeypatch.setattr(foreach_utils, "_get_fused_kernels_supported_devices", lambda: kernels)
    assert autotune.adamw_fused_ok(MPS) is expected


def test_mps_bf16_probe_is_false_without_mps(monkeypatch):
    monkeypatch.setattr(device_module, "_mps_available", lambda: False)
    assert device_module.mps_supports_bf16() is False
