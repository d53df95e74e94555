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
torchvision is never imported, except lazily by `load("cifar10", download=True)`.
"""

import os
from collections.abc import Iterator

import torch

from . import cifar10, fashion_mnist, synthetic, wikitext2
from .augment import draw_crop_flip, random_crop_flip
from .dataset import Dataset
from .loader import LanguageModelLoader, WorkerLoader
from .partition import (
    SCHEMES,
    DirichletPartition,
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
    "TASKS", "SCHEMES", "Dataset", "load", "files", "check_data_dir", "test_batches", "WorkerLoader", "LanguageModelLoader",
    "Partition", "IIDPartition", "SortedPartition", "DirichletPartition", "make_partition",
    "random_crop_flip", "draw_crop_flip",
]


def check_data_dir(task: str, data_dir: str | None, download: bool = False) -> None:
    """Fail now where ``load(task, data_dir, download=download)`` would fail before
    reading a file: ValueError for an unknown task, FileNotFoundError for a
    ``data_dir`` that is given but is not a folder. Reads nothing.

    None means the task's default places; "synthetic" ignores data_dir, and
    cifar10 with ``download`` creates it.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if task == "synthetic" or (task == "cifar10" and download):
        return
    reader = {"fashion_mnist": fashion_mnist, "cifar10": cifar10, "wikitext2": wikitext2}[task]
    require_folder(data_dir, reader.DEFAULT_DIR, reader.HOW_TO_GET)


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
    (cifar10, needs torchvision), or ``num_train, num_test, in_channels,
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
