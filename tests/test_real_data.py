"""Real-data modules: digits (sklearn), MNIST / Fashion-MNIST (fake idx files in tmp_path), CIFAR-10 (a fake test batch).

No network: downloads are either disabled or monkeypatched to fail.
"""

from __future__ import annotations

import os
import urllib.error
from pathlib import Path

import pytest
import torch

from zskd_lightning.data.classification import ClassificationDataModule
from zskd_lightning.data.digits import DigitsDataModule, _fixed_split
from zskd_lightning.data.vision import CIFAR10DataModule, FashionMNISTDataModule, MNISTDataModule
from zskd_lightning.errors import ZSKDError

from helpers.tiny import write_mnist_idx as _write_idx

MNIST_BLACK = -0.1307 / 0.3081
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


# ----------------------------------------------------------------------------- helpers
def _rows(images: torch.Tensor) -> set[bytes]:
    """Each image as raw bytes, for set comparisons between splits."""
    flat = images.reshape(images.shape[0], -1).contiguous().numpy()
    return {row.tobytes() for row in flat}


def _fake_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # strictly non-black pixels, so any served black value must come from padding ...
    images = torch.randint(1, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
    images[:, 14, 14] = 0  # ... except one known black pixel per image
    labels = torch.arange(n) % 10
    return images, labels


@pytest.fixture
def fake_mnist(tmp_path: Path):
    """torchvision-layout MNIST with 50 train and 20 test images."""
    train = _fake_images(50, seed=1)
    test = _fake_images(20, seed=2)
    raw = tmp_path / "MNIST" / "raw"
    _write_idx(raw, "train", *train)
    _write_idx(raw, "t10k", *test)
    return tmp_path, train, test


def _no_network(monkeypatch) -> None:
    import torchvision.datasets as tvd

    def fail(self, *args, **kwargs):
        raise urllib.error.URLError("simulated: no internet")

    for cls in (tvd.MNIST, tvd.FashionMNIST, tvd.CIFAR10):
        monkeypatch.setattr(cls, "download", fail)


# ----------------------------------------------------------------------------- digits
def test_digits_split_sizes():
    dm = DigitsDataModule()
    dm.setup("fit")
    assert dm.test_dataset is None  # fit never touches the test split
    dm.setup("test")
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (1293, 144, 360)
    assert dm.num_classes == 10 and dm.input_shape == (1, 8, 8)
    # every class appears in the fixed, stratified test split (35 to 37 each)
    counts = torch.bincount(dm.test_dataset.labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37

    dm2 = DigitsDataModule(val_fraction=0.25)
    dm2.setup("fit")
    assert len(dm2.train_dataset) + len(dm2.val_dataset) == 1437
    assert len(dm2.val_dataset) == round(0.25 * 1437)


def test_digits_test_split_fixed_train_val_split_seeded():
    a, b = DigitsDataModule(seed=0), DigitsDataModule(seed=1)
    for dm in (a, b):
        dm.setup("fit")
        dm.setup("test")
    assert torch.equal(a.test_dataset.images, b.test_dataset.images)
    assert torch.equal(a.test_dataset.labels, b.test_dataset.labels)
    assert _rows(a.val_dataset.images) != _rows(b.val_dataset.images)
    # same seed -> same split
    c = DigitsDataModule(seed=0)
    c.setup("fit")
    assert torch.equal(a.val_dataset.images, c.val_dataset.images)
    assert torch.equal(a.train_dataset.labels, c.train_dataset.labels)
    # but the union of train+val is the same fixed training portion whatever the seed
    union_a = _rows(a.train_dataset.images) | _rows(a.val_dataset.images)
    union_b = _rows(b.train_dataset.images) | _rows(b.val_dataset.images)
    assert union_a == union_b and len(union_a) == 1437


def test_digits_splits_do_not_overlap():
    _, labels, train_idx, test_idx = _fixed_split()
    assert len(set(train_idx.tolist()) & set(test_idx.tolist())) == 0
    assert len(train_idx) + len(test_idx) == len(labels) == 1797

    dm = DigitsDataModule(seed=3)
    dm.setup("fit")
    dm.setup("test")
    tr, va, te = (_rows(d.images) for d in (dm.train_dataset, dm.val_dataset, dm.test_dataset))
    assert len(tr) == 1293 and len(va) == 144 and len(te) == 360  # digits has no duplicate images
    assert not (tr & va) and not (tr & te) and not (va & te)

    tri, vai = dm.split_indices(1437)
    assert len(set(tri.tolist()) & set(vai.tolist())) == 0
    assert sorted(tri.tolist() + vai.tolist()) == list(range(1437))


def test_digits_served_shape_dtype_range():
    dm = DigitsDataModule()
    dm.setup("fit")
    dm.setup("test")
    lo, hi = dm.input_range()
    assert lo.shape == hi.shape == (1, 1, 1)
    assert torch.allclose(lo, torch.tensor(-0.3050 / 0.3759).view(1, 1, 1))
    assert torch.allclose(hi, torch.tensor((1 - 0.3050) / 0.3759).view(1, 1, 1))
    x, y = dm.train_dataset[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.dim() == 0 and 0 <= int(y) < 10
    for ds in (dm.train_dataset, dm.val_dataset, dm.test_dataset):
        imgs = ds.images
        assert imgs.dtype == torch.float32
        assert imgs.min() >= lo.min() - 1e-5 and imgs.max() <= hi.max() + 1e-5
    # the range is actually reached (black background and full-ink pixels exist)
    assert torch.isclose(dm.train_dataset.images.min(), lo.squeeze(), atol=1e-5)
    assert torch.isclose(dm.train_dataset.images.max(), hi.squeeze(), atol=1e-5)
    # normalization round-trips to [0, 1] pixels on the 1/16 grid
    pix = dm.denormalize(dm.test_dataset.images)
    assert torch.allclose(pix * 16, (pix * 16).round(), atol=1e-4)


def test_digits_augment_only_affects_training_batches():
    """Augmentation is applied per sample to whole training batches on transfer, never to eval batches."""
    from types import SimpleNamespace

    plain, aug = DigitsDataModule(augment=False), DigitsDataModule(augment=True)
    for dm in (plain, aug):
        dm.setup("fit")
    images = torch.stack([plain.train_dataset[i][0] for i in range(64)])
    labels = torch.stack([plain.train_dataset[i][1] for i in range(64)])
    lo, hi = aug.input_range()

    aug.trainer = SimpleNamespace(training=False)  # validation / test: untouched
    x, y = aug.on_after_batch_transfer((images, labels), 0)
    assert torch.equal(x, images) and torch.equal(y, labels)

    aug.trainer = plain.trainer = SimpleNamespace(training=True, global_rank=0)
    torch.manual_seed(0)
    x, y = aug.on_after_batch_transfer((images, labels), 0)
    assert x.shape == images.shape and x.dtype == torch.float32 and torch.equal(y, labels)
    assert x.min() >= lo.min() - 1e-5 and x.max() <= hi.max() + 1e-5  # black fill, still in range
    changed = (x - images).flatten(1).abs().amax(1) > 1e-4
    assert changed.sum() >= 32  # a different random shift per sample, most of them non-zero
    assert torch.equal(plain.on_after_batch_transfer((images, labels), 0)[0], images)  # augment=False: untouched


def test_augment_accepts_a_batch_augmentation_of_your_own():
    from types import SimpleNamespace

    from zskd_lightning.augment import BatchAugmentation

    dm = DigitsDataModule(augment=BatchAugmentation(noise_std=0.5))
    dm.setup("fit")
    dm.trainer = SimpleNamespace(training=True, global_rank=0)
    images = torch.full((8, 1, 8, 8), float(dm.input_range()[0].min()))  # all black: the default shift keeps it
    x, _ = dm.on_after_batch_transfer((images, torch.zeros(8, dtype=torch.long)), 0)
    assert (x - images).abs().amax() > 0.1  # only the given augmentation (noise) changes a black image


def test_labelled_data_refuses_mixing_augmentation():
    from zskd_lightning.augment import BatchAugmentation

    with pytest.raises(ZSKDError, match="mix=0.5 blends images but not their labels"):
        DigitsDataModule(augment=BatchAugmentation(mix=0.5))


@pytest.mark.parametrize("batch_size", [16, 17])
def test_a_last_training_batch_of_one_sample_is_left_out(batch_size):
    """BatchNorm cannot train on one sample: a share one more than a multiple of the batch (1,293 = 17 x 76 + 1)
    drops that sample; any other partial last batch is kept (1,293 = 16 x 80 + 13)."""
    dm = DigitsDataModule(batch_size=batch_size)
    dm.setup("fit")
    sizes = [len(y) for _, y in dm.train_dataloader()]
    assert len(dm.train_dataset) == 1293
    assert sizes == ([17] * 76 if batch_size == 17 else [16] * 80 + [13])


def test_digits_dataloaders():
    dm = DigitsDataModule(batch_size=32, eval_batch_size=100)
    with pytest.raises(ZSKDError):
        dm.train_dataloader()
    dm.setup("fit")
    dm.setup("test")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (32,) and y.dtype == torch.int64
    for loader in (dm.val_dataloader(), dm.test_dataloader(), dm.predict_dataloader()):
        assert loader.batch_size == 100 and not loader.persistent_workers
        first = [b[1] for b in loader]
        second = [b[1] for b in loader]
        assert all(torch.equal(p, q) for p, q in zip(first, second))
        assert torch.equal(torch.cat(first), loader.dataset.labels)  # dataset order, no shuffling
    loader = dm.train_dataloader()
    order = torch.cat([b[1] for b in loader])
    assert torch.equal(torch.cat([b[1] for b in loader]), order)  # an epoch's order: (fit seed, epoch)
    assert not torch.equal(order, dm.train_dataset.labels)  # shuffled
    loader.sampler.set_epoch(1)  # Lightning, at the next epoch's start
    assert not torch.equal(torch.cat([b[1] for b in loader]), order)
    assert DigitsDataModule(batch_size=16).eval_batch_size == 16


# ----------------------------------------------------------------------------- MNIST-format files
def test_mnist_fake_loads_pads_and_normalizes(fake_mnist):
    root, (train_x, train_y), (test_x, test_y) = fake_mnist
    dm = MNISTDataModule(root=str(root), download=False, val_fraction=0.1)
    assert dm.input_shape == (1, 32, 32)
    dm.prepare_data()  # download=False: nothing to do
    dm.setup("fit")
    dm.setup("test")
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (45, 5, 20)

    served = dm.test_dataset.images
    assert served.shape == (20, 1, 32, 32) and served.dtype == torch.float32
    assert torch.equal(dm.test_dataset.labels, test_y.to(torch.int64))
    # padding ring is black, i.e. normalized 0
    ring = torch.ones(32, 32, dtype=torch.bool)
    ring[2:30, 2:30] = False
    assert torch.allclose(served[:, 0][:, ring], torch.tensor(MNIST_BLACK), atol=1e-6)
    # interior is the normalized original, in order
    expected = (test_x.float() / 255.0 - 0.1307) / 0.3081
    assert torch.allclose(served[:, 0, 2:30, 2:30], expected, atol=1e-6)
    # the known black pixel of the image is black; all other interior pixels are not
    assert torch.allclose(served[:, 0, 16, 16], torch.tensor(MNIST_BLACK), atol=1e-6)
    assert (served[:, 0, 2:30, 2:30] > MNIST_BLACK + 1e-3).sum() == 20 * (28 * 28 - 1)

    lo, hi = dm.input_range()
    assert torch.allclose(lo, torch.tensor(MNIST_BLACK).view(1, 1, 1))
    assert torch.allclose(hi, torch.tensor((1 - 0.1307) / 0.3081).view(1, 1, 1))

    # train + val partition the 50 training images
    rows = _rows(dm.train_dataset.images) | _rows(dm.val_dataset.images)
    assert len(rows) == 50 and not (_rows(dm.train_dataset.images) & _rows(dm.val_dataset.images))
    served_labels = dm.train_dataset.labels.tolist() + dm.val_dataset.labels.tolist()
    assert sorted(served_labels) == sorted(train_y.tolist())


def test_mnist_geometry_options(fake_mnist):
    root, _, (test_x, _) = fake_mnist
    none = MNISTDataModule(root=str(root), download=False, resize_to_32="none")
    none.setup("test")
    assert none.input_shape == (1, 28, 28)
    assert none.test_dataset.images.shape == (20, 1, 28, 28)
    assert torch.allclose(none.test_dataset.images[:, 0], (test_x.float() / 255 - 0.1307) / 0.3081, atol=1e-6)

    resized = MNISTDataModule(root=str(root), download=False, resize_to_32="resize")
    resized.setup("test")
    lo, hi = resized.input_range()
    imgs = resized.test_dataset.images
    assert resized.input_shape == (1, 32, 32) and imgs.shape == (20, 1, 32, 32)
    assert imgs.min() >= lo.min() - 1e-5 and imgs.max() <= hi.max() + 1e-5
    assert (imgs[:, 0, 0, :] > MNIST_BLACK + 1e-3).any()  # resized, not padded: the border carries content

    with pytest.raises(ZSKDError, match="resize_to_32"):
        MNISTDataModule(root=str(root), resize_to_32="crop")


def test_mnist_augment_train_only_with_black_fill(fake_mnist):
    from types import SimpleNamespace

    root, _, _ = fake_mnist
    plain = MNISTDataModule(root=str(root), download=False)
    aug = MNISTDataModule(root=str(root), download=False, augment=True)
    for dm in (plain, aug):
        dm.setup("fit")
        dm.setup("test")
    assert torch.equal(plain.val_dataset.images, aug.val_dataset.images)
    assert torch.equal(plain.test_dataset.images, aug.test_dataset.images)
    assert torch.equal(plain.train_dataset.images, aug.train_dataset.images)  # items are never augmented
    images = torch.stack([aug.train_dataset[i][0] for i in range(len(aug.train_dataset))])
    labels = torch.stack([aug.train_dataset[i][1] for i in range(len(aug.train_dataset))])
    aug.trainer = SimpleNamespace(training=True, global_rank=0)
    torch.manual_seed(0)
    x, y = aug.on_after_batch_transfer((images, labels), 0)
    lo, hi = aug.input_range()
    assert x.shape == images.shape and x.dtype == torch.float32 and torch.equal(y, labels)
    assert x.min() >= lo.min() - 1e-4 and x.max() <= hi.max() + 1e-4
    # Areas shifted in from outside are black, not the normalized zero (grey): augment an all-white batch.
    white = hi.expand_as(images).clone()
    shifted = aug.on_after_batch_transfer((white, labels), 0)[0]
    assert torch.isclose(shifted.amin(), lo.flatten()[0], atol=1e-4)
    changed = (x - images).flatten(1).abs().amax(1) > 1e-4
    assert changed.sum() >= len(x) // 2


def test_stages_load_only_what_they_need(fake_mnist, monkeypatch):
    root, _, _ = fake_mnist
    loaded = []
    original = MNISTDataModule._load_official

    def spy(self, train):
        loaded.append(train)
        return original(self, train)

    monkeypatch.setattr(MNISTDataModule, "_load_official", spy)
    dm = MNISTDataModule(root=str(root), download=False)
    dm.setup("predict")
    assert loaded == [False]  # the official test split only
    assert dm.train_dataset is None and dm.val_dataset is None and len(dm.test_dataset) == 20
    assert sum(len(b[1]) for b in dm.predict_dataloader()) == 20
    dm.setup("test")  # already loaded: no reload
    assert loaded == [False]
    dm.setup("fit")
    assert loaded == [False, True]  # the official training split, once, for train + val
    dm.setup("validate")
    assert loaded == [False, True]

    fresh = MNISTDataModule(root=str(root), download=False)
    fresh.setup("validate")
    assert fresh.test_dataset is None and len(fresh.val_dataset) == 5


def test_a_split_needs_only_its_own_files(fake_mnist):
    """A data-free user often holds the test files only: the test split reads them alone, and the training
    split's error names its own files, not the test split's."""
    root, _, (test_x, test_y) = fake_mnist
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        (root / "MNIST" / "raw" / f"train-{kind}").unlink()
    dm = MNISTDataModule(root=str(root), download=False)
    dm.setup("test")
    assert torch.equal(dm.test_dataset.labels, test_y) and len(dm.test_dataset) == 20
    with pytest.raises(ZSKDError) as info:
        dm.setup("fit")
    msg = str(info.value)
    assert "files not found" in msg and "train-images-idx3-ubyte" in msg and "t10k" not in msg


def test_mnist_reader_matches_torchvision(fake_mnist):
    from torchvision.datasets import MNIST

    root, _, _ = fake_mnist
    dm = MNISTDataModule(root=str(root), download=False, resize_to_32="none", mean=(0.0,), std=(1.0,))
    for train in (True, False):
        ours, labels = dm._read_split(train)
        theirs = MNIST(str(root), train=train, download=False)
        assert torch.equal(ours, theirs.data.unsqueeze(1)) and torch.equal(labels, theirs.targets)


def _write_cifar_batch(path: Path, images: torch.Tensor, labels: torch.Tensor) -> str:
    """``images`` uint8 ``[N, 3, 32, 32]`` as one pickled CIFAR-10 batch (rows of 3,072: R, G, B planes); its md5."""
    import hashlib
    import pickle

    path.parent.mkdir(parents=True, exist_ok=True)
    batch = {"data": images.reshape(len(images), -1).numpy(), "labels": labels.tolist()}
    path.write_bytes(pickle.dumps(batch))
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def fake_cifar_test(tmp_path: Path, monkeypatch):
    """A CIFAR-10 folder holding only ``test_batch`` (12 images), whose md5 stands in for the official one."""
    g = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (12, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.arange(12) % 10
    md5 = _write_cifar_batch(tmp_path / "cifar-10-batches-py" / "test_batch", images, labels)
    official = CIFAR10DataModule._official_batches
    monkeypatch.setattr(CIFAR10DataModule, "_official_batches", classmethod(
        lambda cls, train: [(name, md5 if name == "test_batch" else sum_) for name, sum_ in official(train)]))
    return tmp_path, images, labels, md5


def test_cifar_test_split_reads_test_batch_alone(fake_cifar_test):
    root, images, labels, _ = fake_cifar_test
    dm = CIFAR10DataModule(root=str(root), download=False, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    dm.setup("test")
    assert torch.equal(dm.test_dataset.labels, labels)
    assert torch.allclose(dm.test_dataset.images, images.float() / 255.0)  # channel planes in order
    with pytest.raises(ZSKDError) as info:
        dm.setup("fit")
    msg = str(info.value)
    assert "\n" not in msg and "files not found" in msg and "data_batch_1" in msg and "test_batch" not in msg


def test_cifar_reader_matches_torchvision(fake_cifar_test, monkeypatch):
    import pickle

    import torchvision.datasets.cifar as tv_cifar

    root, _, _, _ = fake_cifar_test
    folder = root / "cifar-10-batches-py"
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(k) for k in range(10)]}))
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)  # it checks every split's files
    theirs = tv_cifar.CIFAR10(str(root), train=False, download=False)
    ours, labels = CIFAR10DataModule(root=str(root), download=False)._read_split(False)
    assert torch.equal(ours, torch.from_numpy(theirs.data).permute(0, 3, 1, 2))
    assert labels.tolist() == theirs.targets


