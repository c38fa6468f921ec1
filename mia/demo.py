# size: one idea, the demo bundle: its fingerprinted recipe (DemoConfig), splits, victim training and the atomic
# replacement of the folder; the data reading lives in mia/io/fashion_mnist.py.
"""The demo bundle: a challenge-layout bundle built from Fashion-MNIST, with an answer key.

The Trustworthy ML Challenge 2022 ships victims, eval records (with membership) and test records
(without). The demo bundle has exactly that layout, plus ``answers/`` holding the test membership, so
the whole workflow (load -> score -> choose a threshold on eval -> predict test) can be run and
*measured*::

    <out>/models/<arch>_fashionmnist.pth          {'net': state_dict, 'acc': held-out %, 'epoch'}
    <out>/models/{resnet34,vgg,mobilenetv2}.py    the repository architecture files used to train
    <out>/datasets/eval/fashionmnist_<arch>.p     records [image, label, membership]
    <out>/datasets/test/fashionmnist_<arch>.p     records [image, label]
    <out>/answers/fashionmnist_<arch>.npy         test membership, int64 0/1
    <out>/demo.json                               manifest: config, fingerprint, accuracies, sizes, times
    <out>/demo_indices.npz                        Fashion-MNIST indices of every split (see below)

Recipe, per victim (the victim's seed comes from ``config.seed`` and the arch name only, so a victim
does not change when other archs are added or reordered):

* the 70000 Fashion-MNIST images (train + t10k) are one pool; a seeded permutation gives disjoint
  index sets: ``n_train`` members, ``n_eval/2 + n_test/2`` non-members for eval/test and
  ``n_holdout`` further non-members used only to report held-out accuracy;
* the victim trains on all members (no augmentation, so it overfits like the challenge victims);
* eval = ``n_eval/2`` members + ``n_eval/2`` non-members, test = ``n_test/2`` other members + ``n_test/2``
  other non-members, each shuffled; eval and test share no record;
* ``train_acc`` is measured on the members in eval mode after training; ``holdout_acc`` on the
  held-out non-members, which appear in neither eval nor test (so the accuracies say nothing about
  the records an attack is scored on beyond their split).

``demo_indices.npz`` has, for each arch, ``<arch>_members`` (training set, in pool order of the
permutation), ``<arch>_eval`` and ``<arch>_test`` (aligned with the records in the pickles) and
``<arch>_holdout``; indices are into the pool (0..59999 train file, 60000..69999 t10k file).

Images are made to look like the challenge's CIFAR records: 28x28 padded with 2 px of zeros to 32x32,
scaled to [0, 1], normalized with the padded Fashion-MNIST train statistics (FMNIST_MEAN, FMNIST_STD)
and repeated to three channels.

Builds are cached: ``build_demo`` returns at once when ``<out>/demo.json`` has the same fingerprint
(recipe + DEMO_FORMAT_VERSION) and every file is present. A build is written to a temporary sibling
directory and renamed into place, so an interrupted build leaves no half bundle.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mia.io.checkpoints import save_checkpoint
from mia.io.records import save_records
from mia.devices import ieee_fp32, resolve_device
from mia.errors import MIAError
from mia.io.fashion_mnist import (
    FMNIST_MEAN,
    FMNIST_STD,
    NUM_CLASSES,
    POOL_SIZE,
    find_fashion_mnist,
    load_fashion_mnist,
    to_challenge_images,
)
from mia.models.registry import REPO_ARCHITECTURES, repo_builder
from mia.core.thresholds import sweep
from mia.training import TrainRecipe, build_and_train

# Bump when the recipe changes (splits, preprocessing, training): cached bundles are then rebuilt.
DEMO_FORMAT_VERSION = 2  # 2: victims trained with random flips


# --------------------------------------------------------------------------------------------------
# Configuration and results


def _default_widths() -> dict[str, int]:
    # Measured on 2 CPU cores: these widths and 25 epochs take ~1.5 / ~1 / ~3.5 minutes. The depthwise
    # convs of MobileNetV2 are slow on CPUs, hence its smaller width; all three overfit.
    return {"resnet34": 8, "vgg16": 16, "mobilenetv2": 8}


@dataclass
class DemoConfig:
    """How to build the demo bundle. Every field except out, device and source is part of the
    fingerprint: changing one rebuilds the bundle."""

    out: Path = Path("demo")  # bundle directory (written atomically)
    seed: int = 0  # master seed; each victim derives its own from (seed, arch)
    archs: tuple[str, ...] = ("resnet34", "vgg16", "mobilenetv2")  # one victim per arch
    dataset_name: str = "fashionmnist"  # the <dataset> in file names (no "_")
    widths: dict[str, int] = field(default_factory=_default_widths)  # arch -> width (see SPEC)
    n_train: int = 2000  # members: the victim's whole training set
    n_eval: int = 2000  # eval records, half members half non-members
    n_test: int = 2000  # test records, half members half non-members (disjoint from eval)
    n_holdout: int = 2000  # further non-members, only for the reported held-out accuracy
    epochs: int = 25  # training epochs
    augment: bool = True  # random horizontal flips (and random crops when pad > 0)
    pad: int = 0  # crop padding; 0 = flips only. With pad=2 the demo victims reach only ~89% train
    #               accuracy in 25 epochs (measured): too little memorization to resemble challenge victims
    batch_size: int = 128  # training batch size
    lr: float = 0.05  # peak learning rate (SGD, momentum 0.9, cosine decay to 0 per step)
    weight_decay: float = 5e-4  # SGD weight decay
    device: str = "auto"  # "cpu", "cuda" or "auto" (cuda when available); not in the fingerprint
    source: Path | None = None  # Fashion-MNIST folder (None: see find_fashion_mnist)

    @classmethod
    def tiny(cls, out: str | Path, **overrides) -> DemoConfig:
        """A few-seconds build for tests: width 4, 64 members, 32 eval / test / held-out, 1 epoch."""
        settings = dict(
            out=Path(out),
            widths={"resnet34": 4, "vgg16": 4, "mobilenetv2": 4},
            n_train=64,
            n_eval=32,
            n_test=32,
            n_holdout=32,
            epochs=1,
            batch_size=32,
            device="cpu",
        )
        settings.update(overrides)
        return cls(**settings)

    def validate(self) -> None:
        """Raise MIAError on a config that cannot be built."""
        unknown = [a for a in self.archs if a not in REPO_ARCHITECTURES]
        if unknown or not self.archs or len(set(self.archs)) != len(self.archs):
            raise MIAError(f"archs must be distinct names from {sorted(REPO_ARCHITECTURES)}, got {list(self.archs)}")
        if not re.fullmatch(r"[A-Za-z0-9]+", self.dataset_name):
            raise MIAError(f"dataset_name must be letters and digits only, got {self.dataset_name!r}")
        missing = [a for a in self.archs if a not in self.widths]
        if missing:
            raise MIAError(f"no width given for {missing}")
        if any(int(self.widths[a]) < 1 for a in self.archs):
            raise MIAError(f"widths must be positive, got {self.widths}")
        for name in ("n_eval", "n_test"):
            value = getattr(self, name)
            if value < 2 or value % 2:
                raise MIAError(f"{name} must be even and at least 2, got {value}")
        if self.n_holdout < 1:
            raise MIAError(f"n_holdout must be at least 1, got {self.n_holdout}")
        if self.n_train < (self.n_eval + self.n_test) // 2:
            raise MIAError(
                f"n_train ({self.n_train}) must hold the members of eval and test "
                f"({self.n_eval // 2} + {self.n_test // 2})"
            )
        used = self.n_train + (self.n_eval + self.n_test) // 2 + self.n_holdout
        if used > POOL_SIZE:
            raise MIAError(f"splits need {used} images, Fashion-MNIST has {POOL_SIZE}")
        if self.epochs < 1 or self.batch_size < 2 or self.lr <= 0 or self.weight_decay < 0:
            raise MIAError("epochs >= 1, batch_size >= 2, lr > 0 and weight_decay >= 0 are required")
        if self.device not in ("cpu", "cuda", "auto"):
            raise MIAError(f"device must be 'cpu', 'cuda' or 'auto', got {self.device!r}")

    def recipe(self) -> dict:
        """The fields that determine the bundle's content (JSON-ready)."""
        return {
            "seed": int(self.seed),
            "archs": list(self.archs),
            "dataset_name": self.dataset_name,
            "widths": {a: int(self.widths[a]) for a in self.archs},
            "n_train": int(self.n_train),
            "n_eval": int(self.n_eval),
            "n_test": int(self.n_test),
            "n_holdout": int(self.n_holdout),
            "epochs": int(self.epochs),
            "batch_size": int(self.batch_size),
            "lr": float(self.lr),
            "weight_decay": float(self.weight_decay),
            "augment": bool(self.augment),
            "pad": int(self.pad),
        }

    def fingerprint(self) -> str:
        """sha256 of the recipe and DEMO_FORMAT_VERSION."""
        text = json.dumps({"format": DEMO_FORMAT_VERSION, "recipe": self.recipe()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def to_json(self) -> dict:
        """Every field, JSON-ready."""
        data = dataclasses.asdict(self)
        data["out"] = str(self.out)
        data["source"] = None if self.source is None else str(self.source)
        data["archs"] = list(self.archs)
        return data


@dataclass
class DemoVictim:
    """What the manifest records for one victim. Accuracies are fractions in [0, 1]."""

    arch: str
    width: int
    train_acc: float  # on the n_train members, eval mode, after training
    holdout_acc: float  # on the n_holdout held-out non-members
    loss_attack_eval_acc: float  # best-threshold accuracy of the per-record loss on eval (a baseline)
    seconds: float  # training time
    n_train: int
    n_eval: int
    n_test: int
    n_holdout: int


@dataclass
class DemoResult:
    """The bundle built (or found) by build_demo."""

    path: Path
    reused: bool  # True when an up-to-date bundle was found and nothing was trained
    victims: list[DemoVictim]
    manifest: dict


# --------------------------------------------------------------------------------------------------
# Building


def _victim_seed(seed: int, arch: str) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(seed), zlib.crc32(arch.encode())])


