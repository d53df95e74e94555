"""Tests of data/: readers on tiny files in the real formats, partitions, loaders,
augmentation. CPU only; no real data needed (one test uses it when installed)."""

import gzip
import os
import pickle
import pickletools
import re
import struct

import numpy as np
import pytest
import torch

from powergossip import data
from powergossip.data import cifar10, fashion_mnist, wikitext2
from powergossip.data.augment import draw_crop_flip, random_crop_flip


# ---------------------------------------------------------------- file writers
def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    array = np.asarray(array, dtype=np.uint8)
    if magic is None:
        magic = 0x0800 | array.ndim
    return struct.pack(">i", magic) + struct.pack(f">{array.ndim}i", *array.shape) + array.tobytes()


def write(path, content: bytes, gz: bool):
    with (gzip.open if gz else open)(str(path) + (".gz" if gz else ""), "wb") as f:
        f.write(content)


def fake_fmnist(folder, n_train=7, n_test=3, gz_train=True, gz_test=False, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    os.makedirs(folder, exist_ok=True)
    for name, array in arrays.items():
        write(os.path.join(folder, name), idx_bytes(array), gz_train if name.startswith("train") else gz_test)
    return arrays


@pytest.fixture
def no_system_fmnist(monkeypatch, tmp_path):
    """Make the reader's default folder a path that does not exist."""
    missing = str(tmp_path / "no-system-dir")
    monkeypatch.setattr(fashion_mnist, "DEFAULT_DIR", missing)
    return missing


# ---------------------------------------------------------------- Fashion-MNIST
def test_idx_roundtrip_gzipped_and_raw(tmp_path):
    array = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5) * 7
    write(tmp_path / "a", idx_bytes(array), gz=True)
    write(tmp_path / "b", idx_bytes(array), gz=False)
    for path in (tmp_path / "a.gz", tmp_path / "b"):
        out = fashion_mnist.read_idx(str(path), 2051)
        assert out.dtype == torch.uint8 and out.shape == (2, 3, 5)
        assert np.array_equal(out.numpy(), array)


def test_fashion_mnist_reader_returns_what_was_written(tmp_path, no_system_fmnist):
    arrays = fake_fmnist(tmp_path, gz_train=True, gz_test=False)
    train_x, train_y, test_x, test_y = fashion_mnist.load_fashion_mnist(str(tmp_path))
    assert train_x.shape == (7, 1, 28, 28) and test_x.shape == (3, 1, 28, 28)
    assert np.array_equal(train_x[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(test_x[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])
    assert train_y.dtype == torch.int64
    assert train_y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert test_y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()

    ds = data.load("fashion_mnist", str(tmp_path), "cpu")
    assert (ds.in_channels, ds.image_size, ds.num_classes) == (1, 28, 10)
    assert not ds.is_language_model and not ds.default_augment
    assert torch.equal(ds.train_x, train_x) and torch.equal(ds.test_y, test_y)


def test_fashion_mnist_found_in_subfolder(tmp_path, no_system_fmnist):
    arrays = fake_fmnist(tmp_path / "fashion-mnist")
    _, train_y, _, _ = fashion_mnist.load_fashion_mnist(str(tmp_path))
    assert train_y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()


def test_fashion_mnist_missing_names_every_place(tmp_path, monkeypatch):
    fake_fmnist(tmp_path / "system")  # a default copy that would load: a given data_dir never falls back to it
    monkeypatch.setattr(fashion_mnist, "DEFAULT_DIR", str(tmp_path / "system"))
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")  # 1 of 4 present
    with pytest.raises(FileNotFoundError) as info:
        fashion_mnist.load_fashion_mnist(str(tmp_path))
    message = str(info.value)
    assert str(tmp_path) in message and str(tmp_path / "system") not in message
    assert os.path.join(str(tmp_path), "fashion-mnist") in message
    assert "lacks train-labels-idx1-ubyte[.gz]" in message
    assert "apt-get install dataset-fashion-mnist" in message and "data_dir=" in message


def test_fashion_mnist_missing_data_dir_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    fake_fmnist(tmp_path / "system")  # a default copy that would load
    monkeypatch.setattr(fashion_mnist, "DEFAULT_DIR", str(tmp_path / "system"))
    missing = str(tmp_path / "nonexistent")
    message = re.escape(f"data_dir={missing} does not exist (leave data_dir unset to use {tmp_path / 'system'})")
    for call in (fashion_mnist.find_files, fashion_mnist.load_fashion_mnist,
                 lambda d: data.load("fashion_mnist", d), lambda d: data.check_data_dir("fashion_mnist", d)):
        with pytest.raises(FileNotFoundError, match=message):
            call(missing)
    assert data.load("fashion_mnist", None).train_x.shape == (7, 1, 28, 28)  # None: the default copy


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("train-labels-idx1-ubyte", idx_bytes(np.zeros(7), magic=2051), "bad IDX magic number 2051, expected 2049"),
        ("train-images-idx3-ubyte", idx_bytes(np.zeros((7, 28, 28)))[:-10], "truncated IDX data"),
        ("train-images-idx3-ubyte", idx_bytes(np.zeros((7, 28, 28))) + b"xx", "trailing bytes"),
        ("t10k-images-idx3-ubyte", b"\x00\x00", "truncated IDX file"),
        ("train-labels-idx1-ubyte", idx_bytes(np.zeros(6)), "holds 7 images but .* holds 6 labels"),
        ("t10k-labels-idx1-ubyte", idx_bytes(np.full(3, 10)), "label 10 outside 0..9"),
    ],
)
def test_fashion_mnist_corrupt_files(tmp_path, no_system_fmnist, name, content, match):
    fake_fmnist(tmp_path, gz_train=False, gz_test=False)
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=match):
        fashion_mnist.load_fashion_mnist(str(tmp_path))


