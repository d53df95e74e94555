"""Counter-based seeding: every random draw is a pure function of its keys.

All randomness in `data/` (partitions, per-epoch shuffles, augmentation) comes
from a fresh CPU generator built from ``(seed, stream, epoch, ...)``. Nothing is
carried from one epoch to the next, so the only state a checkpoint needs to
reproduce the data is ``(seed, epoch, step)``; and since every draw is made for
all ``n_workers`` at once and then sliced, worker i sees the same data whether
one process hosts all workers or each worker has a process of its own.

Keys go through numpy's ``SeedSequence`` (a hash of the whole key tuple), so
different tuples give unrelated streams; ``(1, 12)`` and ``(11, 2)`` differ.
"""

import numpy as np
import torch

# One stream id per purpose so two purposes never share a generator.
STREAM_IID = 1
STREAM_SORTED = 2
STREAM_DIRICHLET_PRIOR = 3
STREAM_DIRICHLET_ASSIGN = 4
STREAM_WITHIN_SHARD = 5
STREAM_AUGMENT = 6
STREAM_SYNTHETIC = 7
STREAM_PER_CLASS = 8
STREAM_CYCLE = 9


def _entropy(seed: int, keys: tuple[int, ...]) -> list[int]:
    values = (seed, *keys)
    for value in values:
        if int(value) != value or value < 0:
            raise ValueError(f"seeds and stream keys must be non-negative integers, got {values}")
    return [int(v) for v in values]


def seed_from(seed: int, *keys: int) -> int:
    """A 63-bit integer seed, a hash of ``(seed, *keys)``."""
    state = np.random.SeedSequence(_entropy(seed, keys)).generate_state(2, dtype=np.uint32)
    return ((int(state[0]) << 32) | int(state[1])) & ((1 << 63) - 1)


def torch_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded by ``(seed, *keys)`` (draw on CPU, then move)."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed_from(seed, *keys))
    return generator


def numpy_generator(seed: int, *keys: int) -> np.random.Generator:
    """A numpy ``Generator`` seeded by ``(seed, *keys)``."""
    return np.random.default_rng(np.random.SeedSequence(_entropy(seed, keys)))