def test_a_cifar_batch_without_the_official_md5_is_refused_unread(fake_cifar_test, monkeypatch):
    root, _, _, _ = fake_cifar_test
    path = root / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(path.read_bytes()[:-1] + b"X")  # still a pickle? never opened: the md5 differs
    monkeypatch.setattr("pickle.load", lambda *args, **kwargs: pytest.fail("a file of another md5 was unpickled"))
    with pytest.raises(ZSKDError) as info:
        CIFAR10DataModule(root=str(root), download=False).setup("test")
    msg = str(info.value)
    assert "\n" not in msg and "unreadable or corrupted" in msg and str(root) in msg
    assert "expected the official" in msg and "delete a damaged file" in msg


def test_fashion_mnist_fake(tmp_path):
    images, labels = _fake_images(30, seed=3)
    raw = tmp_path / "FashionMNIST" / "raw"
    _write_idx(raw, "train", images, labels)
    _write_idx(raw, "t10k", images[:10], labels[:10])
    dm = FashionMNISTDataModule(root=str(tmp_path), download=False, val_fraction=0.2, batch_size=8)
    dm.setup("fit")
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (24, 6)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.allclose(x[:, :, 0, 0], torch.tensor(-0.2860 / 0.3530), atol=1e-6)


# ----------------------------------------------------------------------------- errors / config
def test_missing_files_offline_error(tmp_path):
    dm = MNISTDataModule(root=str(tmp_path), download=False)
    dm.prepare_data()  # download disabled: does nothing, raises nothing
    with pytest.raises(ZSKDError) as info:
        dm.setup("fit")
    msg = str(info.value)
    assert "\n" not in msg
    assert "MNIST" in msg and str(tmp_path) in msg
    assert os.path.join(str(tmp_path), "MNIST", "raw", "train-images-idx3-ubyte") in msg
    assert "download=True" in msg and "internet" in msg

    with pytest.raises(ZSKDError) as info:
        CIFAR10DataModule(root=str(tmp_path), download=False).setup("fit")
    msg = str(info.value)
    assert "CIFAR-10" in msg and "\n" not in msg
    assert os.path.join(str(tmp_path), "cifar-10-batches-py", "data_batch_1") in msg