def test_fashion_mnist_corrupt_gzip(tmp_path, no_system_fmnist):
    fake_fmnist(tmp_path, gz_train=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:100])  # gzip stream cut short
    with pytest.raises(ValueError, match="corrupt gzip data"):
        fashion_mnist.load_fashion_mnist(str(tmp_path))


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    ds = data.load("fashion_mnist", None, "cpu")
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert ds.train_x.dtype == torch.uint8
    assert torch.equal(ds.train_y.bincount(), torch.full((10,), 6000))
    assert torch.equal(ds.test_y.bincount(), torch.full((10,), 1000))
    x = ds.normalize(ds.train_x[:20000]).double()
    assert abs(x.mean().item()) < 0.02 and abs(x.std().item() - 1) < 0.02


# ---------------------------------------------------------------- CIFAR-10
class Python2Pickler(pickle._Pickler):
    """Pickles as the distributed CIFAR-10 files were written (Python 2's cPickle,
    protocol 2, numpy 1): str and bytes as Python 2 strings (Python 3 would call
    _codecs.encode), and numpy 1's module for _reconstruct unless told otherwise."""

    dispatch = pickle._Pickler.dispatch.copy()
    reconstruct_module = "numpy.core.multiarray"

    def save_python2_str(self, obj):
        raw = obj.encode("latin-1") if isinstance(obj, str) else obj
        size = len(raw)
        self.write((pickle.SHORT_BINSTRING + bytes([size]) if size < 256
                    else pickle.BINSTRING + struct.pack("<i", size)) + raw)
        self.memoize(obj)

    dispatch[str] = dispatch[bytes] = save_python2_str

    def save_global(self, obj, name=None):
        if name == "_reconstruct":
            self.write(pickle.GLOBAL + f"{self.reconstruct_module}\n_reconstruct\n".encode())
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def write_cifar_batch(path, batch: dict, reconstruct_module="numpy.core.multiarray"):
    with open(path, "wb") as f:
        pickler = Python2Pickler(f, protocol=2)
        pickler.reconstruct_module = reconstruct_module
        pickler.dump(batch)


def fake_cifar(folder, per_batch=2, n_test=3, seed=0, reconstruct_module="numpy.core.multiarray"):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    written = {}
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        batch = {  # the keys of the real files, in their order
            b"batch_label": f"{name} of 6".encode(),
            b"labels": rng.integers(0, 10, n).tolist(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"image_{name}_{i}.png".encode() for i in range(n)],
        }
        write_cifar_batch(os.path.join(folder, name), batch, reconstruct_module)
        written[name] = batch
    return written


