"""mia.training: the training loop of demo victims and reference models."""
from __future__ import annotations

import pytest

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch

from mia.models.registry import repo_builder
from mia.training import (
    TrainRecipe,
    apply_augmentation,
    augment_batch,
    epoch_batches,
    epoch_plan,
    n_batches,
    train_classifier,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_resnet34_trains_on_odd_batches_with_two_threads():
    """Regression: channels_last + 2 threads made ResNet34's CPU backward corrupt memory on odd batch sizes
    (segfault or 'double free' in torch 2.14). Run in a child so that a crash fails this test only."""
    script = textwrap.dedent("""
        import numpy as np, torch
        from mia.models.registry import repo_builder
        from mia.training import TrainRecipe, train_classifier
        torch.set_num_threads(2)
        torch.manual_seed(0)
        model = repo_builder("resnet34").build(10, 4)
        rng = np.random.default_rng(0)
        x = rng.normal(size=(97, 3, 32, 32)).astype(np.float32)  # batches of 64 and 33
        y = rng.integers(0, 10, 97)
        out = train_classifier(model, x, y, TrainRecipe(epochs=2, batch_size=64, pad=2), seed=0,
                               device=torch.device("cpu"), progress=False)
        assert np.isfinite(out["final_loss"])
        print("trained")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "trained" in proc.stdout, proc.stderr[-2000:]


def test_epoch_batches_merge_a_trailing_single_record():
    g = torch.Generator().manual_seed(0)
    sizes = [len(b) for b in epoch_batches(129, 64, g)]
    assert sizes == [64, 65] and n_batches(129, 64) == 2
    assert sorted(torch.cat(epoch_batches(129, 64, g)).tolist()) == list(range(129))
    assert [len(b) for b in epoch_batches(1, 64, g)] == [1] and n_batches(1, 64) == 1
    assert n_batches(130, 64) == 3


def test_epoch_plan_draws_what_the_batch_by_batch_loop_drew():
    """The epoch's random numbers drawn up front (one copy to the device per epoch) are the numbers the
    loop used to draw batch by batch: the same batches, the same augmented images, the generator left in
    the same state."""
    x = torch.arange(37 * 1 * 4 * 4, dtype=torch.float32).reshape(37, 1, 4, 4)
    g_old, g_new = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    old = [(b, augment_batch(x[b], g_old, 2)) for b in epoch_batches(37, 8, g_old)]
    new = epoch_plan(37, 8, g_new, True, 2, torch.device("cpu"))
    assert len(old) == len(new)
    for (b_old, x_old), (b_new, draw) in zip(old, new):
        assert torch.equal(b_old, b_new) and torch.equal(x_old, apply_augmentation(x[b_new], *draw, 2))
    assert torch.equal(g_old.get_state(), g_new.get_state())
    plain = epoch_plan(37, 8, torch.Generator().manual_seed(7), False, 2, torch.device("cpu"))
    assert [d for _, d in plain] == [None] * len(plain) and [len(b) for b, _ in plain] == [len(b) for b, _ in old]


def test_augment_batch_flip_only_keeps_pixels():
    x = torch.arange(2 * 1 * 2 * 3, dtype=torch.float32).reshape(2, 1, 2, 3)
    out = augment_batch(x, torch.Generator().manual_seed(0), pad=0)
    for i in range(2):
        assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(-1))


def test_training_is_deterministic_for_a_seed():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3, 32, 32)).astype(np.float32)
    y = rng.integers(0, 10, 40)
    weights = []
    for _ in range(2):
        torch.manual_seed(0)
        model = repo_builder("vgg16").build(10, 4)
        train_classifier(model, x, y, TrainRecipe(epochs=1, batch_size=16), seed=3, device=torch.device("cpu"),
                         progress=False)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])


def test_adam_trains_and_differs_from_sgd():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(24, 3, 8, 8)).astype(np.float32)
    y = rng.integers(0, 3, 24)
    out = {}
    for name in ("sgd", "adam"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        stats = train_classifier(model, x, y, TrainRecipe(epochs=2, batch_size=8, lr=0.01, optimizer=name), seed=0,
                                 device=torch.device("cpu"), progress=False)
        out[name] = torch.cat([p.detach().flatten() for p in model.parameters()])
        assert not torch.equal(out[name], before) and np.isfinite(stats["final_loss"])
    assert not torch.allclose(out["sgd"], out["adam"])
    with pytest.raises(ValueError, match="optimizer"):
        train_classifier(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 3)), x, y,
                         TrainRecipe(epochs=1, optimizer="lbfgs"), seed=0, device=torch.device("cpu"), progress=False)


class _Constant(torch.nn.Module):
    """A teacher whose softmax puts 0.9 on class 0 for every image."""

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 3)
        logits[:, 0] = np.log(0.9 / 0.05)  # softmax: 0.9, 0.05, 0.05
        return logits


def test_a_student_learns_its_teachers_posteriors_not_the_labels():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(48, 3, 8, 8)).astype(np.float32)
    y = rng.integers(1, 3, 48)  # labels 1 and 2 only: the teacher never says either
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
    stats = train_classifier(model, x, y, TrainRecipe(epochs=30, batch_size=16, lr=0.05, augment=False), seed=0,
                             device=torch.device("cpu"), progress=False, teacher=_Constant())
    with torch.no_grad():
        p = model(torch.from_numpy(x)).softmax(1).numpy()
    assert (p.argmax(1) == 0).all() and stats["final_train_acc"] == 0.0  # accuracy still counts the labels
    np.testing.assert_allclose(p.mean(0), [0.9, 0.05, 0.05], atol=0.03)  # soft targets, not one-hot


def test_a_hard_teacher_gives_its_predicted_labels_only():
    """hard_teacher: the student learns the teacher's argmax (a label-only attacker's view of it), so it grows
    far more confident than the teacher's 0.9."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(48, 3, 8, 8)).astype(np.float32)
    y = rng.integers(1, 3, 48)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
    train_classifier(model, x, y, TrainRecipe(epochs=30, batch_size=16, lr=0.05, augment=False, hard_teacher=True),
                     seed=0, device=torch.device("cpu"), progress=False, teacher=_Constant())
    with torch.no_grad():
        p = model(torch.from_numpy(x)).softmax(1).numpy()
    assert (p.argmax(1) == 0).all() and p[:, 0].min() > 0.97  # one-hot targets: far above the teacher's 0.9
