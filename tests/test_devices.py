"""mia.devices: one resolver, one-line errors; fp32 without TF32 on CUDA."""
from __future__ import annotations

import pytest
import torch

from mia.devices import ieee_fp32, resolve_device
from mia.errors import MIAError


def test_auto_and_explicit():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device("cpu") == torch.device("cpu")


def test_unknown_device_is_a_one_line_error():
    with pytest.raises(MIAError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_says_so():
    with pytest.raises(MIAError, match="CUDA is not available"):
        resolve_device("cuda:1")


def test_a_cuda_index_the_machine_lacks_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(MIAError, match=r"'cuda:2' asked for, but this machine has 2 CUDA device\(s\): cuda:0 to cuda:1"):
        resolve_device("cuda:2")


def test_ieee_fp32_turns_tf32_off_on_cuda_and_restores_it():
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = matmul.fp32_precision, conv.fp32_precision
    # set through torch's new API, after which reading the legacy allow_tf32 flags raises
    matmul.fp32_precision, conv.fp32_precision = "none", "tf32"
    try:
        with ieee_fp32(torch.device("cuda")):  # the flags only: settable without a GPU
            assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
        assert (matmul.fp32_precision, conv.fp32_precision) == ("none", "tf32")  # restored exactly
        with ieee_fp32(torch.device("cpu")):  # nothing to change on the CPU
            assert conv.fp32_precision == "tf32"
        with ieee_fp32(torch.device("cuda"), enabled=False):  # bf16 autocast: TF32 does not apply
            assert conv.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision, conv.fp32_precision = before


def test_demo_statistics_are_computed_without_tf32(monkeypatch):
    """The demo's own figures (train and held-out accuracy, demo.json's losses) come from logits under
    ieee_fp32, as scoring's do: on CUDA they do not depend on the process's TF32 settings."""
    import contextlib

    import mia.demo

    entered = []

    @contextlib.contextmanager
    def recording(dev, enabled=True):
        entered.append((dev, enabled))
        yield

    monkeypatch.setattr(mia.demo, "ieee_fp32", recording)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    logits = mia.demo._logits(model, torch.zeros(5, 1, 2, 2), torch.device("cpu"), batch_size=2)
    assert logits.shape == (5, 3) and logits.dtype == torch.float64
    assert entered == [(torch.device("cpu"), True)]
