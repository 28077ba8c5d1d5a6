"""`resolve_device`: the one rule behind `--device auto`, and a clear error for a device name torch lacks."""

import pytest
import torch

from minillm.device import DeviceError, resolve_device
from minillm.errors import MiniLLMError


@pytest.fixture
def machine(monkeypatch):
    """Pretend this machine has the accelerators named: `machine(cuda=True)`, `machine(mps=True)`, ..."""

    def set_up(cuda: bool = False, mps: bool = False) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)

    return set_up


@pytest.mark.parametrize("name", ["auto", None, "AUTO"])
@pytest.mark.parametrize(("cuda", "mps", "expected"),
                         [(True, True, "cuda"), (True, False, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_auto_prefers_cuda_then_mps_then_cpu(machine, name, cuda, mps, expected):
    machine(cuda=cuda, mps=mps)
    assert resolve_device(name) == torch.device(expected)


def test_default_is_auto(machine):
    machine()
    assert resolve_device() == torch.device("cpu")


@pytest.mark.parametrize("name", ["cpu", "cuda", "cuda:1", "mps", torch.device("cuda", 0)])
def test_explicit_names_pass_through(machine, name):
    machine(cuda=True, mps=True)
    assert resolve_device(name) == torch.device(name)


def test_explicit_cpu_even_with_a_gpu(machine):
    machine(cuda=True)
    assert resolve_device("cpu").type == "cpu"


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "", "cpu cuda"])
def test_unknown_name_raises_naming_it(machine, name):
    machine()
    with pytest.raises(ValueError, match=f"unknown device {name!r}"):
        resolve_device(name)


@pytest.mark.parametrize(("name", "missing"), [("cuda", "CUDA"), ("cuda:1", "CUDA"), ("mps", "MPS")])
def test_missing_accelerator_raises_naming_it(machine, name, missing):
    machine()
    with pytest.raises(ValueError, match=f"'{name}'.*{missing}"):
        resolve_device(name)


def test_a_bad_device_is_a_user_error_of_the_cli(machine, tmp_path, capsys):
    from minillm.cli import main

    machine()
    assert issubclass(DeviceError, ValueError) and issubclass(DeviceError, MiniLLMError)
    assert main(["bench", "--quick", "--device", "gpu", "--no-transformers"]) == 2
    assert "unknown device 'gpu'" in capsys.readouterr().err
