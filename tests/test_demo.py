"""Tests for mia/demo.py: the IDX parser, the image conversion, the splits and a tiny real build.

The build tests read the real Fashion-MNIST (Debian package dataset-fashion-mnist, or
$MIA_FASHION_MNIST) and are skipped when it is absent; everything else uses hand-made files.
"""
from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from mia import demo
from mia.io import fashion_mnist
from mia.io.checkpoints import load_state_dict
from mia.models.loading import load_victim_model
from mia.models.registry import REPO_ARCH_DIR
from mia.io.records import load_records
from mia.errors import DataError, MIAError

ARCHS = ("resnet34", "vgg16", "mobilenetv2")


def _idx_bytes(array: np.ndarray, code: int) -> bytes:
    """Hand-made IDX: 0, 0, type code, ndim, big-endian uint32 dims, big-endian data."""
    header = bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def _have_fashion_mnist() -> bool:
    try:
        fashion_mnist.find_fashion_mnist()
    except MIAError:
        return False
    return True


needs_fmnist = pytest.mark.skipif(not _have_fashion_mnist(), reason="Fashion-MNIST not installed")


# ------------------------------------------------------------------------------------------------
# IDX parser


def test_read_idx_raw_and_gz_give_the_same_array(tmp_path):
    array = np.arange(12, dtype=np.uint8).reshape(2, 3, 2)
    data = _idx_bytes(array, 0x08)
    assert data[:4] == b"\x00\x00\x08\x03"
    (tmp_path / "raw-idx3-ubyte").write_bytes(data)
    (tmp_path / "packed-idx3-ubyte.gz").write_bytes(gzip.compress(data))
    for name in ("raw-idx3-ubyte", "packed-idx3-ubyte.gz"):
        got = fashion_mnist.read_idx(tmp_path / name)
        assert got.dtype == np.uint8 and got.shape == (2, 3, 2)
        np.testing.assert_array_equal(got, array)


def test_read_idx_big_endian_int32_comes_back_native(tmp_path):
    path = tmp_path / "ints-idx1"
    # 70000 = 0x00011170: wrong byte order would read 1880162560
    path.write_bytes(b"\x00\x00\x0c\x01" + struct.pack(">I", 3) + struct.pack(">3i", 1, -2, 70000))
    got = fashion_mnist.read_idx(path)
    assert got.dtype == np.int32 and got.dtype.isnative
    assert got.tolist() == [1, -2, 70000]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x00\x01\x08\x01\x00\x00\x00\x01\x07", "bad magic"),  # second byte not zero
        (b"\x00\x00\x07\x01\x00\x00\x00\x01\x07", "bad magic"),  # unknown type code
        (b"\x00\x00", "shorter"),
        (b"\x00\x00\x08\x02\x00\x00\x00\x02", "header truncated"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x03\x01\x02", "need 3"),  # 2 bytes of data for 3 values
        (b"\x00\x00\x08\x01\x00\x00\x00\x01\x01\x02", "need 1"),  # trailing byte
    ],
)
def test_read_idx_rejects_corrupt_files(tmp_path, content, message):
    path = tmp_path / "bad-idx"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as info:
        fashion_mnist.read_idx(path)
    assert info.value.path == path
    path.write_bytes(gzip.compress(content))
    with pytest.raises(DataError, match=message):
        fashion_mnist.read_idx(path)


def test_read_idx_truncated_gzip_is_a_data_error(tmp_path):
    path = tmp_path / "cut-idx.gz"
    path.write_bytes(gzip.compress(_idx_bytes(np.zeros((4, 4), np.uint8), 0x08))[:-6])
    with pytest.raises(DataError, match="cannot read"):
        fashion_mnist.read_idx(path)


# ------------------------------------------------------------------------------------------------
# Finding the data


