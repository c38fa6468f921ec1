"""Where things are: the repository root and the bundle a run uses when none is named."""
from __future__ import annotations

from pathlib import Path

__all__ = ["REPO_ROOT", "default_bundle", "is_challenge_bundle"]

REPO_ROOT = Path(__file__).resolve().parents[1]


def is_challenge_bundle(path: Path) -> bool:
    """A folder with datasets/eval, datasets/test and at least one models/*.pth."""
    return (path / "datasets" / "eval").is_dir() and (path / "datasets" / "test").is_dir() and any(
        (path / "models").glob("*.pth"))


def default_bundle(*, build: bool = True, progress: bool = True, log=print) -> Path:
    """The challenge bundle at the repository root when there is one, else the demo bundle.

    The demo bundle (``demo/``, Fashion-MNIST) is built on first use when ``build`` is true.
    """
    if is_challenge_bundle(REPO_ROOT):
        return REPO_ROOT
    from mia.demo import DemoConfig, build_demo

    cfg = DemoConfig(out=REPO_ROOT / "demo")
    if build:
        res = build_demo(cfg, progress=progress)
        if not res.reused:
            log(f"built the demo bundle at {res.path}")
    return cfg.out
