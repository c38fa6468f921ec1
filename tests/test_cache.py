"""mia.io.cache: content-keyed records cache and file digests."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

import mia.io.records
from mia.io.cache import file_digest
from mia.io.records import load_records
from mia.errors import DataError


def _write_eval(path, n=6, label_shift=0):
    recs = [[torch.full((1, 2, 2), i / 10), (i + label_shift) % 5, i % 2] for i in range(n)]
    path.write_bytes(pickle.dumps(recs, protocol=4))
    return path


def _entries(cache):
    return sorted((cache / "records").glob("*.npz"))


def test_second_load_reads_the_cache_not_the_pickle(tmp_path, monkeypatch):
    f = _write_eval(tmp_path / "eval.p")
    cache = tmp_path / ".cache"
    first = load_records(f, with_membership=True, cache_dir=cache)
    assert len(_entries(cache)) == 1

    def refuse(path):
        raise AssertionError("the pickle was read although a cache entry exists")

    monkeypatch.setattr(mia.io.records, "safe_load_pickle", refuse)
    second = load_records(f, with_membership=True, num_classes=5, cache_dir=cache)
    for name in ("images", "labels", "membership"):
        assert np.array_equal(getattr(first, name), getattr(second, name))
    assert second.images.dtype == np.float32 and second.path == f
    # uncached loading is unaffected by the cache
    with pytest.raises(AssertionError, match="pickle was read"):
        load_records(f, with_membership=True)


def test_changed_file_misses_and_labels_are_checked_on_hits(tmp_path):
    f = _write_eval(tmp_path / "eval.p")
    cache = tmp_path / ".cache"
    load_records(f, with_membership=True, cache_dir=cache)
    _write_eval(f, label_shift=1)  # same size, other content
    recs = load_records(f, with_membership=True, cache_dir=cache)
    assert recs.labels.tolist() == [1, 2, 3, 4, 0, 1] and len(_entries(cache)) == 2
    with pytest.raises(DataError, match=r"label 4 out of range: must be in \[0, 4\)") as e:
        load_records(f, with_membership=True, num_classes=4, cache_dir=cache)  # a hit: same message as uncached
    assert e.value.index == 3
    with pytest.raises(DataError, match=r"label 4 out of range: must be in \[0, 4\)"):
        load_records(f, with_membership=True, num_classes=4)


def test_damaged_or_planted_entries_are_ignored(tmp_path):
    f = _write_eval(tmp_path / "eval.p")
    cache = tmp_path / ".cache"
    good = load_records(f, with_membership=True, cache_dir=cache)
    (entry,) = _entries(cache)
    entry.write_bytes(b"not an npz")
    assert np.array_equal(load_records(f, with_membership=True, cache_dir=cache).images, good.images)
    # a planted entry with NaN pixels or an all-member eval set is rejected and rewritten
    for images, membership in ((np.full((6, 1, 2, 2), np.nan, np.float32), good.membership),
                               (good.images, np.ones(6, np.int64))):
        np.savez(entry, images=images, labels=good.labels, membership=membership)
        again = load_records(f, with_membership=True, cache_dir=cache)
        assert np.array_equal(again.images, good.images) and np.array_equal(again.membership, good.membership)


def test_unwritable_cache_still_loads(tmp_path):
    f = _write_eval(tmp_path / "eval.p")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the cache folder would go")  # mkdir fails, even as root
    recs = load_records(f, with_membership=True, cache_dir=blocker / ".cache")
    assert len(recs) == 6 and blocker.is_file()


def test_file_digest_follows_content(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"abc")
    d1 = file_digest(f)
    assert d1 == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # sha256("abc")
    f.write_bytes(b"abd")
    os.utime(f, ns=(1, 1))
    assert file_digest(f) != d1


def test_cached_array_uses_valid_entries_and_rebuilds_the_rest(tmp_path):
    from mia.io.cache import cached_array

    entry = tmp_path / "c" / "x.npy"
    calls = []

    def build():
        calls.append(1)
        return np.arange(6, dtype=np.float32).reshape(2, 3)

    def valid(a):
        return a.dtype == np.float32 and a.shape == (2, 3)

    first, hit = cached_array(entry, build, valid)
    assert not hit and entry.is_file() and len(calls) == 1
    again, hit = cached_array(entry, build, valid)
    assert hit and np.array_equal(again, first) and len(calls) == 1
    np.save(entry, np.arange(6).reshape(2, 3))  # integer "logits": refused by valid, rebuilt
    _, hit = cached_array(entry, build, valid)
    assert not hit and len(calls) == 2 and np.load(entry).dtype == np.float32
    entry.write_bytes(entry.read_bytes()[:40])  # cut short
    rebuilt, hit = cached_array(entry, build, valid)
    assert not hit and np.array_equal(rebuilt, first)
    assert cached_array(None, build, valid)[1] is False  # no cache: always built


def test_scoring_cache_refuses_integer_or_non_finite_logits():
    from mia.scoring import _valid_scores

    good = np.zeros((2, 5, 3), np.float32)
    assert _valid_scores(good, 3, 2)
    assert not _valid_scores(good.astype(np.int64), 3, 2)
    assert not _valid_scores(np.full((2, 5, 3), np.nan, np.float32), 3, 2)
    assert not _valid_scores(good, 3, 1)  # another number of views
    assert _valid_scores(np.zeros((2, 5), np.int64), 2, 2) and not _valid_scores(np.zeros((2, 5), np.float32), 2, 2)


def test_cached_file_copies_hits_and_keeps_new_files(tmp_path):
    from mia.io.cache import cached_file

    entry, target = tmp_path / "cache" / "k.png", tmp_path / "out" / "fig.png"
    target.parent.mkdir()
    drawn = []

    def write(path):
        drawn.append(path)
        path.write_bytes(b"figure")

    assert cached_file(entry, target, write) is False and entry.read_bytes() == b"figure" and len(drawn) == 1
    target.unlink()
    assert cached_file(entry, target, write) is True and target.read_bytes() == b"figure" and len(drawn) == 1
    assert cached_file(None, target, write) is False and len(drawn) == 2