def test_cifar_reader_returns_what_was_written(tmp_path):
    written = fake_cifar(tmp_path / "cifar-10-batches-py")
    for data_dir in (tmp_path, tmp_path / "cifar-10-batches-py"):  # parent or the folder itself
        train_x, train_y, test_x, test_y = cifar10.load_cifar10(str(data_dir))
        assert train_x.shape == (10, 3, 32, 32) and test_x.shape == (3, 3, 32, 32)
        rows = np.concatenate([written[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
        # channel-major: value c * 1024 + i * 32 + j is pixel (i, j) of channel c
        assert train_x[3, 2, 5, 7].item() == rows[3, 2 * 1024 + 5 * 32 + 7]
        assert np.array_equal(train_x.reshape(10, -1).numpy(), rows)
        assert train_y.tolist() == sum((written[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
        assert test_y.tolist() == written["test_batch"][b"labels"]
        assert np.array_equal(test_x.reshape(3, -1).numpy(), written["test_batch"][b"data"])
    ds = data.load("cifar10", str(tmp_path))
    assert (ds.in_channels, ds.image_size, ds.num_classes, ds.default_augment) == (3, 32, 10, True)
    assert ds.mean == (0.4914, 0.4822, 0.4465) and ds.std == (0.2023, 0.1994, 0.2010)


def test_cifar_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py.*download=true.*cifar-10-python.tar.gz") as info:
        cifar10.load_cifar10(str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_cifar_corrupt_batch(tmp_path):
    fake_cifar(tmp_path)
    (tmp_path / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="data_batch_3: not a readable CIFAR-10 pickle"):
        cifar10.load_cifar10(str(tmp_path))
    write_cifar_batch(tmp_path / "data_batch_3", {b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]})
    with pytest.raises(ValueError, match=r"uint8 \[n, 3072\]"):
        cifar10.load_cifar10(str(tmp_path))


@pytest.mark.parametrize("reconstruct_module", ["numpy.core.multiarray", "numpy._core.multiarray"])
def test_cifar_batches_in_the_real_format_load(tmp_path, reconstruct_module):
    written = fake_cifar(tmp_path, reconstruct_module=reconstruct_module)
    # the helper writes what a real batch holds: numpy's three globals and Python 2 strings
    ops = list(pickletools.genops((tmp_path / "data_batch_1").read_bytes()))
    assert {arg for op, arg, _ in ops if op.name == "GLOBAL"} == {
        f"{reconstruct_module} _reconstruct", "numpy ndarray", "numpy dtype"}
    assert {op.name for op, _, _ in ops} >= {"PROTO", "SHORT_BINSTRING", "BINSTRING", "SETITEMS", "APPENDS"}
    assert not {op.name for op, _, _ in ops} & {"BINUNICODE", "SHORT_BINBYTES", "BINBYTES", "STACK_GLOBAL"}
    train_x, train_y, _, test_y = cifar10.load_cifar10(str(tmp_path))
    assert np.array_equal(train_x[:2].reshape(2, -1).numpy(), written["data_batch_1"][b"data"])
    assert test_y.tolist() == written["test_batch"][b"labels"]


class MakesFolder:
    """Unpickling it calls os.mkdir(path): evidence that a pickle ran code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


@pytest.mark.parametrize("python2", [True, False], ids=["python2-protocol2", "highest-protocol"])
def test_cifar_batch_that_runs_code_is_refused(tmp_path, python2):
    fake_cifar(tmp_path)
    evidence = tmp_path / "made-by-the-pickle"
    batch = {b"data": MakesFolder(str(evidence)), b"labels": [0]}
    if python2:
        write_cifar_batch(tmp_path / "data_batch_1", batch)
    else:
        (tmp_path / "data_batch_1").write_bytes(pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL))
    refused = f"{os.mkdir.__module__}.mkdir"  # posix.mkdir on Linux
    with pytest.raises(ValueError, match=f"refusing to load .*data_batch_1: it asks for {refused}, "
                                         "which a CIFAR-10 batch never contains"):
        data.load("cifar10", str(tmp_path))
    assert not evidence.exists()


# ---------------------------------------------------------------- WikiText-2
def write_wikitext(folder):
    os.makedirs(folder, exist_ok=True)
    texts = {
        "train": " = Title = \n\n the cat sat <unk> \n the dog \n",
        "valid": " the bird sat \n",
        "test": " dog cat \n\n",
    }
    for split, text in texts.items():
        (folder / f"wiki.{split}.tokens").write_text(text, encoding="utf-8")


def test_wikitext_reader(tmp_path):
    write_wikitext(tmp_path / "wikitext-2")
    for data_dir in (tmp_path, tmp_path / "wikitext-2"):
        train, valid, test, vocab = wikitext2.load_wikitext2(str(data_dir))
        assert vocab == ["=", "Title", "<eos>", "the", "cat", "sat", "<unk>", "dog"]
        words = lambda ids: [vocab[i] for i in ids.tolist()]  # noqa: E731
        assert words(train) == ["=", "Title", "=", "<eos>", "<eos>", "the", "cat", "sat", "<unk>",
                                "<eos>", "the", "dog", "<eos>"]
        assert words(valid) == ["the", "<unk>", "sat", "<eos>"]  # "bird" not in train
        assert words(test) == ["dog", "cat", "<eos>", "<eos>"]
        assert train.dtype == torch.int64
    ds = data.load("wikitext2", str(tmp_path))
    assert ds.is_language_model and ds.num_classes == 8 and ds.vocab == vocab
    assert torch.equal(ds.valid_x, valid) and ds.train_y is None


def test_wikitext_unk_appended_and_missing(tmp_path):
    write_wikitext(tmp_path)
    (tmp_path / "wiki.train.tokens").write_text("a b\n", encoding="utf-8")
    train, valid, _, vocab = wikitext2.load_wikitext2(str(tmp_path))
    assert vocab == ["a", "b", "<eos>", "<unk>"] and valid.tolist() == [3, 3, 3, 2]
    os.remove(tmp_path / "wiki.test.tokens")
    with pytest.raises(FileNotFoundError, match="wiki.test.tokens.*wikitext-2"):
        wikitext2.load_wikitext2(str(tmp_path))


# ---------------------------------------------------------------- load(), synthetic
def test_load_unknown_task_and_option():
    with pytest.raises(ValueError, match="fashion_mnist, cifar10, wikitext2, synthetic"):
        data.load("mnist")
    with pytest.raises(ValueError, match="unknown option.*download"):
        data.load("synthetic", download=True)


@pytest.mark.parametrize("task, reader", [("fashion_mnist", fashion_mnist), ("cifar10", cifar10), ("wikitext2", wikitext2)])
def test_check_data_dir(tmp_path, task, reader):
    missing, a_file = tmp_path / "nonexistent", tmp_path / "a-file"
    a_file.write_text("")
    for data_dir, problem in ((missing, "does not exist"), (a_file, "is not a folder")):
        message = re.escape(f"data_dir={data_dir} {problem} (leave data_dir unset to use {reader.DEFAULT_DIR})")
        for call in (data.check_data_dir, data.load):
            with pytest.raises(FileNotFoundError, match=message):
                call(task, str(data_dir))
    data.check_data_dir(task, str(tmp_path))  # a folder passes without its files being looked for
    data.check_data_dir(task, None)


def test_check_data_dir_exceptions(tmp_path):
    missing = str(tmp_path / "nonexistent")
    data.check_data_dir("synthetic", missing)  # ignores data_dir
    data.check_data_dir("cifar10", missing, download=True)  # the download creates it
    with pytest.raises(ValueError, match="unknown task 'mnist'"):
        data.check_data_dir("mnist", None)


def test_synthetic_deterministic():
    a = data.load("synthetic", num_train=20, num_test=5, in_channels=2, image_size=6, num_classes=4, seed=3)
    b = data.load("synthetic", num_train=20, num_test=5, in_channels=2, image_size=6, num_classes=4, seed=3)
    c = data.load("synthetic", num_train=20, num_test=5, in_channels=2, image_size=6, num_classes=4, seed=4)
    assert a.train_x.shape == (20, 2, 6, 6) and a.test_x.shape == (5, 2, 6, 6)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_x, c.train_x)
    assert int(a.train_y.max()) <= 3 and a.num_classes == 4 and a.mean == (0.5, 0.5)


# ---------------------------------------------------------------- partitions
def balanced_labels(num_classes=10, per_class=100, seed=0):
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]


def assert_equal_disjoint(indices, n_workers, shard, num_samples):
    assert indices.shape == (n_workers, shard) and indices.dtype == torch.int64
    flat = indices.flatten()
    assert flat.unique().numel() == flat.numel()  # no sample twice
    assert int(flat.min()) >= 0 and int(flat.max()) < num_samples


@pytest.mark.parametrize("scheme, kwargs", [
    ("iid", {}), ("sorted", {"shuffled_ratio": 0.0}), ("sorted", {"shuffled_ratio": 0.3}),
    ("sorted", {"shuffled_ratio": 1.0}), ("dirichlet", {"alpha": 0.1}), ("dirichlet", {"alpha": 10.0}),
])
def test_partition_equal_disjoint_deterministic(scheme, kwargs):
    labels = balanced_labels()[:997]  # N not divisible by n_workers, classes uneven
    p = data.make_partition(scheme, labels, n_workers=7, seed=5, **kwargs)
    assert p.shard_size == 997 // 7
    for epoch in (0, 1):
        indices = p.worker_indices(epoch)
        assert_equal_disjoint(indices, 7, 142, 997)
        again = data.make_partition(scheme, labels, n_workers=7, seed=5, **kwargs).worker_indices(epoch)
        assert torch.equal(indices, again)
    other_seed = data.make_partition(scheme, labels, n_workers=7, seed=6, **kwargs).worker_indices(0)
    assert not torch.equal(p.worker_indices(0), other_seed)
    # the order within shards changes between epochs in every scheme
    assert not torch.equal(p.worker_indices(0), p.worker_indices(1))


def test_iid_reshuffles_across_workers():
    p = data.IIDPartition(1000, n_workers=4, seed=0)
    e0, e1 = p.worker_indices(0), p.worker_indices(1)
    same_worker = len(set(e0[0].tolist()) & set(e1[0].tolist()))
    assert 35 <= same_worker <= 95  # 250 * 250 / 1000 = 62.5 expected, not all 250
    # iid shards see all labels in about equal numbers
    shard_labels = balanced_labels()[e0]
    for w in range(4):
        hist = torch.bincount(shard_labels[w], minlength=10)
        assert int(hist.min()) >= 10 and int(hist.max()) <= 45


def test_sorted_ratio_zero_is_label_sorted():
    labels = balanced_labels()
    p = data.SortedPartition(labels, n_workers=10, shuffled_ratio=0.0, seed=0)
    for epoch in (0, 3):
        shard_labels = labels[p.worker_indices(epoch)]
        for w in range(10):
            assert shard_labels[w].unique().tolist() == [w]
        # the same samples every epoch, only the order changes
        assert torch.equal(p.worker_indices(epoch).sort(1).values, p.worker_indices(0).sort(1).values)
    p5 = data.SortedPartition(labels, n_workers=5, shuffled_ratio=0.0, seed=0)
    assert all(labels[row].unique().numel() == 2 for row in p5.worker_indices(0))


def test_sorted_ratio_mixes():
    labels = balanced_labels()
    half = data.SortedPartition(labels, n_workers=10, shuffled_ratio=0.5, seed=0)
    assert half.num_pooled == 50
    own = [(labels[row] == w).float().mean().item() for w, row in enumerate(half.worker_indices(0))]
    # 50 kept + about 5 of the 50 pooled samples are of the worker's own label
    assert all(0.5 <= f <= 0.65 for f in own) and not all(f == own[0] for f in own)
    full = data.SortedPartition(labels, n_workers=10, shuffled_ratio=1.0, seed=0)
    for row in full.worker_indices(0):
        assert labels[row].unique().numel() == 10 and torch.bincount(labels[row]).max() <= 25
    e0, e1 = full.worker_indices(0), full.worker_indices(1)
    assert len(set(e0[0].tolist()) & set(e1[0].tolist())) < 30  # reshuffled across workers


def test_dirichlet_alpha_controls_skew():
    labels = balanced_labels(per_class=500)
    uniform = data.DirichletPartition(labels, n_workers=10, alpha=1000.0, seed=0)
    for row in uniform.worker_indices(0):
        hist = torch.bincount(labels[row], minlength=10)
        assert int(hist.min()) >= 40 and int(hist.max()) <= 60  # 50 each ideally
    skewed = data.DirichletPartition(labels, n_workers=10, alpha=0.05, seed=0)
    top = [torch.bincount(labels[row], minlength=10).max().item() / 500 for row in skewed.worker_indices(0)]
    assert np.median(top) > 0.7
    # the class counts it reports are the ones it hands out, and stay fixed
    for w, row in enumerate(skewed.worker_indices(2)):
        assert torch.bincount(labels[row], minlength=10).tolist() == skewed.class_counts[w].tolist()


def test_per_class_dirichlet_split_divides_every_class_by_its_proportions():
    labels = balanced_labels(per_class=50)[:497]  # classes of unequal sizes
    split = data.make_partition("dirichlet_per_class", labels, n_workers=12, seed=4, alpha=0.3)
    flat = torch.cat(split.shards)
    assert sorted(flat.tolist()) == list(range(497))  # every example in exactly one shard
    assert split.shard_sizes.tolist() == [len(shard) for shard in split.shards] and len(set(split.shard_sizes.tolist())) > 1
    assert split.shard_size == 497 // 12 and min(split.shard_sizes) >= 1
    class_sizes = torch.bincount(labels, minlength=10)
    groups = [range(0, 6), range(6, 12)]  # 12 workers, 10 classes: two groups of at most 10
    for w, shard in enumerate(split.shards):
        assert torch.bincount(labels[shard], minlength=10).tolist() == split.class_counts[w].tolist()
    for k in range(10):
        for group in groups:
            share = int(split.class_counts[list(group), k].sum())
            assert abs(share - class_sizes[k] / 2) <= 1  # each group gets its part of the class
            assert split.proportions[k, list(group)].sum() == pytest.approx(1.0)
            for w in group:  # largest-remainder rounding of the class's Dirichlet proportions
                assert abs(split.class_counts[w, k] - split.proportions[k, w] * share) < 1
    again = data.make_partition("dirichlet_per_class", labels, n_workers=12, seed=4, alpha=0.3)
    assert all(torch.equal(a, b) for a, b in zip(split.shards, again.shards))
    other = data.make_partition("dirichlet_per_class", labels, n_workers=12, seed=5, alpha=0.3)
    assert not all(torch.equal(a, b) for a, b in zip(split.shards, other.shards))
    skewed = data.make_partition("dirichlet_per_class", balanced_labels(per_class=500), n_workers=10, seed=0, alpha=0.01)
    assert (skewed.class_counts.max(axis=1) / skewed.shard_sizes.numpy() > 0.9).mean() > 0.7  # about one class each


def test_per_class_shards_are_cycled_through_and_reshuffled_each_pass(tiny):
    split = data.make_partition("dirichlet_per_class", tiny.train_y, n_workers=4, seed=11, alpha=0.2)
    assert split.shard_sizes.tolist() == [59, 80, 60, 4]  # worker 3's shard is smaller than a batch: cycled within one
    loader = data.WorkerLoader(tiny, split, batch_size=8, seed=7, augment=False)
    assert len(loader) == (203 // 4) // 8 == 6  # the mean shard size over the batch
    epochs = [split.epoch_indices(epoch, 6, 8) for epoch in range(6)]
    assert all(e.shape == (4, 48) for e in epochs)
    assert torch.equal(torch.stack([y for _, y in loader.epoch_batches(1)], 1).flatten(1), tiny.train_y[epochs[1]])
    stream = torch.cat(epochs, dim=1)  # each worker's visits over 6 epochs, in order
    for w, shard in enumerate(split.shards):
        size = len(shard)
        passes = [stream[w, p * size:(p + 1) * size] for p in range(stream.shape[1] // size)]
        assert all(sorted(p.tolist()) == sorted(shard.tolist()) for p in passes)  # each pass: the shard once
        if size > 3:
            assert not torch.equal(passes[0], passes[1])  # reshuffled when used up
    assert torch.equal(split.epoch_indices(3, 6, 8), epochs[3])  # a pure function of (seed, worker, pass)


def test_partition_validation():
    labels = balanced_labels()
    with pytest.raises(ValueError, match="alpha must be a positive"):
        data.make_partition("dirichlet", labels, 4, alpha=0.0)
    with pytest.raises(ValueError, match="alpha must be a positive"):
        data.make_partition("dirichlet", labels, 4, alpha=float("nan"))
    with pytest.raises(ValueError, match=r"shuffled_ratio must be in \[0, 1\], got 1.5"):
        data.make_partition("sorted", labels, 4, shuffled_ratio=1.5)
    with pytest.raises(ValueError, match=r"shuffled_ratio must be in \[0, 1\], got -0.1"):
        data.make_partition("sorted", labels, 4, shuffled_ratio=-0.1)
    with pytest.raises(ValueError, match="n_workers=1001 is more than the 1000 training samples"):
        data.make_partition("iid", labels, 1001)
    with pytest.raises(ValueError, match="n_workers must be a positive integer"):
        data.make_partition("iid", labels, 0)
    with pytest.raises(ValueError, match="unknown partition scheme 'random'; choose one of iid, sorted, dirichlet, dirichlet_per_class"):
        data.make_partition("random", labels, 4)


# ---------------------------------------------------------------- loaders
@pytest.fixture(scope="module")
def tiny():
    return data.load("synthetic", num_train=203, num_test=9, in_channels=3, image_size=10, num_classes=5, seed=1)


def test_loader_shapes_and_content(tiny):
    partition = data.make_partition("iid", tiny.train_y, n_workers=4, seed=2)
    loader = data.WorkerLoader(tiny, partition, batch_size=16, seed=3, augment=False)
    assert partition.shard_size == 50 and loader.num_batches_per_epoch == 3 == len(loader)
    indices = partition.worker_indices(1)
    batches = list(loader.epoch_batches(1))
    assert len(batches) == 3
    for step, (x, y) in enumerate(batches):
        assert x.shape == (4, 16, 3, 10, 10) and x.dtype == torch.float32 and y.shape == (4, 16)
        idx = indices[:, step * 16 : (step + 1) * 16]
        assert torch.equal(y, tiny.train_y[idx])
        expected = (tiny.train_x[idx].float() / 255 - 0.5) / 0.2887
        assert torch.allclose(x, expected, atol=1e-5)


@pytest.mark.parametrize("augment", [False, True])
def test_batches_made_several_steps_at_once_are_each_steps_batches(tiny, augment):
    """A GPU makes the batches of WorkerLoader.STEPS_AT_ONCE steps together: each step's batch
    bit for bit, from any step (a resumed epoch) and with the last group short; the same for
    a worker's batch (worker_batch). Here on the CPU, 3 steps at once (6 steps an epoch)."""
    partition = data.make_partition("iid", tiny.train_y, n_workers=4, seed=2)
    loaders = [data.WorkerLoader(tiny, partition, batch_size=8, seed=7, augment=augment) for _ in range(2)]
    assert data.WorkerLoader.STEPS_AT_ONCE > 1 and loaders[0].steps_at_once == 1  # on the CPU: one at a time
    loaders[1].steps_at_once = 3
    for start in (0, 2, 5, 6):
        one, grouped = (list(loader.epoch_batches(1, start)) for loader in loaders)
        assert len(one) == len(grouped) == 6 - start
        for (x, y), (xg, yg) in zip(one, grouped):
            assert torch.equal(x, xg) and torch.equal(y, yg)
    assert torch.equal(loaders[1].worker_batch(2, 1, 4)[0], list(loaders[0].epoch_batches(1))[4][0][2])


@pytest.mark.parametrize("scheme", ["iid", "sorted", "dirichlet", "dirichlet_per_class"])
def test_loader_layout_independent_with_augmentation(tiny, scheme):
    partition = data.make_partition(scheme, tiny.train_y, n_workers=4, seed=2, shuffled_ratio=0.2, alpha=0.5)
    whole = data.WorkerLoader(tiny, partition, batch_size=8, first_worker=0, num_local_workers=4, seed=7, augment=True)
    stacked = list(whole.epoch_batches(2))
    assert len(stacked) == 6
    for i in range(4):
        alone = data.WorkerLoader(tiny, partition, batch_size=8, first_worker=i, num_local_workers=1, seed=7, augment=True)
        for (x, y), (xi, yi) in zip(stacked, alone.epoch_batches(2), strict=True):
            assert xi.shape == (1, 8, 3, 10, 10)
            assert torch.equal(x[i], xi[0]) and torch.equal(y[i], yi[0])
    pair = data.WorkerLoader(tiny, partition, batch_size=8, first_worker=2, num_local_workers=2, seed=7, augment=True)
    x_pair, _ = next(pair.epoch_batches(2))
    assert torch.equal(x_pair, stacked[0][0][2:4])


def test_loader_resume_and_epochs(tiny):
    partition = data.make_partition("iid", tiny.train_y, n_workers=4, seed=2)
    loader = data.WorkerLoader(tiny, partition, batch_size=8, seed=7, augment=True)
    full = list(loader.epoch_batches(5))
    resumed = list(loader.epoch_batches(5, start_step=4))
    assert len(resumed) == 2
    for (x, y), (xr, yr) in zip(full[4:], resumed, strict=True):
        assert torch.equal(x, xr) and torch.equal(y, yr)
    assert list(loader.epoch_batches(5, start_step=6)) == []
    with pytest.raises(ValueError, match="start_step=7 outside 0..6"):
        next(loader.epoch_batches(5, start_step=7))
    other = next(loader.epoch_batches(6))[0]
    assert not torch.equal(full[0][0], other)
    # augmentation seed matters, partition unchanged
    reseeded = data.WorkerLoader(tiny, partition, batch_size=8, seed=8, augment=True)
    x8, y8 = next(reseeded.epoch_batches(5))
    assert torch.equal(y8, full[0][1]) and not torch.equal(x8, full[0][0])


def test_loader_errors(tiny):
    partition = data.make_partition("iid", tiny.train_y, n_workers=4, seed=2)
    with pytest.raises(ValueError, match="batch_size=51 is larger than each worker's shard of 50"):
        data.WorkerLoader(tiny, partition, batch_size=51)
    with pytest.raises(ValueError, match="do not fit"):
        data.WorkerLoader(tiny, partition, batch_size=5, first_worker=3, num_local_workers=2)
    small = data.make_partition("iid", torch.zeros(100, dtype=torch.long), n_workers=4)
    with pytest.raises(ValueError, match="covers 100 samples but the training set has 203"):
        data.WorkerLoader(tiny, small, batch_size=5)


def test_loader_augmented_samples_are_windows_of_padded_images(tiny):
    partition = data.make_partition("iid", tiny.train_y, n_workers=4, seed=2)
    loader = data.WorkerLoader(tiny, partition, batch_size=8, seed=7, augment=True)
    x, _ = next(loader.epoch_batches(0))
    raw = torch.round((x * 0.2887 + 0.5) * 255).to(torch.uint8)  # undo normalization
    source = tiny.train_x[partition.worker_indices(0)[:, :8]]
    for worker, sample in [(0, 0), (3, 5), (1, 7)]:
        padded = torch.nn.functional.pad(source[worker, sample], (4, 4, 4, 4))
        windows = [
            (dy, dx, flip)
            for dy in range(9) for dx in range(9) for flip in (False, True)
            if torch.equal(raw[worker, sample], (lambda w: w.flip(-1) if flip else w)(padded[:, dy:dy + 10, dx:dx + 10]))
        ]
        assert windows, "augmented sample is not a (flipped) window of the padded image"
        offsets, flips = draw_crop_flip(7, 0, 4, loader.num_batches_per_epoch, 8)
        dy, dx = offsets[worker, 0, sample].tolist()
        assert (dy, dx, bool(flips[worker, 0, sample])) in windows


def test_random_crop_flip_by_hand():
    images = torch.arange(2 * 2 * 5 * 6, dtype=torch.uint8).view(2, 2, 5, 6) + 1  # no zeros inside
    offsets = torch.tensor([[0, 3], [2, 1]])
    flips = torch.tensor([False, True])
    out = random_crop_flip(images, offsets, flips, padding=2)
    assert out.shape == images.shape and out.dtype == torch.uint8
    for n in range(2):
        padded = np.zeros((2, 9, 10), dtype=np.uint8)
        padded[:, 2:7, 2:8] = images[n].numpy()
        for c in range(2):
            for i in range(5):
                for j in range(6):
                    jj = 5 - j if flips[n] else j
                    assert out[n, c, i, j].item() == padded[c, offsets[n, 0] + i, offsets[n, 1] + jj]
    # sample 0 at row offset 0 shows padding in its top two rows, real pixels below
    assert out[0, :, :2].eq(0).all() and out[0, :, 2:, :4].ne(0).all()
    centre = random_crop_flip(images, torch.full((2, 2), 2), torch.tensor([False, True]), padding=2)
    assert torch.equal(centre[0], images[0]) and torch.equal(centre[1], images[1].flip(-1))


def test_augmentation_draws():
    offsets, flips = draw_crop_flip(seed=0, epoch=0, n_workers=4, num_steps=50, batch_size=64)
    assert offsets.shape == (4, 50, 64, 2) and flips.shape == (4, 50, 64)
    assert 0.47 < flips.float().mean().item() < 0.53
    assert torch.equal(torch.unique(offsets), torch.arange(9))
    counts = torch.bincount(offsets.flatten(), minlength=9).float() / offsets.numel()
    assert (counts - 1 / 9).abs().max() < 0.01
    again, _ = draw_crop_flip(seed=0, epoch=0, n_workers=4, num_steps=50, batch_size=64)
    later, _ = draw_crop_flip(seed=0, epoch=1, n_workers=4, num_steps=50, batch_size=64)
    assert torch.equal(offsets, again) and not torch.equal(offsets, later)


# ---------------------------------------------------------------- language model
def lm_dataset(num_tokens):
    tokens = torch.arange(num_tokens)
    return data.Dataset(name="lm", train_x=tokens, train_y=None, test_x=tokens[:50], test_y=None,
                        num_classes=num_tokens, is_language_model=True)


def test_language_model_loader():
    ds = lm_dataset(203)  # 4 workers x 50 tokens (+3 dropped); 2 rows of 25; windows of 4
    loader = data.LanguageModelLoader(ds, n_workers=4, batch_size=2, bptt=4)
    assert loader.tokens_per_row == 25 and loader.num_batches_per_epoch == 6
    batches = list(loader.epoch_batches(0))
    assert len(batches) == 6
    for step, (inputs, targets) in enumerate(batches):
        assert inputs.shape == targets.shape == (4, 2, 4)
        for w in range(4):
            for b in range(2):
                start = w * 50 + b * 25 + step * 4
                assert inputs[w, b].tolist() == list(range(start, start + 4))
                assert targets[w, b].tolist() == list(range(start + 1, start + 5))
    for w in range(4):
        alone = data.LanguageModelLoader(ds, n_workers=4, batch_size=2, first_worker=w, num_local_workers=1, bptt=4)
        for (i_all, t_all), (i_w, t_w) in zip(batches, alone.epoch_batches(0), strict=True):
            assert torch.equal(i_all[w], i_w[0]) and torch.equal(t_all[w], t_w[0])
    resumed = list(loader.epoch_batches(3, start_step=5))
    assert len(resumed) == 1 and torch.equal(resumed[0][0], batches[5][0])
    with pytest.raises(ValueError, match="not one window of bptt=30"):
        data.LanguageModelLoader(ds, n_workers=4, batch_size=2, bptt=30)


# ---------------------------------------------------------------- evaluation batches
def test_test_batches(tiny):
    batches = list(data.test_batches(tiny, 4))
    assert [x.shape[0] for x, _ in batches] == [4, 4, 1]
    assert torch.equal(torch.cat([y for _, y in batches]), tiny.test_y)
    assert torch.allclose(torch.cat([x for x, _ in batches]), tiny.normalize(tiny.test_x))
    assert torch.allclose(batches[0][0], (tiny.test_x[:4].float() / 255 - 0.5) / 0.2887, atol=1e-5)
    with pytest.raises(ValueError, match="unknown split 'valid'"):
        next(data.test_batches(tiny, 4, split="valid"))
    lm = lm_dataset(203)  # test split: tokens 0..49 in 2 rows of 25, windows of 10
    windows = list(data.test_batches(lm, 2, bptt=10))
    assert [w[0].shape for w in windows] == [(2, 10), (2, 10), (2, 4)]
    assert windows[2][0][1].tolist() == [45, 46, 47, 48] and windows[2][1][1].tolist() == [46, 47, 48, 49]
