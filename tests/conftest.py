"""Shared fixtures: one tiny demo bundle per session, and a quiet, reproducible torch per test.

``tiny_bundle`` is built once (a few seconds: three width-4 victims, 32 eval and 32 test records
each, one epoch) and must only be read. A test that writes into a bundle (results, result.json, the
logits cache, a corrupted file) copies it first with ``copy_bundle``.

The cache (mia.io.cache) lives in a temporary folder for the whole session, set through
``$MIA_CACHE_DIR`` at import (child processes inherit it): no test reads or writes the user's cache.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

#: What a run writes into a bundle; left out when copying so every copy starts clean. (".cache": what
#: older versions wrote there; a bundle's own .cache is never read.)
RUN_OUTPUTS = (".cache", "results", "result.json")

#: The session's cache root (mia.io.cache.cache_root), removed when the session ends.
SESSION_CACHE = Path(tempfile.mkdtemp(prefix="mia-test-cache-"))
os.environ["MIA_CACHE_DIR"] = str(SESSION_CACHE)
atexit.register(shutil.rmtree, SESSION_CACHE, ignore_errors=True)


def _copy_bundle(src: Path, dst: Path) -> Path:
    """Copy a bundle to ``dst`` without run outputs; returns ``dst``."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*RUN_OUTPUTS))
    return dst


@pytest.fixture(scope="session")
def copy_bundle():
    """``copy_bundle(src, dst) -> dst``: a copy of a bundle without run outputs, to write into."""
    return _copy_bundle


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """One torch thread for the whole session (a shared 2-core machine), restored at the end.

    Session-wide rather than per test so that module and session fixtures (bundles trained once,
    then compared bit for bit with a rebuild inside a test) run with the same thread count as tests:
    CPU training is only bit-reproducible at a fixed thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _torch_rng_one_thread(_one_torch_thread):
    """Per test: torch seeded with 0 and its RNG restored afterwards, one thread even if a test changed it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, _one_torch_thread) -> Path:
    """Path of a tiny demo bundle (3 victims: <arch>_fashionmnist), built once per session. Read only.

    Skips when Fashion-MNIST is not installed (``make test`` installs it)."""
    from mia.demo import DemoConfig, build_demo
    from mia.io.fashion_mnist import find_fashion_mnist
    from mia.errors import MIAError

    try:
        find_fashion_mnist()
    except MIAError as e:
        pytest.skip(f"Fashion-MNIST not installed: {e}")
    out = tmp_path_factory.mktemp("tiny") / "bundle"
    return build_demo(DemoConfig.tiny(out), progress=False).path
