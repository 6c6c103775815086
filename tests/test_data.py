"""CIFAR-LT construction: counts, totals and the spec's rank fingerprints; readers, download and errors."""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from ltbench.datasets.cifar_lt import CIFAR10LT, CIFAR100LT, CIFARLTOptions

from ltbench.data import (
    exp_profile_counts,
    indices_sha256,
    ldam_subsample,
    paper_groups,
    rank_fingerprint,
    shot_groups,
)
from ltbench.errors import UserError

# baselines.md §1.1-1.2
TOTALS = {(10, 100): 12406, (10, 50): 13996, (10, 10): 20431, (100, 100): 10847, (100, 50): 12608, (100, 10): 19573}
FINGERPRINTS = {
    (10, 100): "8a54f5b6fa972295", (10, 50): "7bb90363b243a944", (10, 10): "2b3a8656bec514c6",
    (100, 100): "f123ec136d44ab1b", (100, 50): "1bc82de2629e5cbd", (100, 10): "5906ba7310b91b5e",
}


@pytest.mark.parametrize("classes,rho", sorted(TOTALS))
def test_totals(classes, rho):
    n_max = 5000 if classes == 10 else 500
    assert sum(exp_profile_counts(n_max, classes, rho)) == TOTALS[classes, rho]


def test_cifar10_counts_and_cifar100_spot_checks():
    assert exp_profile_counts(5000, 10, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert exp_profile_counts(5000, 10, 50) == [5000, 3237, 2096, 1357, 878, 568, 368, 238, 154, 100]
    assert exp_profile_counts(5000, 10, 10) == [5000, 3871, 2997, 2320, 1796, 1391, 1077, 834, 645, 500]
    c100 = exp_profile_counts(500, 100, 100)
    assert c100[:5] == [500, 477, 455, 434, 415]
    assert c100[34:38] == [102, 98, 93, 89]
    assert c100[68:73] == [21, 20, 19, 18, 17]
    assert c100[-1] == 5
    assert exp_profile_counts(500, 100, 50)[-1] == 10
    assert exp_profile_counts(500, 100, 10)[-1] == 50


@pytest.mark.parametrize("classes,rho", sorted(FINGERPRINTS))
def test_rank_fingerprints(classes, rho):
    # The kept ranks depend only on class sizes, so balanced fake labels in class order give the spec's values.
    n_max = 5000 if classes == 10 else 500
    labels = np.repeat(np.arange(classes), n_max)
    _, ranks = ldam_subsample(labels, exp_profile_counts(n_max, classes, rho))
    assert rank_fingerprint(ranks) == FINGERPRINTS[classes, rho]


def test_rank_prefixes_from_spec():
    labels = np.repeat(np.arange(10), 5000)
    _, ranks = ldam_subsample(labels, exp_profile_counts(5000, 10, 100))
    assert ranks[0][:5].tolist() == [398, 3833, 4836, 4572, 636]
    assert sorted(ranks[9].tolist())[:5] == [66, 89, 368, 433, 541]
    labels = np.repeat(np.arange(100), 500)
    _, ranks = ldam_subsample(labels, exp_profile_counts(500, 100, 100))
    assert ranks[0][:5].tolist() == [90, 254, 283, 445, 461]
    assert sorted(ranks[99].tolist()) == [153, 299, 348, 361, 363]


def test_shot_groups_including_empty_groups():
    c10 = shot_groups(exp_profile_counts(5000, 10, 100))
    assert [len(c10[g]) for g in ("many", "medium", "few")] == [8, 2, 0]
    c10_50 = shot_groups(exp_profile_counts(5000, 10, 50))
    assert c10_50["medium"] == [9]  # exactly 100 images is medium
    c100 = shot_groups(exp_profile_counts(500, 100, 100))
    assert (c100["many"], c100["medium"], c100["few"]) == (list(range(35)), list(range(35, 70)), list(range(70, 100)))
    assert [len(v) for v in shot_groups(exp_profile_counts(500, 100, 50)).values()] == [41, 41, 18]
    assert [len(v) for v in shot_groups(exp_profile_counts(500, 100, 10)).values()] == [69, 31, 0]
    paper = paper_groups(100, (36, 71))
    assert (len(paper["many"]), len(paper["medium"]), len(paper["few"])) == (36, 35, 29)


def test_real_cifar10_lt(cifar_root):
    data = CIFAR10LT(CIFARLTOptions(rho=100), cifar_root).load()
    assert data.info.train_counts == (5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50)
    assert len(data.train) == 12406 and len(data.test) == 10000
    assert np.bincount(data.train.labels).tolist() == list(data.info.train_counts)
    assert data.train.images.shape == (12406, 32, 32, 3) and data.train.images.dtype == np.uint8
    assert rank_fingerprint(data.info.extras["kept_ranks"]) == "8a54f5b6fa972295"
    # published per-channel mean of the full balanced train set on 0..255 (shared/data/README.md)
    assert data.info.class_names[0] == "airplane"
    assert indices_sha256(data.train_indices) == hashlib.sha256(data.train_indices.astype("<i8").tobytes()).hexdigest()


@pytest.fixture
def small_cifar100(monkeypatch):
    """The reader accepts only copies of the originals' size: let it take _fake_cifar100's as the standard."""
    monkeypatch.setattr(CIFAR100LT, "train_images", 100 * 8)
    monkeypatch.setattr(CIFAR100LT, "test_images", 100 * 2)


def _fake_cifar100(root: Path, per_class: int = 8) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.RandomState(1)
    for name, n in (("train", per_class), ("test", 2)):
        labels = np.tile(np.arange(100), n)
        batch = {"data": rng.randint(0, 255, size=(len(labels), 3072)).astype(np.uint8), "fine_labels": labels.tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)]}))
    return folder


