"""Data sets, partitions over workers, and device-resident loaders.

    dataset = data.load("cifar10", data_dir="~/data", device="cuda")
    partition = data.make_partition("iid", dataset.train_y, n_workers=8, seed=0)
    loader = data.WorkerLoader(dataset, partition, batch_size=128,
                               first_worker=process_index * L, num_local_workers=L, seed=0)
    for step, (x, y) in enumerate(loader.epoch_batches(epoch, start_step)):
        ...  # x: float32 [L, 128, 3, 32, 32], y: int64 [L, 128]
    for x, y in data.test_batches(dataset, 1000): ...

Before any work, ``data.check_data_dir(task, data_dir)`` refuses a data_dir
that is not a folder (None means the default places), reading nothing.

Downloads (no torchvision): ``data.download("cifar10", data_dir)`` fetches CIFAR-10's
archive, checks its MD5 and extracts it, unless the files are there;
``data.download("wikitext2", data_dir, url, sha256)`` does the same with an archive of
WikiText-2's files the user names (its original one is no longer served). How a
download is made safe to interrupt and to run from every process of a launch:
downloads.py.

Language model:
    dataset = data.load("wikitext2", data_dir)
    loader = data.LanguageModelLoader(dataset, n_workers=16, batch_size=64, bptt=30)

| task          | images (uint8)          | normalization mean / std          |
| ------------- | ----------------------- | --------------------------------- |
| fashion_mnist | 60k / 10k x 1 x 28 x 28 | 0.2860 / 0.3530                   |
| cifar10       | 50k / 10k x 3 x 32 x 32 | (.4914 .4822 .4465) / (.2023 .1994 .2010) |
| synthetic     | any (default CIFAR's)   | 0.5 / 0.2887 (uniform pixels)     |
| wikitext2     | token ids               | -                                 |

Everything random is a pure function of (seed, epoch, step) drawn for all workers
and sliced (see `data.seeding`): the same seed gives worker i the same batches in
any process layout, and a resumed run needs only epoch and step.
torchvision is never imported.
"""

import os
import re
import urllib.parse
from collections.abc import Iterator

import torch

from . import cifar10, fashion_mnist, synthetic, wikitext2
from .augment import draw_crop_flip, random_crop_flip
from .dataset import Dataset
from .loader import LanguageModelLoader, WorkerLoader
from .partition import (
    SCHEMES,
    DirichletPartition,
    PerClassDirichletPartition,
    IIDPartition,
    Partition,
    SortedPartition,
    make_partition,
)
from .paths import require_folder

TASKS = ("fashion_mnist", "cifar10", "wikitext2", "synthetic")

_OPTIONS = {
    "fashion_mnist": (),
    "cifar10": ("download",),
    "wikitext2": (),
    "synthetic": ("num_train", "num_test", "in_channels", "image_size", "num_classes", "seed"),
}

__all__ = [
    "TASKS", "SCHEMES", "Dataset", "load", "download", "check_download", "files", "check_data_dir", "test_batches",
    "WorkerLoader", "LanguageModelLoader",
    "Partition", "IIDPartition", "SortedPartition", "DirichletPartition", "PerClassDirichletPartition", "make_partition",
    "random_crop_flip", "draw_crop_flip",
]


DOWNLOADS = ("cifar10", "wikitext2")  # the tasks ``download`` fetches
SHA256 = re.compile(r"[0-9a-f]{64}")


def check_data_dir(task: str, data_dir: str | None, download: bool = False) -> None:
    """Fail now where ``load(task, data_dir)`` would fail before reading a file (after
    ``download``, when it is asked for): ValueError for an unknown task,
    FileNotFoundError for a ``data_dir`` that is given but is not a folder. Reads nothing.

    None means the task's default places; "synthetic" ignores data_dir, and a download
    creates it.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if task == "synthetic" or (task in DOWNLOADS and download):
        return
    reader = {"fashion_mnist": fashion_mnist, "cifar10": cifar10, "wikitext2": wikitext2}[task]
    require_folder(data_dir, reader.DEFAULT_DIR, reader.HOW_TO_GET)


def check_download(task: str, download: bool, url: str | None, sha256: str | None) -> None:
    """ValueError naming the key, before any work, for download settings that cannot work:
    a download of a task that has none, WikiText-2 without ``url`` and ``sha256`` (CIFAR-10
    has its own URL and MD5; a mirror of the same archive passes that MD5), a URL that is
    not http(s), a SHA-256 that is not 64 hex digits, or either of them without
    ``download``."""
    if not download:
        if url is not None or sha256 is not None:
            raise ValueError("download_url and download_sha256 are read with download=true only; add it or drop them")
        return
    if task not in DOWNLOADS:
        raise ValueError(f"download=true fetches {' or '.join(DOWNLOADS)}; task={task} has nothing to download "
                         f"(fashion_mnist comes with Debian's dataset-fashion-mnist package)")
    if task == "wikitext2" and (url is None or sha256 is None):
        raise ValueError("download=true for task=wikitext2 needs download_url=<URL of an archive of wiki.train.tokens, "
                         "wiki.valid.tokens, wiki.test.tokens> and download_sha256=<its SHA-256>: the original archive "
                         "is no longer served")
    if url is not None and not (isinstance(url, str) and urllib.parse.urlparse(url).scheme in ("http", "https")):
        raise ValueError(f"download_url must be an http:// or https:// URL, got {url!r}")
    if sha256 is not None and not (isinstance(sha256, str) and SHA256.fullmatch(sha256.lower())):
        raise ValueError(f"download_sha256 must be a SHA-256 digest, 64 hex digits (quoted where YAML would read a "
                         f"number: download_sha256=\"'...'\"), got {sha256!r}")


def download(task: str, data_dir: str | None = None, url: str | None = None, sha256: str | None = None) -> None:
    """Fetch the data set of ``task`` into ``data_dir`` unless its files are there: CIFAR-10's
    own archive (or, with ``url``, a mirror's), WikiText-2 from ``url``; checked against
    ``sha256`` when given, CIFAR-10's MD5 otherwise (``check_download``'s ValueError for
    settings that cannot work; downloads.py for the rest)."""
    check_download(task, True, url, sha256)
    sha256 = None if sha256 is None else sha256.lower()
    if task == "cifar10":
        cifar10.fetch(data_dir, url, sha256)
    else:
        wikitext2.fetch(data_dir, url, sha256)


def files(task: str, data_dir: str | None = None) -> dict[str, str]:
    """The files ``load(task, data_dir)`` reads, each under a label that does not depend on
    where they are (``"fashion_mnist file t10k-images-idx3-ubyte.gz"``): a run's fingerprint
    hashes them, so data_dir may move but not to other data. None for "synthetic"; none
    for CIFAR-10 files not found (``load`` says what is missing); FileNotFoundError as
    ``load``'s for the other tasks."""
    if task == "fashion_mnist":
        paths = list(fashion_mnist.find_files(data_dir).values())
    elif task == "cifar10":
        folder = cifar10.find_folder(data_dir)
        paths = [] if folder is None else [os.path.join(folder, name) for name in cifar10.TRAIN_FILES + cifar10.TEST_FILES]
    elif task == "wikitext2":
        folder = wikitext2.find_folder(data_dir)
        paths = [os.path.join(folder, f"wiki.{split}.tokens") for split in wikitext2.SPLITS]
    else:
        paths = []
    return {f"{task} file {os.path.basename(path)}": path for path in paths}


