"""Query views with Gaussian noise and label-only scoring (mia.scoring)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mia.scoring import FLIP, IDENTITY, View, apply_view, cache_key, compute_logits, noise_pattern, noise_views


def test_noise_views_layout():
    views = noise_views((0.5, 1.0), 3)
    assert len(views) == 12
    assert [v.noise for v in views] == [0.5] * 6 + [1.0] * 6
    assert [v.flip for v in views] == ([False] * 3 + [True] * 3) * 2
    assert [v.draw for v in views] == list(range(12))  # every query its own pattern
    assert views[4].name == "flip:noise0.5#4"
    assert len({v.name for v in views}) == 12
    with pytest.raises(ValueError):
        noise_views((0.5,), 0)
    with pytest.raises(ValueError):
        noise_views((0.0,), 2)
    with pytest.raises(ValueError):
        View(noise=-1.0)


def test_noise_is_added_after_flip_and_shift():
    images = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    view = View(flip=True, dx=1, noise=0.25, draw=7)
    pattern = noise_pattern((1, 4, 4), 7)
    expected = apply_view(images, View(flip=True, dx=1)) + 0.25 * pattern[None]
    torch.testing.assert_close(apply_view(images, view), expected)
    # the same pattern for every image of the batch, every call; other draws differ
    assert torch.equal(noise_pattern((1, 4, 4), 7), pattern)
    assert not torch.equal(noise_pattern((1, 4, 4), 8), pattern)
    assert abs(float(noise_pattern((3, 64, 64), 0).std()) - 1.0) < 0.02
    # views without noise are unchanged, as are their names (cache keys of earlier runs stay valid)
    assert IDENTITY.name == "id" and FLIP.name == "flip"
    torch.testing.assert_close(apply_view(images, IDENTITY), images)


def test_labels_only_scoring_is_argmax_and_batch_independent():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5))
    images = np.random.default_rng(0).normal(size=(23, 3, 8, 8)).astype(np.float32)
    views = (IDENTITY,) + noise_views((0.3, 3.0), 2)
    logits = compute_logits(model, images, views, device="cpu", batch_size=6)
    labels = compute_logits(model, images, views, device="cpu", batch_size=23, labels_only=True)
    assert labels.shape == (len(views), 23) and labels.dtype == np.int64
    np.testing.assert_array_equal(labels, logits.argmax(-1))
    # large noise changes predictions, and differently for each draw
    assert (labels[-1] != labels[0]).any() and (labels[-1] != labels[-2]).any()
    # the noise is part of the cache key
    assert len({cache_key(__file__, __file__, (v,), None) for v in views}) == len(views)


def test_precision_is_part_of_the_logits_cache_key(tmp_path, monkeypatch):
    from mia.scoring import IDENTITY, cache_key, precision_tag

    f = tmp_path / "f"
    f.write_bytes(b"x")
    assert precision_tag("cpu") == f"device=cpu;fp32;torch={torch.__version__}"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the tag only, nothing runs on CUDA
    assert precision_tag("cuda") == f"device=cuda;bf16-autocast;torch={torch.__version__}"
    keys = {cache_key(f, f, (IDENTITY,), None, "", p) for p in ("", precision_tag("cpu"), precision_tag("cuda"))}
    assert len(keys) == 3  # a bf16 GPU run and an fp32 CPU run never share cached logits
