"""Query views with Gaussian noise and label-only scoring (mia.scoring)."""
from __future__ import annotations

import warnings

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
    assert precision_tag("cuda") == precision_tag("cuda", "fp32") == f"device=cuda;fp32-no-tf32;torch={torch.__version__}"
    assert precision_tag("cuda", "bf16") == f"device=cuda;bf16-autocast-fp32-head;torch={torch.__version__}"
    assert precision_tag("cpu", "bf16") == f"device=cpu;bf16-autocast-fp32-head;torch={torch.__version__}"
    assert precision_tag("cpu", compile=True) == f"device=cpu;fp32;compiled;torch={torch.__version__}"
    tags = ("", precision_tag("cpu"), precision_tag("cuda"), precision_tag("cuda", "bf16"), precision_tag("cpu", "bf16"))
    keys = {cache_key(f, f, (IDENTITY,), None, "", p) for p in tags}
    assert len(keys) == 5  # a bf16 GPU run and an fp32 CPU run never share cached logits


def _small_convnet(classes: int = 7) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, classes))


def test_bf16_scoring_keeps_the_classifier_head_in_fp32():
    from mia.scoring import classifier_head

    model = _small_convnet()
    images = np.random.default_rng(0).normal(size=(9, 3, 8, 8)).astype(np.float32)
    head = classifier_head(model)
    assert head is model[-1]
    seen = {}
    probe = head.register_forward_hook(lambda m, i, o: seen.update(input=i[0].detach().clone()))
    with_head = compute_logits(model, images, device="cpu", precision="bf16", batch_size=4)[0]
    probe.remove()
    # the head's output is exactly fp32 arithmetic on its (bf16) input, not bf16-rounded logits
    with torch.no_grad():
        expected = torch.nn.functional.linear(seen["input"].float(), head.weight, head.bias)[-1].numpy()
    np.testing.assert_array_equal(with_head[-1], expected)
    all_bf16 = compute_logits(model, images, device="cpu", precision="bf16", fp32_head=False)[0]
    assert (torch.from_numpy(all_bf16).bfloat16().float().numpy() == all_bf16).all()  # bf16-representable
    assert not (torch.from_numpy(with_head).bfloat16().float().numpy() == with_head).all()
    fp32 = compute_logits(model, images, device="cpu", precision="fp32")[0]
    assert np.abs(with_head - fp32).max() < 0.05  # bf16 body: close, not equal
    assert not model[-1]._forward_hooks  # the hook is removed afterwards


def test_precision_auto_is_fp32_on_every_device(monkeypatch):
    from mia.scoring import resolve_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # resolving only, nothing runs on CUDA
    assert resolve_precision("cpu") == resolve_precision("cuda") == "fp32"
    assert resolve_precision("cpu", "bf16") == resolve_precision("cuda", "bf16") == "bf16"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("cpu", "fp16")


def test_scoring_leaves_the_model_trainable():
    """compute_logits moves the model outside inference mode: its parameters stay normal tensors, so the
    caller can train it or load weights into it afterwards."""
    model = _small_convnet()
    compute_logits(model, np.zeros((4, 3, 8, 8), np.float32), device="cpu")
    assert not any(p.is_inference() for p in model.parameters())
    model.train()
    model(torch.zeros(2, 3, 8, 8)).sum().backward()
    model.load_state_dict(_small_convnet().state_dict())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_scoring_agrees_with_the_cpu():
    model = _small_convnet()
    images = np.random.default_rng(1).normal(size=(64, 3, 8, 8)).astype(np.float32)
    cpu = compute_logits(model, images, device="cpu", precision="fp32")
    gpu = compute_logits(model, images, device="cuda")  # the default: fp32 without TF32
    assert np.abs(gpu - cpu).max() < 1e-4 and (gpu.argmax(-1) == cpu.argmax(-1)).all()
    bf16 = compute_logits(model, images, device="cuda", precision="bf16")
    assert np.abs(bf16 - cpu).max() < 0.05 and (bf16.argmax(-1) == cpu.argmax(-1)).mean() > 0.95


def _tiny_convnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(4, 5))


def test_a_failing_compile_warns_and_scores_uncompiled(monkeypatch):
    model = _tiny_convnet()
    images = np.random.default_rng(1).normal(size=(10, 3, 8, 8)).astype(np.float32)
    eager = compute_logits(model, images, (IDENTITY, FLIP), device="cpu", batch_size=4)

    def broken(module, **kwargs):
        def fail(*args, **kw):
            raise RuntimeError("no C++ compiler\nsecond line")
        return fail

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(RuntimeWarning, match="torch.compile failed .RuntimeError: no C.. compiler.; scoring without"):
        logits = compute_logits(_tiny_convnet(), images, (IDENTITY, FLIP), device="cpu", batch_size=4, compile=True)
    np.testing.assert_array_equal(logits, eager)


@pytest.mark.slow
def test_compiled_scoring_matches_eager_on_the_cpu():
    """torch.compile with the CPU's C++ backend (tens of seconds to compile): the same logits up to rounding,
    for batches of two shapes (the last batch is smaller) and a second call reusing the compiled model."""
    model = _tiny_convnet()
    images = np.random.default_rng(2).normal(size=(10, 3, 8, 8)).astype(np.float32)
    eager = compute_logits(model, images, (IDENTITY, FLIP), device="cpu", batch_size=4)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="torch.compile failed")  # the compiled path, not the fallback
        compiled = compute_logits(model, images, (IDENTITY, FLIP), device="cpu", batch_size=4, compile=True)
        again = compute_logits(model, images[:4], (IDENTITY,), device="cpu", batch_size=4, compile=True)
    np.testing.assert_allclose(compiled, eager, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(again[0], eager[0, :4], rtol=1e-5, atol=1e-5)
    assert getattr(model, "_mia_compiled", None) is not None
