"""mia.devices: one resolver, one-line errors."""
from __future__ import annotations

import pytest
import torch

from mia.devices import resolve_device
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
