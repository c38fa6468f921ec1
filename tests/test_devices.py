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