def load(task: str, data_dir: str | None = None, device: str | torch.device = "cpu", **options) -> Dataset:
    """Load a whole data set onto ``device``.

    task: one of TASKS. data_dir: where the files are (see each reader; None:
    its default places; one that is not a folder is an error, see
    ``check_data_dir``; ignored by "synthetic"). options: ``download``
    (cifar10: ``download("cifar10", data_dir)`` first), or ``num_train, num_test, in_channels,
    image_size, num_classes, seed`` (synthetic).
    """
    check_data_dir(task, data_dir, options.get("download", False))
    unknown = sorted(set(options) - set(_OPTIONS[task]))
    if unknown:
        allowed = ", ".join(_OPTIONS[task]) or "none"
        raise ValueError(f"unknown option(s) {unknown} for task {task!r} (allowed: {allowed})")
    device = torch.device(device)

    if task == "wikitext2":
        train, valid, test, vocab = wikitext2.load_wikitext2(data_dir)
        return Dataset(
            name=task, train_x=train.to(device), train_y=None, test_x=test.to(device), test_y=None,
            valid_x=valid.to(device), num_classes=len(vocab), vocab=vocab, is_language_model=True,
        )
    if task == "fashion_mnist":
        tensors = fashion_mnist.load_fashion_mnist(data_dir)
        mean, std, augment, num_classes = fashion_mnist.MEAN, fashion_mnist.STD, False, fashion_mnist.NUM_CLASSES
    elif task == "cifar10":
        tensors = cifar10.load_cifar10(data_dir, download=options.get("download", False))
        mean, std, augment, num_classes = cifar10.MEAN, cifar10.STD, True, cifar10.NUM_CLASSES
    else:
        tensors = synthetic.make_synthetic(**options)
        channels = tensors[0].shape[1]
        mean, std = (synthetic.MEAN_VALUE,) * channels, (synthetic.STD_VALUE,) * channels
        augment, num_classes = False, options.get("num_classes", 10)
    train_x, train_y, test_x, test_y = (t.to(device) for t in tensors)
    return Dataset(
        name=task, train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y,
        num_classes=num_classes, in_channels=train_x.shape[1], image_size=train_x.shape[2],
        mean=tuple(mean), std=tuple(std), default_augment=augment,
    )


def test_batches(
    dataset: Dataset, batch_size: int, split: str = "test", bptt: int = 30
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Evaluation batches over a whole split, in order, on the data set's device.

    Images (split "test" or "train"): ``(x float32 [b, C, H, W] normalized, y [b])``
    with ``b = batch_size`` except a smaller last batch; every sample once.
    Language model (split "test", "valid" or "train"): the stream batchified into
    ``batch_size`` rows of ``T // batch_size`` tokens; yields ``(inputs, targets)``
    ``[batch_size, l]`` windows with ``l = bptt`` except a shorter last one, so
    every token but the last of each row is predicted once.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    splits = ("train", "valid", "test") if dataset.is_language_model else ("train", "test")
    if split not in splits:
        raise ValueError(f"unknown split {split!r} for {dataset.name}; choose one of {', '.join(splits)}")
    x = getattr(dataset, f"{split}_x")
    if dataset.is_language_model:
        per_row = x.numel() // batch_size
        if per_row < 2:
            raise ValueError(f"{split} split of {x.numel()} tokens is too short for {batch_size} rows")
        rows = x[: batch_size * per_row].view(batch_size, per_row)
        for i in range(0, per_row - 1, bptt):
            length = min(bptt, per_row - 1 - i)
            yield rows[:, i : i + length], rows[:, i + 1 : i + 1 + length]
        return
    y = getattr(dataset, f"{split}_y")
    for start in range(0, x.shape[0], batch_size):
        yield dataset.normalize(x[start : start + batch_size]), y[start : start + batch_size]


test_batches.__test__ = False  # not a pytest test, even when imported into a test module
