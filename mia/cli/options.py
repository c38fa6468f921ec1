"""Options that several commands share, defined once."""
from __future__ import annotations

import argparse
from pathlib import Path

from mia.config import RunConfig


def add_bundle_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", type=Path, default=None,
                   help="challenge bundle folder (default: the repository root if it holds one, else demo/)")


def add_victims_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--victims", nargs="+", metavar="ARCH_DATASET", help="only these victims, e.g. vgg16_cifar10, or globs such as 'resnet34_*' (quoted; "
                        "one that matches no victim is an error)")


def add_trust_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-checkpoints", action="store_true",
                   help="allow checkpoints that are whole pickled models: loading them RUNS CODE from the file")


def add_cache_dir_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", default=RunConfig().cache_dir, metavar="DIR",
                   help="the cache's folder (default: $MIA_CACHE_DIR, else the user's cache folder, e.g. ~/.cache/mia; "
                        "never inside the bundle)")