def _fake_fmnist(folder: Path, gz: bool) -> Path:
    """Four tiny IDX files under the Fashion-MNIST names (find only checks that they exist)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in fashion_mnist.FASHION_MNIST_FILES:
        data = _idx_bytes(np.zeros((1, 28, 28) if "images" in name else (1,), np.uint8), 0x08)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return folder


def test_find_fashion_mnist_order_and_layouts(tmp_path, monkeypatch):
    explicit = _fake_fmnist(tmp_path / "explicit", gz=False)
    from_env = _fake_fmnist(tmp_path / "env", gz=True)
    default = _fake_fmnist(tmp_path / "default", gz=True)
    torchvision_root = tmp_path / "tv"
    _fake_fmnist(torchvision_root / "FashionMNIST" / "raw", gz=False)
    monkeypatch.setattr(fashion_mnist, "DEFAULT_FASHION_MNIST_DIR", default)
    monkeypatch.setenv(fashion_mnist.FASHION_MNIST_ENV, str(from_env))

    assert fashion_mnist.find_fashion_mnist(explicit) == explicit
    assert fashion_mnist.find_fashion_mnist(str(torchvision_root)) == torchvision_root / "FashionMNIST" / "raw"
    assert fashion_mnist.find_fashion_mnist() == from_env
    monkeypatch.delenv(fashion_mnist.FASHION_MNIST_ENV)
    assert fashion_mnist.find_fashion_mnist() == default


def test_find_fashion_mnist_incomplete_folder_is_an_error(tmp_path):
    folder = _fake_fmnist(tmp_path / "some", gz=True)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(MIAError, match="not found"):
        fashion_mnist.find_fashion_mnist(folder)


def test_missing_fashion_mnist_says_how_to_install(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(fashion_mnist, "DEFAULT_FASHION_MNIST_DIR", tmp_path / "nowhere")
    monkeypatch.setenv(fashion_mnist.FASHION_MNIST_ENV, str(empty))
    with pytest.raises(MIAError) as info:
        fashion_mnist.find_fashion_mnist()
    text = str(info.value)
    assert str(empty) in text and "apt-get install dataset-fashion-mnist" in text and "MIA_FASHION_MNIST" in text

    monkeypatch.delenv(fashion_mnist.FASHION_MNIST_ENV)
    with pytest.raises(MIAError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist.find_fashion_mnist()
    # build_demo reports the same error before touching the output directory
    out = tmp_path / "bundle"
    with pytest.raises(MIAError, match="MIA_FASHION_MNIST"):
        demo.build_demo(demo.DemoConfig.tiny(out), progress=False)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


# ------------------------------------------------------------------------------------------------
# Image conversion


def test_to_challenge_images_pads_scales_and_repeats():
    images = np.zeros((2, 28, 28), np.uint8)
    images[1] = 255
    images[0, 0, 0] = 51  # 0.2 after scaling
    out = fashion_mnist.to_challenge_images(images)
    assert out.shape == (2, 3, 32, 32) and out.dtype == np.float32
    zero = (0.0 - fashion_mnist.FMNIST_MEAN) / fashion_mnist.FMNIST_STD
    one = (1.0 - fashion_mnist.FMNIST_MEAN) / fashion_mnist.FMNIST_STD
    # the 2-px border is a black pixel for both images
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    np.testing.assert_allclose(out[:, :, border], zero, rtol=1e-6)
    np.testing.assert_allclose(out[1, :, 2:30, 2:30], one, rtol=1e-6)
    np.testing.assert_allclose(out[0, :, 2, 2], (0.2 - fashion_mnist.FMNIST_MEAN) / fashion_mnist.FMNIST_STD, rtol=1e-6)
    np.testing.assert_allclose(out[0, :, 3:30, 3:30], zero, rtol=1e-6)
    assert (out[:, 0] == out[:, 1]).all() and (out[:, 0] == out[:, 2]).all()


@pytest.mark.parametrize("bad", [np.zeros((2, 28, 28), np.float32), np.zeros((2, 32, 32), np.uint8), np.zeros((28, 28), np.uint8)])
def test_to_challenge_images_rejects_other_inputs(bad):
    with pytest.raises(ValueError, match="uint8"):
        fashion_mnist.to_challenge_images(bad)


# ------------------------------------------------------------------------------------------------
# Config, splits, the threshold baseline


def test_split_indices_are_disjoint_balanced_and_seeded():
    config = demo.DemoConfig(n_train=100, n_eval=40, n_test=60, n_holdout=30)
    s = demo.split_indices(config, "vgg16", pool_size=1000)
    members = set(s["members"].tolist())
    assert len(members) == 100 and len(s["holdout"]) == 30
    assert len(s["eval"]) == 40 and len(s["test"]) == 60
    assert s["eval_membership"].sum() == 20 and s["test_membership"].sum() == 30
    everything = np.concatenate([s["eval"], s["test"]])
    assert len(set(everything.tolist())) == 100  # eval and test share no record
    for name in ("eval", "test"):
        inside = set(s[name][s[f"{name}_membership"] == 1].tolist())
        outside = set(s[name][s[f"{name}_membership"] == 0].tolist())
        assert inside <= members and not outside & members
    assert not set(s["holdout"].tolist()) & (members | set(everything.tolist()))
    # shuffled: members are not all at the front
    assert s["eval_membership"][:20].sum() < 20

    again = demo.split_indices(config, "vgg16", pool_size=1000)
    for key in s:
        np.testing.assert_array_equal(s[key], again[key])
    other_arch = demo.split_indices(config, "resnet34", pool_size=1000)
    other_seed = demo.split_indices(demo.DemoConfig(seed=1, n_train=100, n_eval=40, n_test=60, n_holdout=30),
                                    "vgg16", pool_size=1000)
    assert not np.array_equal(s["members"], other_arch["members"])
    assert not np.array_equal(s["members"], other_seed["members"])


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(archs=("resnet18",)), "archs"),
        (dict(archs=("vgg16", "vgg16")), "archs"),
        (dict(dataset_name="fashion_mnist"), "dataset_name"),
        (dict(widths={"vgg16": 4}), "width"),
        (dict(n_eval=31), "n_eval"),
        (dict(n_train=31), "n_train"),
        (dict(n_train=69990), "70000"),
        (dict(device="tpu"), "device"),
    ],
)
def test_config_validate(change, message, tmp_path):
    with pytest.raises(MIAError, match=message):
        demo.DemoConfig.tiny(tmp_path, **change).validate()


def test_fingerprint_ignores_where_not_what(tmp_path):
    base = demo.DemoConfig.tiny(tmp_path / "a")
    assert base.fingerprint() == demo.DemoConfig.tiny(tmp_path / "b", device="auto", source=tmp_path).fingerprint()
    assert base.fingerprint() != demo.DemoConfig.tiny(tmp_path / "a", epochs=2).fingerprint()
    assert base.fingerprint() != demo.DemoConfig.tiny(tmp_path / "a", seed=1).fingerprint()


# ------------------------------------------------------------------------------------------------
# A tiny build from the real data


@needs_fmnist
def test_load_fashion_mnist_shapes():
    images, labels = fashion_mnist.load_fashion_mnist()
    assert images.shape == (70000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (70000,) and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [7000] * 10


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    if not _have_fashion_mnist():
        pytest.skip("Fashion-MNIST not installed")
    rng_before = torch.get_rng_state()
    result = demo.build_demo(demo.DemoConfig.tiny(tmp_path_factory.mktemp("tiny") / "demo"), progress=False)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is left alone
    return result


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_tiny_build_has_the_challenge_layout(tiny_bundle):
    assert not tiny_bundle.reused
    expected = ["answers/fashionmnist_mobilenetv2.npy", "answers/fashionmnist_resnet34.npy",
                "answers/fashionmnist_vgg16.npy",
                "datasets/eval/fashionmnist_mobilenetv2.p", "datasets/eval/fashionmnist_resnet34.p",
                "datasets/eval/fashionmnist_vgg16.p",
                "datasets/test/fashionmnist_mobilenetv2.p", "datasets/test/fashionmnist_resnet34.p",
                "datasets/test/fashionmnist_vgg16.p",
                "demo.json", "demo_indices.npz",
                "models/mobilenetv2.py", "models/mobilenetv2_fashionmnist.pth", "models/resnet34.py",
                "models/resnet34_fashionmnist.pth", "models/vgg.py", "models/vgg16_fashionmnist.pth"]
    assert _files(tiny_bundle.path) == expected
    # nothing left beside it from the temporary build directory
    assert [p.name for p in tiny_bundle.path.parent.iterdir()] == ["demo"]
    for name in ("resnet34.py", "vgg.py", "mobilenetv2.py"):
        assert (tiny_bundle.path / "models" / name).read_bytes() == (REPO_ARCH_DIR / name).read_bytes()


def test_tiny_build_records_splits_and_answers(tiny_bundle):
    images, labels = fashion_mnist.load_fashion_mnist()
    indices = np.load(tiny_bundle.path / "demo_indices.npz")
    for arch in ARCHS:
        ev = load_records(tiny_bundle.path / "datasets/eval" / f"fashionmnist_{arch}.p", with_membership=True,
                          num_classes=10)
        te = load_records(tiny_bundle.path / "datasets/test" / f"fashionmnist_{arch}.p", with_membership=False,
                          num_classes=10)
        answers = np.load(tiny_bundle.path / "answers" / f"fashionmnist_{arch}.npy")
        assert ev.images.shape == (32, 3, 32, 32) and te.images.shape == (32, 3, 32, 32)
        assert te.membership is None
        assert ev.membership.sum() == 16  # balanced
        assert answers.dtype == np.int64 and answers.shape == (len(te),) and answers.sum() == 16

        members, holdout = indices[f"{arch}_members"], indices[f"{arch}_holdout"]
        ev_idx, te_idx = indices[f"{arch}_eval"], indices[f"{arch}_test"]
        assert len(members) == 64 and len(holdout) == 32
        # the recorded indices are the records' true sources
        np.testing.assert_array_equal(ev.images, fashion_mnist.to_challenge_images(images[ev_idx]))
        np.testing.assert_array_equal(te.images, fashion_mnist.to_challenge_images(images[te_idx]))
        np.testing.assert_array_equal(ev.labels, labels[ev_idx])
        np.testing.assert_array_equal(te.labels, labels[te_idx])
        # membership is truth: members are in the training set, non-members nowhere near it
        assert np.isin(ev_idx, members).astype(np.int64).tolist() == ev.membership.tolist()
        assert np.isin(te_idx, members).astype(np.int64).tolist() == answers.tolist()
        assert not np.intersect1d(ev_idx, te_idx).size
        assert not np.intersect1d(holdout, np.concatenate([members, ev_idx, te_idx])).size
        # and no image is shared between eval and test either
        ev_flat = {row.tobytes() for row in images[ev_idx]}
        assert not any(row.tobytes() in ev_flat for row in images[te_idx])


def test_tiny_build_checkpoints_and_manifest(tiny_bundle):
    manifest = json.loads((tiny_bundle.path / "demo.json").read_text())
    assert manifest == tiny_bundle.manifest
    assert manifest["format_version"] == demo.DEMO_FORMAT_VERSION
    assert manifest["fingerprint"] == demo.DemoConfig.tiny(tiny_bundle.path).fingerprint()
    assert manifest["config"]["n_train"] == 64 and manifest["widths"] == {a: 4 for a in ARCHS}
    assert [v.arch for v in tiny_bundle.victims] == list(ARCHS)
    for victim in tiny_bundle.victims:
        assert 0.0 <= victim.train_acc <= 1.0 and 0.0 <= victim.holdout_acc <= 1.0 and victim.seconds > 0
        model, info = load_victim_model(victim.arch, tiny_bundle.path / "models" / f"{victim.arch}_fashionmnist.pth",
                                        [tiny_bundle.path / "models"])
        assert (info.num_classes, info.width, info.epoch) == (10, 4, 0)
        assert info.checkpoint_acc == pytest.approx(100 * victim.holdout_acc)
        assert not model.training


def _assert_same_records(a: Path, b: Path) -> None:
    with_membership = a.parent.name == "eval"
    ra, rb = load_records(a, with_membership=with_membership), load_records(b, with_membership=with_membership)
    np.testing.assert_array_equal(ra.images, rb.images)
    np.testing.assert_array_equal(ra.labels, rb.labels)
    if with_membership:
        np.testing.assert_array_equal(ra.membership, rb.membership)


@pytest.mark.slow
def test_tiny_build_is_deterministic_and_cached(tiny_bundle, tmp_path):
    config = demo.DemoConfig.tiny(tmp_path / "again")
    second = demo.build_demo(config, progress=False)
    for rel in _files(tiny_bundle.path):
        if rel.endswith((".npy", ".npz", ".py")):
            assert (second.path / rel).read_bytes() == (tiny_bundle.path / rel).read_bytes(), rel
        elif rel.endswith(".p"):  # pickled tensors name their storage by memory address: compare content
            _assert_same_records(second.path / rel, tiny_bundle.path / rel)
        elif rel.endswith(".pth"):
            first_sd, first_meta = load_state_dict(tiny_bundle.path / rel)
            again_sd, again_meta = load_state_dict(second.path / rel)
            assert first_meta == again_meta and first_sd.keys() == again_sd.keys()
            assert all(torch.equal(first_sd[k], again_sd[k]) for k in first_sd), rel

    # cached: nothing rewritten
    stamps = {rel: (second.path / rel).stat().st_mtime_ns for rel in _files(second.path)}
    reused = demo.build_demo(config, progress=False)
    assert reused.reused and reused.path == second.path and reused.victims == second.victims
    assert {rel: (second.path / rel).stat().st_mtime_ns for rel in _files(second.path)} == stamps

    # a missing file or a changed recipe rebuilds; force rebuilds the same content
    (second.path / "answers" / "fashionmnist_vgg16.npy").unlink()
    assert not demo.build_demo(config, progress=False).reused
    forced = demo.build_demo(config, force=True, progress=False)
    assert not forced.reused
    _assert_same_records(forced.path / "datasets/eval/fashionmnist_vgg16.p",
                         tiny_bundle.path / "datasets/eval/fashionmnist_vgg16.p")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]  # no temp or old dirs left


def test_other_seed_other_bundle(tiny_bundle, tmp_path):
    other = demo.build_demo(demo.DemoConfig.tiny(tmp_path / "seed1", seed=1, archs=("vgg16",)), progress=False)
    assert _files(other.path) == ["answers/fashionmnist_vgg16.npy", "datasets/eval/fashionmnist_vgg16.p",
                                  "datasets/test/fashionmnist_vgg16.p", "demo.json", "demo_indices.npz",
                                  "models/vgg.py", "models/vgg16_fashionmnist.pth"]
    a, b = np.load(tiny_bundle.path / "demo_indices.npz"), np.load(other.path / "demo_indices.npz")
    assert not np.array_equal(a["vgg16_members"], b["vgg16_members"])


@needs_fmnist
def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "save_records", interrupt)
    with pytest.raises(KeyboardInterrupt):
        demo.build_demo(demo.DemoConfig.tiny(tmp_path / "demo", archs=("vgg16",)), progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@needs_fmnist
def test_interrupted_rebuild_keeps_the_old_bundle(tiny_bundle, tmp_path, monkeypatch):
    config = demo.DemoConfig.tiny(tmp_path / "demo", archs=("vgg16",))
    demo.build_demo(config, progress=False)
    before = {rel: (config.out / rel).read_bytes() for rel in _files(config.out)}

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "save_records", interrupt)
    with pytest.raises(KeyboardInterrupt):
        demo.build_demo(config, force=True, progress=False)
    assert {rel: (config.out / rel).read_bytes() for rel in _files(config.out)} == before
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]


def test_refuses_to_replace_a_directory_that_is_not_a_bundle(tmp_path):
    out = tmp_path / "mywork"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(MIAError, match="not a demo bundle"):
        demo.build_demo(demo.DemoConfig.tiny(out), progress=False)
    assert (out / "notes.txt").read_text() == "keep me"


def test_population_lies_outside_every_split(tiny_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for name in ("demo.json", "demo_indices.npz"):
        (bundle / name).write_bytes((tiny_bundle.path / name).read_bytes())
    path = demo.write_population(bundle, 50, seed=1)
    assert path == bundle / "population" / "fashionmnist.p"
    pop = load_records(path, with_membership=False)
    assert pop.images.shape == (50, 3, 32, 32)
    images, labels = fashion_mnist.load_fashion_mnist(fashion_mnist.find_fashion_mnist())
    used = np.unique(np.concatenate(list(np.load(bundle / "demo_indices.npz").values())))
    # the population's images are Fashion-MNIST's, prepared like the bundle's, and none of a split's
    keys = {}
    for start in range(0, len(images), 5000):
        chunk = fashion_mnist.to_challenge_images(images[start:start + 5000])
        keys.update({image.tobytes(): start + i for i, image in enumerate(chunk)})
    found = [keys[image.tobytes()] for image in pop.images]
    assert not set(found) & set(used.tolist()) and (labels[found] == pop.labels).all()
    np.testing.assert_array_equal(load_records(demo.write_population(bundle, 50, seed=1), with_membership=False).images,
                                  pop.images)
    with pytest.raises(MIAError, match="population of 1 to"):
        demo.write_population(bundle, 10**6)