@pytest.mark.parametrize("content", [b"", b"\x00\x00\x08\x07not an idx file"])
def test_an_empty_or_foreign_mnist_file_is_one_line(fake_mnist, content):
    """MNIST's files carry no checksum: an empty or foreign file is named as unreadable, in one line."""
    root, _, _ = fake_mnist
    (root / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(content)
    with pytest.raises(ZSKDError) as info:
        MNISTDataModule(root=str(root), download=False).setup("fit")
    msg = str(info.value)
    assert "\n" not in msg and "files present but unreadable or corrupted" in msg and str(root) in msg


def test_failing_download_gives_clean_error(tmp_path, monkeypatch):
    _no_network(monkeypatch)
    dm = MNISTDataModule(root=str(tmp_path), download=True)
    with pytest.warns(UserWarning) as caught:  # prepare_data knows no stage: a split it cannot get is a warning
        dm.prepare_data()
    assert [str(w.message).split(":")[0] for w in caught] == ["training split not available",
                                                              "test split not available"]
    for call in (lambda: dm.setup("fit"), lambda: dm.setup("test")):
        with pytest.raises(ZSKDError) as info:
            call()
        msg = str(info.value)
        assert "\n" not in msg
        assert str(tmp_path) in msg and "train-images-idx3-ubyte" in msg
        assert "download failed" in msg and "URLError" in msg and "internet" in msg
        assert isinstance(info.value.__cause__, urllib.error.URLError)

    with pytest.warns(UserWarning, match="cifar-10-batches-py"):
        CIFAR10DataModule(root=str(tmp_path), download=True).prepare_data()


def test_only_the_test_files_offline_with_download_on(fake_mnist, monkeypatch):
    """The default download=True on an offline machine that holds only the test files: the test stage runs."""
    root, _, (_, test_y) = fake_mnist
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        (root / "MNIST" / "raw" / f"train-{kind}").unlink()
    _no_network(monkeypatch)
    dm = MNISTDataModule(root=str(root), download=True)
    with pytest.warns(UserWarning, match="^training split not available") as caught:
        dm.prepare_data()
    assert len(caught) == 1 and "train-images-idx3-ubyte" in str(caught[0].message)
    assert "t10k" not in str(caught[0].message)  # the files of the split it could not get, not the ones present
    dm.setup("test")
    assert torch.equal(dm.test_dataset.labels, test_y)


def test_a_damaged_cifar_file_is_downloaded_again(fake_cifar_test, monkeypatch):
    import torchvision.datasets as tvd

    root, _, _, _ = fake_cifar_test
    path = root / "cifar-10-batches-py" / "test_batch"
    intact = path.read_bytes()
    path.write_bytes(intact[: len(intact) // 2])  # a download cut short
    downloads = []

    def download(self):
        downloads.append(self.train)
        path.write_bytes(intact)

    monkeypatch.setattr(tvd.CIFAR10, "download", download)
    monkeypatch.setattr(tvd.CIFAR10, "_check_integrity", lambda self: True)  # the fake has no training files
    monkeypatch.setattr(tvd.CIFAR10, "_load_meta", lambda self: None)
    dm = CIFAR10DataModule(root=str(root), download=True)
    dm.setup("test")
    assert downloads == [False] and len(dm.test_dataset) == 12


def test_labels_out_of_range_are_one_line(fake_mnist):
    root, _, (test_x, test_y) = fake_mnist
    _write_idx(root / "MNIST" / "raw", "t10k", test_x, test_y + 5)  # labels 5..14
    with pytest.raises(ZSKDError) as info:
        MNISTDataModule(root=str(root), download=False).setup("test")
    msg = str(info.value)
    assert "\n" not in msg and "labels span 5..14, expected 0..9" in msg and "t10k-labels-idx1-ubyte" in msg


def test_download_skipped_when_files_present(fake_mnist, monkeypatch):
    root, _, _ = fake_mnist
    _no_network(monkeypatch)  # would raise if a download were attempted
    dm = MNISTDataModule(root=str(root), download=True)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_dataset) == 45


def test_root_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("ZSKD_DATA_ROOT", str(tmp_path / "envroot"))
    assert MNISTDataModule().root == str(tmp_path / "envroot")
    assert DigitsDataModule(root=None).root == str(tmp_path / "envroot")
    assert MNISTDataModule(root=str(tmp_path)).root == str(tmp_path)  # explicit root wins
    monkeypatch.delenv("ZSKD_DATA_ROOT")
    assert os.path.normpath(CIFAR10DataModule().root) == "data"


def test_class_config():
    c = CIFAR10DataModule(download=False)
    assert c.input_shape == (3, 32, 32) and c.num_classes == 10
    lo, hi = c.input_range()
    assert lo.shape == hi.shape == (3, 1, 1)
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)
    assert torch.allclose(lo, -mean / std) and torch.allclose(hi, (1 - mean) / std)
    f = FashionMNISTDataModule(resize_to_32="none")
    assert f.input_shape == (1, 28, 28) and f.mean == (0.2860,) and f.std == (0.3530,)
    assert isinstance(f, ClassificationDataModule)
    m = MNISTDataModule(num_workers=2, batch_size=64)
    assert m.eval_batch_size == 64 and m.num_workers == 2
    for bad, says in ((dict(val_fraction=1.0), r"val_fraction must be in \[0, 1\), got 1.0"),
                      (dict(val_fraction=-0.1), r"val_fraction must be in \[0, 1\), got -0.1"),
                      (dict(batch_size=0), "batch_size must be >= 1, got 0")):
        with pytest.raises(ZSKDError, match=says):
            MNISTDataModule(**bad)


def test_persistent_workers_only_with_workers(fake_mnist):
    root, _, _ = fake_mnist
    dm = MNISTDataModule(root=str(root), download=False, num_workers=1, batch_size=10)
    dm.setup("test")
    loader = dm.test_dataloader()
    assert loader.num_workers == 1 and loader.persistent_workers
    x, y = next(iter(loader))
    assert x.shape == (10, 1, 32, 32) and y.shape == (10,)


# ----------------------------------------------------------------------------- real data (optional)
@pytest.mark.skipif(not all((SHARED_DATA / "MNIST" / "raw" / f"t10k-{part}-ubyte").is_file()
                            for part in ("images-idx3", "labels-idx1")), reason="shared MNIST test split not present")
def test_real_mnist_test_split():
    dm = MNISTDataModule(root=str(SHARED_DATA), download=False)
    dm.setup("test")
    assert len(dm.test_dataset) == 10_000
    assert set(dm.test_dataset.labels.unique().tolist()) == set(range(10))
    assert dm.test_dataset.images.shape == (10_000, 1, 32, 32)
    # normalized with the standard constants: the served mean over the 28x28 interior is near 0
    assert abs(float(dm.test_dataset.images[:, :, 2:30, 2:30].mean())) < 0.1


@pytest.mark.skipif(not all((SHARED_DATA / "cifar-10-batches-py" / name).is_file()
                            for name in ("batches.meta", "test_batch", *(f"data_batch_{i}" for i in range(1, 6)))),
                    reason="shared CIFAR-10 (both splits) not present")
def test_real_cifar_splits_match_torchvision():
    from torchvision.datasets import CIFAR10

    dm = CIFAR10DataModule(root=str(SHARED_DATA), download=False)
    for train in (True, False):
        ours, labels = dm._read_split(train)
        theirs = CIFAR10(str(SHARED_DATA), train=train, download=False)
        assert torch.equal(ours, torch.from_numpy(theirs.data).permute(0, 3, 1, 2))
        assert labels.tolist() == theirs.targets


def test_normalization_is_an_argument():
    """A teacher trained with other statistics gets its own: served = (pixel - mean) / std."""
    default, own = DigitsDataModule(), DigitsDataModule(mean=(0.5,), std=(0.25,))
    default.setup("test")
    own.setup("test")
    x_default, x_own = default.test_dataset[0][0], own.test_dataset[0][0]
    pixels = x_default * default.std[0] + default.mean[0]
    assert torch.allclose(x_own, (pixels - 0.5) / 0.25, atol=1e-5)
    assert own.input_range()[0].item() == pytest.approx(-2.0)
    with pytest.raises(ZSKDError, match="1 mean and 1 std"):
        DigitsDataModule(mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    with pytest.raises(ZSKDError, match="go together"):
        DigitsDataModule(mean=(0.5,))
    # 0-255 statistics would serve every pixel within 0.02 of one value, and a teacher would learn poorly, silently
    with pytest.raises(ZSKDError, match=r"^DigitsDataModule: mean and std are of pixel values in \[0, 1\], got mean "
                                        r"\[33.32\], std \[78.57\]: divide 0-255 statistics by 255$"):
        DigitsDataModule(mean=(33.32,), std=(78.57,))


def test_a_checkpoint_of_another_split_is_refused_in_one_line():
    """Resuming with another split seed (or val_fraction) put images the model had trained on into the validation
    split, with no warning: val/acc, and a checkpoint chosen on it, were inflated. The split is in the state now."""
    trained = DigitsDataModule(seed=0, val_fraction=0.1)
    state = trained.state_dict()
    assert state["split"] == {"seed": 0, "val_fraction": 0.1}
    DigitsDataModule(seed=0, val_fraction=0.1).load_state_dict(state)  # the same split: resumes
    with pytest.raises(ZSKDError, match=r"^DigitsDataModule: this checkpoint trained on the split of seed 0 and "
                                        r"val_fraction 0.1, the datamodule now has seed 3 and val_fraction 0.1: "):
        DigitsDataModule(seed=3, val_fraction=0.1).load_state_dict(state)
    with pytest.raises(ZSKDError, match="val_fraction 0.2"):
        DigitsDataModule(seed=0, val_fraction=0.2).load_state_dict(state)
    older = {k: v for k, v in state.items() if k != "split"}  # a checkpoint from before the split was kept
    DigitsDataModule(seed=3).load_state_dict(older)


def test_testing_and_predicting_take_a_checkpoint_of_another_split(tmp_path):
    """Lightning restores the datamodule's state in every stage: `zskd test --data.seed 1 --ckpt_path ...` was
    refused for a split that test and predict never read (they read the official test set). Validation still is."""
    from helpers.tiny import quiet_trainer
    from zskd_lightning import ClassifierModule
    from zskd_lightning.models import DigitsConvNetHalf

    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(ClassifierModule(DigitsConvNetHalf()), datamodule=DigitsDataModule(seed=0, batch_size=16))
    checkpoint = tmp_path / "split0.ckpt"
    trainer.save_checkpoint(checkpoint)
    other = DigitsDataModule(seed=3, batch_size=16)
    (metrics,) = quiet_trainer(tmp_path).test(ClassifierModule(DigitsConvNetHalf()), datamodule=other,
                                              ckpt_path=checkpoint, verbose=False)
    assert 0.0 <= metrics["test/acc"] <= 1.0
    predictions = quiet_trainer(tmp_path).predict(ClassifierModule(DigitsConvNetHalf()), datamodule=other,
                                                  ckpt_path=checkpoint)
    assert sum(len(p) for p in predictions) == len(other.test_dataset)
    with pytest.raises(ZSKDError, match="this checkpoint trained on the split of seed 0"):
        quiet_trainer(tmp_path).validate(ClassifierModule(DigitsConvNetHalf()), datamodule=other,
                                         ckpt_path=checkpoint, verbose=False)


def test_validate_builds_the_validation_split_alone():
    """A data-free run validating on real images sets its eval data up for ``validate``: the training split
    (553 MB of float32 for CIFAR-10, per process) was built too and never read."""
    dm = DigitsDataModule(seed=0)
    dm.setup("validate")
    assert dm.train_dataset is None and len(dm.val_dataset) == 144
    val_labels = dm.val_dataset.labels.clone()
    dm.setup("fit")  # the same split, the training part added
    assert len(dm.train_dataset) == 1293 and torch.equal(dm.val_dataset.labels, val_labels)
