"""Fashion-MNIST from IDX files (the format of the original MNIST distribution).

Debian's ``dataset-fashion-mnist`` package installs the four files in
``/usr/share/datasets/fashion-mnist``::

    train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz
    t10k-images-idx3-ubyte.gz   t10k-labels-idx1-ubyte.gz

IDX layout: a big-endian int32 magic number ``0x0000 TT NN`` (TT = 0x08 for
unsigned bytes, NN = number of dimensions: 2051 for image files, 2049 for label
files), then NN big-endian int32 sizes, then the values. Files may be gzipped or
not (detected from the content, not the name).
"""

import gzip
import math
import os
import struct
import zlib

import numpy as np
import torch

from .paths import require_folder

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"

IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions (count, rows, cols)
LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension (count)

# Per-channel statistics of the 60,000 training images, pixels scaled to [0, 1].
MEAN = (0.2860,)
STD = (0.3530,)
NUM_CLASSES = 10

FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}

HOW_TO_GET = (
    "Install it with `apt-get install dataset-fashion-mnist` (puts the files in "
    f"{DEFAULT_DIR}), or pass data_dir=<folder with the four IDX files "
    f"{', '.join(name + '[.gz]' for name in FILES.values())}>."
)


GZIP_MAGIC = b"\x1f\x8b"
DEFLATE_MAX_RATIO = 1032  # deflate cannot expand a byte of a gzip file into more than this many


def read_idx(path: str, expected_magic: int | None = None) -> torch.Tensor:
    """Read one IDX file of unsigned bytes (gzipped or raw) into a uint8 tensor.

    The header is read first and bounds everything after it: a file whose magic number
    or sizes are wrong, or whose sizes claim more than the file could hold (a raw file: its
    size; a gzipped one: DEFLATE_MAX_RATIO times its size), is refused before its data is
    read, and no more than the header's count of values is ever decompressed (a gzip bomb
    costs what its header says, at most). Raises ValueError (naming the file) when the
    content is not gzip-readable, the magic number is wrong or not unsigned-byte IDX, or
    the data is truncated or has trailing bytes.
    """
    with open(path, "rb") as raw:
        file_size = os.fstat(raw.fileno()).st_size
        gzipped = raw.read(2) == GZIP_MAGIC
        raw.seek(0)
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if gzipped else raw
        try:
            return _read_idx_stream(path, stream, expected_magic, file_size, gzipped)
        except (OSError, EOFError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
            raise ValueError(f"{path}: corrupt gzip data ({error}). {HOW_TO_GET}") from None


def _read_idx_stream(path, stream, expected_magic, file_size, gzipped) -> torch.Tensor:
    start = stream.read(4)
    if len(start) < 4:
        raise ValueError(f"{path}: truncated IDX file ({len(start)} bytes, no header). {HOW_TO_GET}")
    (magic,) = struct.unpack(">i", start)
    if expected_magic is not None and magic != expected_magic:
        raise ValueError(
            f"{path}: bad IDX magic number {magic}, expected {expected_magic}. {HOW_TO_GET}"
        )
    if magic >> 8 != 0x08:
        raise ValueError(f"{path}: bad IDX magic number {magic}: not an unsigned-byte IDX file. {HOW_TO_GET}")
    ndim = magic & 0xFF
    sizes = stream.read(4 * ndim)
    header = 4 + len(sizes)
    if ndim == 0 or len(sizes) < 4 * ndim:
        raise ValueError(f"{path}: truncated IDX header ({header} bytes). {HOW_TO_GET}")
    shape = struct.unpack(f">{ndim}i", sizes)
    size = math.prod(shape)
    capacity = DEFLATE_MAX_RATIO * file_size if gzipped else file_size - header
    if min(shape) < 0:
        raise ValueError(f"{path}: bad IDX header: sizes {shape} must not be negative. {HOW_TO_GET}")
    if size > capacity:
        holds = f"a gzip file of {file_size} bytes holds at most {capacity}" if gzipped else f"file holds {capacity}"
        raise ValueError(f"{path}: truncated IDX data: header says {shape} = {size} values, {holds}. {HOW_TO_GET}")
    values = stream.read(size)  # never more than the header says
    if len(values) < size:
        raise ValueError(
            f"{path}: truncated IDX data: header says {shape} = {size} values, file holds {len(values)}. {HOW_TO_GET}"
        )
    if stream.read(1):
        raise ValueError(
            f"{path}: trailing bytes in IDX data: header says {shape} = {size} values, file holds more. {HOW_TO_GET}"
        )
    return torch.from_numpy(np.frombuffer(values, dtype=np.uint8).reshape(shape).copy())


def find_files(data_dir: str | None = None) -> dict[tuple[str, str], str]:
    """Paths of the four IDX files: the first folder holding all four, looking in
    ``data_dir`` and ``data_dir/fashion-mnist`` when it is given (and nowhere else: a
    user's folder is never swapped for another copy), in DEFAULT_DIR when it is not.

    Raises FileNotFoundError naming every folder looked in and what was missing,
    or, before looking, if ``data_dir`` is given but is not a folder.
    """
    require_folder(data_dir, DEFAULT_DIR, HOW_TO_GET)
    folders = [DEFAULT_DIR] if data_dir is None else [data_dir, os.path.join(data_dir, "fashion-mnist")]
    report = []
    for folder in folders:
        found, missing = {}, []
        for key, name in FILES.items():
            for candidate in (name + ".gz", name):
                if os.path.isfile(os.path.join(folder, candidate)):
                    found[key] = os.path.join(folder, candidate)
                    break
            else:
                missing.append(name + "[.gz]")
        if not missing:
            return found
        status = "does not exist" if not os.path.isdir(folder) else f"lacks {', '.join(missing)}"
        report.append(f"{folder} {status}")
    raise FileNotFoundError(f"Fashion-MNIST not found: {'; '.join(report)}. {HOW_TO_GET}")


def load_fashion_mnist(data_dir: str | None = None):
    """Return ``(train_x, train_y, test_x, test_y)`` on CPU.

    Images are uint8 ``[N, 1, 28, 28]`` (60,000 train / 10,000 test for the real
    data), labels int64 ``[N]`` in 0..9.
    """
    paths = find_files(data_dir)
    out = []
    for split in ("train", "test"):
        images = read_idx(paths[(split, "images")], IMAGES_MAGIC)
        labels = read_idx(paths[(split, "labels")], LABELS_MAGIC)
        if images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"Fashion-MNIST {split} split: {paths[(split, 'images')]} holds {images.shape[0]} "
                f"images but {paths[(split, 'labels')]} holds {labels.shape[0]} labels. {HOW_TO_GET}"
            )
        if labels.numel() and int(labels.max()) >= NUM_CLASSES:
            raise ValueError(
                f"{paths[(split, 'labels')]}: label {int(labels.max())} outside 0..{NUM_CLASSES - 1}. {HOW_TO_GET}"
            )
        out += [images.unsqueeze(1), labels.long()]
    return tuple(out)
