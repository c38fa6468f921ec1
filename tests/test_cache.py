"""mia.io.cache: content-keyed records cache and file digests."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import mia.io.records
from mia.io.cache import cached_arrays, file_digest
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


def _plant(entry, arrays, claims):
    """Write ``arrays`` at ``entry`` described exactly as a genuine entry with these claims would be."""
    entry.unlink(missing_ok=True)
    cached_arrays(entry, lambda: arrays, lambda a: True, claims)


def _same(recs, good):
    return all(np.array_equal(getattr(recs, k), getattr(good, k)) for k in ("images", "labels", "membership"))


def test_damaged_or_planted_entries_are_ignored(tmp_path):
    f = _write_eval(tmp_path / "eval.p")
    cache = tmp_path / "cache"
    good = load_records(f, with_membership=True, cache_dir=cache)
    (entry,) = _entries(cache)
    claims = {"source_sha256": file_digest(f), "kind": "eval", "format": mia.io.records.RECORDS_CACHE_FORMAT}
    whole = entry.read_bytes()
    for damaged in (b"not an npz", whole[: len(whole) // 2], whole[:-30]):  # garbage; truncated (BadZipFile)
        entry.write_bytes(damaged)
        assert _same(load_records(f, with_membership=True, cache_dir=cache), good)
    # an entry without its description (an older version's, or planted by hand) is rebuilt
    np.savez(entry, images=good.images, labels=good.labels, membership=good.membership)
    assert _same(load_records(f, with_membership=True, cache_dir=cache), good)
    # a described entry whose content fails the records' own checks: NaN pixels, an all-member eval set,
    # integer images, fewer labels than images, no membership
    bad = [dict(images=np.full((6, 1, 2, 2), np.nan, np.float32), labels=good.labels, membership=good.membership),
           dict(images=good.images, labels=good.labels, membership=np.ones(6, np.int64)),
           dict(images=good.images.astype(np.int64), labels=good.labels, membership=good.membership),
           dict(images=good.images, labels=good.labels[:3], membership=good.membership),
           dict(images=good.images, labels=good.labels)]
    for arrays in bad:
        _plant(entry, arrays, claims)
        assert _same(load_records(f, with_membership=True, cache_dir=cache), good)


def test_entries_must_state_the_source_they_are_used_for(tmp_path):
    """An entry stating another file's sha256, another kind or format, or copied under another name is
    rebuilt: 3 zeroed records planted for a 6-record file are never used."""
    f = _write_eval(tmp_path / "eval.p")
    cache = tmp_path / "cache"
    good = load_records(f, with_membership=True, cache_dir=cache)
    (entry,) = _entries(cache)
    planted = dict(images=np.zeros((3, 1, 2, 2), np.float32), labels=np.arange(3, dtype=np.int64),
                   membership=np.array([0, 1, 0], np.int64))
    claims = {"source_sha256": file_digest(f), "kind": "eval", "format": mia.io.records.RECORDS_CACHE_FORMAT}
    for other in ({"source_sha256": "0" * 64}, {"kind": "test"}, {"format": 0}):
        _plant(entry, planted, {**claims, **other})
        assert _same(load_records(f, with_membership=True, cache_dir=cache), good)
    other_file = _write_eval(tmp_path / "other.p", n=4)  # a genuine entry of another file, renamed
    load_records(other_file, with_membership=True, cache_dir=cache)
    (other_entry,) = [e for e in _entries(cache) if e != entry]
    other_entry.replace(entry)
    assert _same(load_records(f, with_membership=True, cache_dir=cache), good)


def test_cache_root_is_outside_bundles(tmp_path, monkeypatch):
    import platformdirs

    from mia.io.cache import CACHE_DIR_ENV, cache_root

    assert os.environ[CACHE_DIR_ENV] and cache_root() == Path(os.environ[CACHE_DIR_ENV])  # tests: a temporary folder
    assert cache_root(tmp_path / "x") == tmp_path / "x"  # --cache-dir / RunConfig.cache_dir first
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    monkeypatch.delenv(CACHE_DIR_ENV)
    assert cache_root() == Path(platformdirs.user_cache_dir("mia", appauthor=False))


def _permissions_ignored(folder) -> bool:
    """Whether this process writes into a read-only folder anyway (root, or CAP_DAC_OVERRIDE)."""
    try:
        (folder / "probe").write_bytes(b"")
    except OSError:
        return False
    (folder / "probe").unlink()
    return True


def test_read_only_cache_warns_once_and_goes_on(tmp_path):
    from mia.io.cache import CacheWarning, cached_array

    f, t = _write_eval(tmp_path / "eval.p"), _write_eval(tmp_path / "test.p", n=4)
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o500)
    try:
        if _permissions_ignored(cache):
            pytest.skip("this process ignores file permissions (root)")
        with pytest.warns(CacheWarning, match="cannot be written") as caught:
            assert len(load_records(f, with_membership=True, cache_dir=cache)) == 6
            assert len(load_records(t, with_membership=True, cache_dir=cache)) == 4
            arr, hit = cached_array(cache / "logits" / "x.npz", lambda: np.ones(3, np.float32), lambda a: True)
        assert len(caught) == 1 and str(cache) in str(caught[0].message)  # once, naming the folder
        assert not hit and arr.tolist() == [1, 1, 1] and not any(cache.iterdir())
    finally:
        cache.chmod(0o700)


def test_unwritable_cache_still_loads(tmp_path):
    from mia.io.cache import CacheWarning

    f = _write_eval(tmp_path / "eval.p")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the cache folder would go")  # mkdir fails, even as root
    with pytest.warns(CacheWarning):
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

    entry = tmp_path / "c" / "x.npz"
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
    entry.unlink()
    cached_array(entry, lambda: np.arange(6).reshape(2, 3), lambda a: True)  # integer "logits", well described
    _, hit = cached_array(entry, build, valid)
    assert not hit and len(calls) == 2 and np.load(entry)["array"].dtype == np.float32  # refused by valid, rebuilt
    entry.write_bytes(entry.read_bytes()[:40])  # cut short
    rebuilt, hit = cached_array(entry, build, valid)
    assert not hit and np.array_equal(rebuilt, first)
    _, hit = cached_array(entry, build, valid, claims={"source": "another"})  # claims another source
    assert not hit and len(calls) == 4
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


def test_logits_entries_of_another_shape_dtype_or_view_set_are_recomputed(tmp_path):
    from mia.scoring import IDENTITY, View, cached_logits

    views = (IDENTITY, View(flip=True))
    entry = tmp_path / "cache" / "logits" / "victim-eval-key.npz"
    good = np.zeros((2, 4, 3), np.float32)
    assert cached_logits(entry, views, lambda: good, records=4, classes=3)[1] is False
    assert cached_logits(entry, views, lambda: good, records=4, classes=3)[1] is True
    bad = [good.astype(np.int64), np.zeros((2, 5, 3), np.float32), np.zeros((2, 4, 2), np.float32),
           np.full((2, 4, 3), np.inf, np.float32), np.zeros((1, 4, 3), np.float32), np.zeros((2, 4), np.int64)]
    for array in bad:
        entry.unlink()
        cached_logits(entry, views, lambda: array)  # written as a genuine entry of these views would be
        logits, hit = cached_logits(entry, views, lambda: good, records=4, classes=3)
        assert not hit and logits.dtype == np.float32 and np.array_equal(logits, good)
    # an entry made for other views (same file name) is not used for these
    entry.unlink()
    cached_logits(entry, (IDENTITY, IDENTITY), lambda: good)
    assert cached_logits(entry, views, lambda: good, records=4, classes=3)[1] is False
    # predicted labels: (V, n) int64 only
    labels = np.zeros((2, 4), np.int64)
    entry.unlink()
    cached_logits(entry, views, lambda: labels.astype(np.int32), ndim=2)
    got, hit = cached_logits(entry, views, lambda: labels, ndim=2, records=4)
    assert not hit and got.dtype == np.int64
    entry.write_bytes(b"PK\x03\x04" + b"\0" * 10)  # a truncated zip
    assert cached_logits(entry, views, lambda: labels, ndim=2, records=4)[1] is False