def split_indices(config: DemoConfig, arch: str, pool_size: int = POOL_SIZE) -> dict[str, np.ndarray]:
    """The pool indices of one victim's splits (int64 arrays).

    members (n_train), eval (n_eval; first half members, then non-members, shuffled together),
    test (n_test, likewise, from other members and non-members), holdout (n_holdout non-members).
    Also returns eval_membership and test_membership (int64 0/1 aligned with eval and test).
    """
    rng = np.random.default_rng(_victim_seed(config.seed, arch))
    perm = rng.permutation(pool_size).astype(np.int64)
    half_eval, half_test = config.n_eval // 2, config.n_test // 2
    members = perm[: config.n_train]
    rest = perm[config.n_train :]
    out_eval, out_test = rest[:half_eval], rest[half_eval : half_eval + half_test]
    holdout = rest[half_eval + half_test : half_eval + half_test + config.n_holdout]
    chosen = rng.permutation(config.n_train)[: half_eval + half_test]
    in_eval, in_test = members[chosen[:half_eval]], members[chosen[half_eval:]]

    splits = {"members": members, "holdout": holdout}
    for name, inside, outside in (("eval", in_eval, out_eval), ("test", in_test, out_test)):
        indices = np.concatenate([inside, outside])
        membership = np.concatenate([np.ones(len(inside), np.int64), np.zeros(len(outside), np.int64)])
        order = rng.permutation(len(indices))
        splits[name], splits[f"{name}_membership"] = indices[order], membership[order]
    return splits


