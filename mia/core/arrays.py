"""Array-likes (numpy arrays, torch tensors, lists) as numpy arrays, without importing torch."""
from __future__ import annotations

import numpy as np

__all__ = ["to_numpy"]


def to_numpy(x: object) -> np.ndarray:
    """``x`` as a numpy array: a torch tensor (recognised by its methods) is detached and moved to the CPU,
    and a half-precision float one (bf16, fp16: numpy has no bf16) widened to float32, which holds it
    exactly; anything else through ``np.asarray``."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu()
        if x.dtype.is_floating_point and x.dtype.itemsize < 4:
            x = x.float()
        return x.numpy()
    return np.asarray(x)
