"""CIFAR-10 from the python version of the data set (``cifar-10-batches-py/``).

The folder holds ``data_batch_1`` .. ``data_batch_5`` (training) and
``test_batch``: each a pickled dict with ``b"data"`` (10000 x 3072 uint8, one row
per image, channel-major: 1024 red, 1024 green, 1024 blue values, each a 32 x 32
row-major plane), ``b"labels"`` (10000 ints in 0..9), ``b"batch_label"`` and
``b"filenames"`` (bytes), pickled by Python 2 with protocol 2.

The unpickler builds only dicts, lists, ints, bytes and numpy arrays: a file that
asks for anything else (which is how a pickle runs code) is refused, not run.
`fetch` downloads the archive from the data set's home page (or a mirror) and
extracts it (downloads.py beside this file); no torchvision.
"""

import os
import pickle

import numpy as np
import torch

from .downloads import fetch_and_extract

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
DEFAULT_DIR = "./data"

# The constants of the PowerGossip code (epfml/powergossip, tasks/cifar.py);
# pixels scaled to [0, 1].
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2023, 0.1994, 0.2010)
NUM_CLASSES = 10

# The python version's archive and its MD5, as the data set's home page
# (https://www.cs.toronto.edu/~kriz/cifar.html) and torchvision give them.
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"

HOW_TO_GET = (
    "Pass download=true to fetch the python version (cifar-10-python.tar.gz, from "
    "https://www.cs.toronto.edu/~kriz/cifar.html) into data_dir, or get it yourself and "
    f"extract it into data_dir (giving data_dir/{FOLDER}/)."
)


# The only globals a batch refers to: numpy's array reconstruction, spelled
# numpy.core by numpy 1 (the distributed files) and numpy._core by numpy 2.
# Dicts, lists, ints and Python 2 strings need none.
ALLOWED_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
})


class _Refused(Exception):
    """A global outside ALLOWED_GLOBALS (its dotted name), found while unpickling."""


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED_GLOBALS:
            raise _Refused(f"{module}.{name}")
        return super().find_class(module, name)


def _candidates(data_dir: str) -> list[str]:
    return [os.path.join(data_dir, FOLDER), data_dir]


def find_folder(data_dir: str | None = None) -> str | None:
    """The folder holding the batches: ``data_dir/cifar-10-batches-py`` or ``data_dir``
    itself (default data_dir: ./data); None if neither holds all six files."""
    data_dir = DEFAULT_DIR if data_dir is None else data_dir
    for folder in _candidates(data_dir):
        if all(os.path.isfile(os.path.join(folder, f)) for f in TRAIN_FILES + TEST_FILES):
            return folder
    return None


def read_batch(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One pickled batch -> (uint8 images [n, 3, 32, 32], int64 labels [n])."""
    try:
        with open(path, "rb") as f:
            batch = _BatchUnpickler(f, encoding="bytes").load()  # Python 2 str -> bytes
    except _Refused as refused:
        raise ValueError(
            f"refusing to load {path}: it asks for {refused}, which a CIFAR-10 batch never "
            f"contains. {HOW_TO_GET}"
        ) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
        raise ValueError(f"{path}: not a readable CIFAR-10 pickle ({error!r}). {HOW_TO_GET}") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f'{path}: expected a dict with b"data" and b"labels". {HOW_TO_GET}')
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f'{path}: b"data" should be uint8 [n, 3072], got {data.dtype} {list(data.shape)}'
        )
    if labels.ndim != 1 or len(labels) != len(data):
        raise ValueError(f"{path}: {len(data)} images but {labels.size} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"{path}: labels outside 0..{NUM_CLASSES - 1}")
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels.astype(np.int64))


def fetch(data_dir: str | None = None, url: str | None = None, sha256: str | None = None) -> None:
    """Fetch and extract the archive into ``data_dir`` (default ``./data``) unless the
    files are there: from the data set's home page, or from ``url`` (a mirror); checked
    against ``sha256`` when given, else against the archive's MD5."""
    checksum, name = (("sha256", sha256), "download_sha256") if sha256 is not None else (("md5", MD5), "CIFAR-10's MD5")
    fetch_and_extract(URL if url is None else url, DEFAULT_DIR if data_dir is None else data_dir, checksum,
                      lambda folder: find_folder(folder) is not None, name)


def load_cifar10(data_dir: str | None = None, download: bool = False):
    """Return ``(train_x, train_y, test_x, test_y)`` on CPU: uint8 images
    ``[N, 3, 32, 32]`` (50,000 / 10,000), int64 labels.

    ``data_dir`` may be the folder ``cifar-10-batches-py`` itself or its parent
    (default ``./data``). If the files are missing and ``download`` is True,
    ``fetch`` downloads them into ``data_dir``; otherwise FileNotFoundError.
    """
    data_dir = DEFAULT_DIR if data_dir is None else data_dir
    if download:
        fetch(data_dir)
    folder = find_folder(data_dir)
    if folder is None:
        looked = ", ".join(_candidates(data_dir))
        raise FileNotFoundError(
            f"CIFAR-10 not found: looked for {', '.join(TRAIN_FILES + TEST_FILES)} in {looked}. "
            + HOW_TO_GET
        )
    out = []
    for names in (TRAIN_FILES, TEST_FILES):
        parts = [read_batch(os.path.join(folder, name)) for name in names]
        out += [torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])]
    return tuple(out)