@torch.no_grad()
def _logits(model: torch.nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 512) -> torch.Tensor:
    """float64 logits (n, C) on the CPU, model in eval mode, in fp32 as on a CPU (no TF32 on CUDA)."""
    model.eval()
    with ieee_fp32(device):
        parts = [model(images[i : i + batch_size].to(device)).double().cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(parts)


def _train_victim(
    config: DemoConfig,
    arch: str,
    splits: dict[str, np.ndarray],
    images: np.ndarray,
    labels: np.ndarray,
    device: torch.device,
    progress: bool,
) -> tuple[torch.nn.Module, Path, dict]:
    """Train one victim on its members; return (model on CPU in eval mode, architecture file, stats)."""
    seed = int(_victim_seed(config.seed, arch).generate_state(1)[0])
    width = int(config.widths[arch])
    builder = repo_builder(arch)
    arch_file = builder.file
    x_train = torch.from_numpy(to_challenge_images(images[splits["members"]]))
    y_train = torch.from_numpy(labels[splits["members"]])
    recipe = TrainRecipe(epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
                         weight_decay=config.weight_decay, augment=config.augment, pad=config.pad)
    model, trained = build_and_train(lambda: builder.build(NUM_CLASSES, width), x_train.numpy(), y_train.numpy(),
                                     recipe, seed=seed, device=device, desc=f"{arch} (width {width})",
                                     progress=progress)
    seconds = trained["seconds"]
    model = model.to(device)

    model.eval()
    train_acc = float((_logits(model, x_train, device).argmax(1) == y_train).double().mean())
    x_hold = torch.from_numpy(to_challenge_images(images[splits["holdout"]]))
    holdout_acc = float((_logits(model, x_hold, device).argmax(1) == torch.from_numpy(labels[splits["holdout"]])).double().mean())
    x_eval = torch.from_numpy(to_challenge_images(images[splits["eval"]]))
    y_eval = torch.from_numpy(labels[splits["eval"]])
    neg_loss = -F.cross_entropy(_logits(model, x_eval, device), y_eval, reduction="none").numpy()
    attack_acc = sweep(neg_loss, splits["eval_membership"]).best_accuracy
    model = model.cpu().eval()
    stats = dict(train_acc=train_acc, holdout_acc=holdout_acc, loss_attack_eval_acc=attack_acc, seconds=seconds)
    return model, Path(arch_file), stats


def _expected_files(config: DemoConfig) -> list[str]:
    """Paths (relative to the bundle) that a complete bundle for ``config`` has."""
    ds = config.dataset_name
    files = ["demo.json", "demo_indices.npz"]
    for arch in config.archs:
        files += [
            f"models/{arch}_{ds}.pth",
            f"models/{REPO_ARCHITECTURES[arch].file}",
            f"datasets/eval/{ds}_{arch}.p",
            f"datasets/test/{ds}_{arch}.p",
            f"answers/{ds}_{arch}.npy",
        ]
    return files


def _victims_from_manifest(manifest: dict) -> list[DemoVictim]:
    names = {f.name for f in dataclasses.fields(DemoVictim)}
    return [DemoVictim(**{k: v for k, v in entry.items() if k in names}) for entry in manifest["victims"]]


def _reusable(config: DemoConfig, out: Path) -> dict | None:
    """The manifest of an up-to-date, complete bundle at ``out``, else None."""
    try:
        manifest = json.loads((out / "demo.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("fingerprint") != config.fingerprint():
        return None
    if not all((out / rel).is_file() for rel in _expected_files(config)):
        return None
    return manifest


def _check_replaceable(out: Path) -> None:
    """Refuse to replace a directory that is not a demo bundle (it may hold someone's work)."""
    if out.exists() and not (out.is_dir() and ((out / "demo.json").is_file() or not any(out.iterdir()))):
        raise MIAError(f"{out} exists and is not a demo bundle (no demo.json); refusing to replace it")


def build_demo(config: DemoConfig | None = None, *, force: bool = False, progress: bool = True) -> DemoResult:
    """Build the demo bundle at ``config.out`` (see the module docstring), or reuse an up-to-date one.

    ``force`` rebuilds even when the cached bundle matches. ``progress`` shows a tqdm bar per victim.
    The bundle is written into a temporary sibling directory and renamed into place at the end.
    """
    config = DemoConfig() if config is None else config
    config.validate()
    out = Path(config.out).expanduser().resolve()
    if not force:
        manifest = _reusable(config, out)
        if manifest is not None:
            return DemoResult(path=out, reused=True, victims=_victims_from_manifest(manifest), manifest=manifest)
    _check_replaceable(out)
    device = resolve_device(config.device)
    source = find_fashion_mnist(config.source)
    images, labels = load_fashion_mnist(source)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        manifest = _write_bundle(config, tmp, images, labels, source, device, progress)
        _replace_dir(tmp, out)
    except BaseException:  # KeyboardInterrupt too: no half bundle is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return DemoResult(path=out, reused=False, victims=_victims_from_manifest(manifest), manifest=manifest)


def _write_bundle(
    config: DemoConfig,
    root: Path,
    images: np.ndarray,
    labels: np.ndarray,
    source: Path,
    device: torch.device,
    progress: bool,
) -> dict:
    ds = config.dataset_name
    for sub in ("models", "datasets/eval", "datasets/test", "answers"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    victims, indices = [], {}
    for arch in config.archs:
        splits = split_indices(config, arch, len(images))
        model, arch_file, stats = _train_victim(config, arch, splits, images, labels, device, progress)
        save_checkpoint(root / "models" / f"{arch}_{ds}.pth", model, 100.0 * stats["holdout_acc"], config.epochs - 1)
        shutil.copyfile(arch_file, root / "models" / REPO_ARCHITECTURES[arch].file)
        save_records(
            root / "datasets" / "eval" / f"{ds}_{arch}.p",
            to_challenge_images(images[splits["eval"]]),
            labels[splits["eval"]],
            splits["eval_membership"],
        )
        save_records(
            root / "datasets" / "test" / f"{ds}_{arch}.p",
            to_challenge_images(images[splits["test"]]),
            labels[splits["test"]],
        )
        np.save(root / "answers" / f"{ds}_{arch}.npy", splits["test_membership"].astype(np.int64))
        for name in ("members", "eval", "test", "holdout"):
            indices[f"{arch}_{name}"] = splits[name]
        victims.append(
            dataclasses.asdict(
                DemoVictim(
                    arch=arch,
                    width=int(config.widths[arch]),
                    n_train=config.n_train,
                    n_eval=config.n_eval,
                    n_test=config.n_test,
                    n_holdout=config.n_holdout,
                    **stats,
                )
            )
        )
    np.savez(root / "demo_indices.npz", **indices)
    manifest = {
        "format_version": DEMO_FORMAT_VERSION,
        "fingerprint": config.fingerprint(),
        "config": config.to_json(),
        "recipe": config.recipe(),
        "widths": {a: int(config.widths[a]) for a in config.archs},
        "normalization": {"mean": FMNIST_MEAN, "std": FMNIST_STD, "pad": 2},
        "source": str(source),
        "device": str(device),
        "torch_version": torch.__version__,
        "victims": victims,
        "total_seconds": time.perf_counter() - started,
    }
    (root / "demo.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def write_population(bundle: str | Path, n: int, *, seed: int = 0, source: str | Path | None = None) -> Path:
    """Write ``<bundle>/population/<dataset>.p``: ``n`` Fashion-MNIST records ``[image, label]`` that are no
    victim's member, eval, test or held-out record (from ``demo_indices.npz``), chosen with ``seed``: the
    population a user of a real bundle takes from the public dataset its records come from, for
    ``mia references --population`` (``--distill`` trains on nothing else). Returns the file."""
    bundle = Path(bundle)
    manifest = json.loads((bundle / "demo.json").read_text())
    with np.load(bundle / "demo_indices.npz") as indices:
        used = np.unique(np.concatenate([indices[name] for name in indices.files]))
    images, labels = load_fashion_mnist(find_fashion_mnist(source))
    free = np.setdiff1d(np.arange(len(images)), used)
    if not 0 < n <= len(free):
        raise MIAError(f"a population of 1 to {len(free)} records can be drawn outside the demo's splits, not {n}")
    chosen = np.sort(np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(b"population")]))
                     .choice(free, size=n, replace=False))
    path = bundle / "population" / f"{manifest['recipe']['dataset_name']}.p"
    path.parent.mkdir(exist_ok=True)
    save_records(path, to_challenge_images(images[chosen]), labels[chosen])
    return path


def _replace_dir(new: Path, out: Path) -> None:
    """Move ``new`` to ``out``, replacing an existing ``out`` (renames on one file system)."""
    if not out.exists():
        os.replace(new, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rmdir(old)
    os.replace(out, old)
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)