def test_cifar100_reader_on_fake_batches(tmp_path, small_cifar100):
    _fake_cifar100(tmp_path)
    data = CIFAR100LT(CIFARLTOptions(rho=4), tmp_path).load()
    assert data.info.train_counts[0] == 8 and data.info.train_counts[-1] == 2
    assert len(data.test) == 200 and data.info.class_names[3] == "c3"
    # the kept images are exactly the originals at the kept indices
    assert np.bincount(data.train.labels, minlength=100).tolist() == list(data.info.train_counts)


def test_missing_and_corrupt_data_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found in"):
        CIFAR10LT(CIFARLTOptions(), tmp_path).load()
    folder = _fake_cifar100(tmp_path)
    (folder / "train").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="not a readable CIFAR"):
        CIFAR100LT(CIFARLTOptions(), tmp_path).load()


def test_a_copy_of_another_size_is_refused(tmp_path):
    _fake_cifar100(tmp_path)  # balanced and readable, but 800 + 200 images instead of 50,000 + 10,000
    with pytest.raises(UserError, match="800 training and 200 test images; the originals hold 50,000 and 10,000"):
        CIFAR100LT(CIFARLTOptions(rho=4), tmp_path).load()


def _fake_archive(tmp_path: Path) -> tuple[Path, str]:
    src = tmp_path / "src"
    _fake_cifar100(src)
    archive = tmp_path / "cifar-100-python.tar.gz"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(src / "cifar-100-python", arcname="cifar-100-python")
    archive.write_bytes(buffer.getvalue())
    return archive, hashlib.md5(buffer.getvalue()).hexdigest()


def test_download_from_a_local_fake_server(tmp_path, small_cifar100):
    archive, md5 = _fake_archive(tmp_path)
    root = tmp_path / "data"
    folder = CIFAR100LT.download(root, url=archive.as_uri(), md5=md5)
    assert folder == root / "cifar-100-python" and (folder / "train").is_file()
    assert not [p for p in root.iterdir() if p.name.startswith(".download-")]  # nothing half-written left
    assert len(CIFAR100LT(CIFARLTOptions(rho=2), root).load().test) == 200


def test_download_rejects_a_bad_checksum(tmp_path):
    archive, _ = _fake_archive(tmp_path)
    root = tmp_path / "data"
    with pytest.raises(UserError, match="md5"):
        CIFAR100LT.download(root, url=archive.as_uri(), md5="0" * 32)
    assert not (root / "cifar-100-python").exists()


def test_portable_subset_round_trip(tmp_path, cli, small_cifar100):
    _fake_cifar100(tmp_path / "orig")
    cli("data", "export", "cifar100lt", "--rho", "4", "--data-root", str(tmp_path / "orig"), "--out",
        str(tmp_path / "ship"))
    original = CIFAR100LT(CIFARLTOptions(rho=4), tmp_path / "orig").load()
    shipped = CIFAR100LT(CIFARLTOptions(rho=4), tmp_path / "ship").load()  # no originals there
    assert np.array_equal(original.train.images, shipped.train.images)
    assert np.array_equal(original.test.labels, shipped.test.labels)
    assert np.array_equal(original.train_indices, shipped.train_indices)
    assert rank_fingerprint(shipped.info.extras["kept_ranks"]) == rank_fingerprint(original.info.extras["kept_ranks"])
    assert shipped.info.train_counts == original.info.train_counts
    assert len(shipped.val) > 0 and np.array_equal(original.val.images, shipped.val.images)  # the val split travels
    assert np.array_equal(original.val_indices, shipped.val_indices)
    assert shipped.info.extras["val_source"] == original.info.extras["val_source"]
    with pytest.raises(UserError, match="not found"):  # a different rho has no subset there
        CIFAR100LT(CIFARLTOptions(rho=8), tmp_path / "ship").load()
