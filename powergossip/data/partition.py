"""Partitions of the training set over ``n_workers`` workers.

Every scheme gives every worker a shard of exactly ``shard_size = N // n_workers``
samples (the remainder is dropped), so per-worker batches stack to ``[L, B, ...]``.
``worker_indices(epoch)`` returns a LongTensor ``[n_workers, shard_size]`` on CPU
for ALL workers, in the order the worker visits them during that epoch. It is a
pure function of ``(seed, epoch)``: no generator state survives between calls,
so resuming needs nothing but the epoch, and slicing rows gives the same data to
worker i under any process layout. Within an epoch, no sample is given to two
workers (nor twice to one).

Schemes (``make_partition(scheme, ...)``):

- ``"iid"`` (default; the paper's setup): each epoch a fresh random permutation
  of all N samples; worker w takes positions ``[w * shard_size, (w+1) * shard_size)``.
  Which N mod n_workers samples are left out changes every epoch.
- ``"sorted"`` (the paper's ``use_decentralized_data``): the samples are sorted
  by label (stable, ties by index); worker w's base shard is the w-th block of
  ``shard_size`` in that order (the last N mod n_workers of the order, from the
  highest label, are never used). Each epoch, ``k = round(shuffled_ratio * shard_size)``
  positions of every shard are chosen at random, the ``n_workers * k`` samples at
  those positions are pooled, randomly permuted and dealt back into the same
  positions; then each shard's order is shuffled. ``shuffled_ratio = 0`` keeps
  label-sorted shards (only the order within a shard changes); ``1`` is an iid
  split of the used samples, redrawn each epoch. (The original code pooled a
  fraction of the whole sorted array once, with a fixed seed; here the pooled
  positions and their permutation are redrawn every epoch.)
- ``"dirichlet"``: per-worker class proportions ``p_w ~ Dirichlet(alpha * 1_K)``
  drawn once from the seed (K = max label + 1). Assignment, once: the workers are
  visited in a random order (from the seed); worker w asks for
  ``round(p_w * shard_size)`` samples of each class (largest-remainder rounding to
  sum exactly to shard_size), clipped to what is left of each class; any shortfall
  is filled from the classes that still have samples, in proportion to ``p_w``
  restricted to them (or to what is left, if ``p_w`` is zero on all of them).
  This always succeeds because at least ``shard_size`` samples remain for every
  worker still to be served. Which samples of a class a worker gets is a random
  choice (a per-class permutation from the seed, consumed in chunks), so no
  sample goes to two workers. The shards are fixed; only their order is
  reshuffled every epoch. Large alpha -> near-uniform class mix; small alpha ->
  each worker dominated by few classes (workers served last take what is left).
"""

import math

import numpy as np
import torch

from .seeding import (
    STREAM_DIRICHLET_ASSIGN,
    STREAM_DIRICHLET_PRIOR,
    STREAM_IID,
    STREAM_SORTED,
    STREAM_WITHIN_SHARD,
    numpy_generator,
    torch_generator,
)

SCHEMES = ("iid", "sorted", "dirichlet")


def _shuffle_rows(indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """An independent random permutation of every row (float64 keys: no ties in practice)."""
    keys = torch.rand(indices.shape, generator=generator, dtype=torch.float64)
    return indices.gather(1, keys.argsort(dim=1))


class Partition:
    """Base class: ``n_workers`` equal shards of ``shard_size`` out of ``num_samples``."""

    def __init__(self, num_samples: int, n_workers: int, seed: int = 0):
        if int(n_workers) != n_workers or n_workers < 1:
            raise ValueError(f"n_workers must be a positive integer, got {n_workers}")
        if n_workers > num_samples:
            raise ValueError(
                f"n_workers={n_workers} is more than the {num_samples} training samples: "
                "every worker needs at least one"
            )
        if int(seed) != seed or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed}")
        self.num_samples = int(num_samples)
        self.n_workers = int(n_workers)
        self.shard_size = self.num_samples // self.n_workers
        self.seed = int(seed)

    def worker_indices(self, epoch: int) -> torch.Tensor:
        """LongTensor ``[n_workers, shard_size]`` (CPU): row w = worker w's samples for
        ``epoch``, in visiting order. Deterministic given (seed, epoch)."""
        raise NotImplementedError

    def __repr__(self):
        return (f"{type(self).__name__}(num_samples={self.num_samples}, n_workers={self.n_workers}, "
                f"shard_size={self.shard_size}, seed={self.seed})")


class IIDPartition(Partition):
    """Reshuffle everything every epoch and split evenly (see module docstring)."""

    def worker_indices(self, epoch: int) -> torch.Tensor:
        g = torch_generator(self.seed, STREAM_IID, epoch)
        permutation = torch.randperm(self.num_samples, generator=g)
        return permutation[: self.n_workers * self.shard_size].view(self.n_workers, self.shard_size)


def _check_labels(labels: torch.Tensor) -> torch.Tensor:
    labels = torch.as_tensor(labels).cpu()
    if labels.ndim != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be a 1-D integer tensor, got {labels.dtype} {list(labels.shape)}")
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError("labels must be non-negative")
    return labels.long()


class SortedPartition(Partition):
    """Label-sorted shards with a fraction ``shuffled_ratio`` pooled and
    redistributed every epoch (see module docstring)."""

    def __init__(self, labels: torch.Tensor, n_workers: int, shuffled_ratio: float = 0.0, seed: int = 0):
        labels = _check_labels(labels)
        if not 0.0 <= shuffled_ratio <= 1.0:  # also rejects NaN
            raise ValueError(f"shuffled_ratio must be in [0, 1], got {shuffled_ratio}")
        super().__init__(len(labels), n_workers, seed)
        self.shuffled_ratio = float(shuffled_ratio)
        self.num_pooled = int(round(self.shuffled_ratio * self.shard_size))
        order = torch.sort(labels, stable=True).indices
        self._base = order[: self.n_workers * self.shard_size].view(self.n_workers, self.shard_size)

    def worker_indices(self, epoch: int) -> torch.Tensor:
        g = torch_generator(self.seed, STREAM_SORTED, epoch)
        shards = self._base.clone()
        k = self.num_pooled
        if k > 0:
            keys = torch.rand(shards.shape, generator=g, dtype=torch.float64)
            positions = keys.argsort(dim=1)[:, :k]  # k random positions per shard
            pooled = shards.gather(1, positions).reshape(-1)
            pooled = pooled[torch.randperm(pooled.numel(), generator=g)]
            shards.scatter_(1, positions, pooled.view(self.n_workers, k))
        return _shuffle_rows(shards, g)


class DirichletPartition(Partition):
    """Fixed shards with Dirichlet(alpha) class proportions per worker, exact
    equal sizes (see module docstring for the assignment scheme)."""

    def __init__(self, labels: torch.Tensor, n_workers: int, alpha: float = 1.0, seed: int = 0):
        labels = _check_labels(labels)
        if not (alpha > 0 and math.isfinite(alpha)):
            raise ValueError(f"dirichlet alpha must be a positive finite number, got {alpha}")
        super().__init__(len(labels), n_workers, seed)
        self.alpha = float(alpha)
        labels_np = labels.numpy()
        num_classes = int(labels_np.max()) + 1
        n, s = self.n_workers, self.shard_size

        rng = numpy_generator(self.seed, STREAM_DIRICHLET_PRIOR)
        proportions = rng.dirichlet(np.full(num_classes, self.alpha), size=n)
        proportions = np.nan_to_num(proportions, nan=0.0)
        self.proportions = proportions  # [n_workers, K], the drawn priors

        remaining = np.bincount(labels_np, minlength=num_classes).astype(np.int64)
        counts = np.zeros((n, num_classes), dtype=np.int64)
        for w in rng.permutation(n):
            p = proportions[w]
            want = p * s
            c = np.floor(want).astype(np.int64)
            short = s - int(c.sum())
            if short > 0:  # largest remainder rounding
                c[np.argsort(-(want - c), kind="stable")[:short]] += 1
            c = np.minimum(c, remaining)
            deficit = s - int(c.sum())
            while deficit > 0:
                available = remaining - c
                weights = np.where(available > 0, p, 0.0)
                if weights.sum() <= 0:
                    weights = available.astype(np.float64)
                share = np.minimum(np.floor(deficit * weights / weights.sum()).astype(np.int64), available)
                if share.sum() == 0:
                    share[int(np.argmax(weights))] = 1
                c += share
                deficit -= int(share.sum())
            remaining -= c
            counts[w] = c
        self.class_counts = counts  # [n_workers, K] samples of each class per worker

        assign = numpy_generator(self.seed, STREAM_DIRICHLET_ASSIGN)
        shards = [[] for _ in range(n)]
        for k in range(num_classes):
            members = assign.permutation(np.flatnonzero(labels_np == k))
            start = 0
            for w in range(n):
                shards[w].append(members[start : start + counts[w, k]])
                start += counts[w, k]
        self._base = torch.from_numpy(np.stack([np.concatenate(parts) for parts in shards])).long()

    def worker_indices(self, epoch: int) -> torch.Tensor:
        return _shuffle_rows(self._base, torch_generator(self.seed, STREAM_WITHIN_SHARD, epoch))


def make_partition(
    scheme: str,
    labels: torch.Tensor,
    n_workers: int,
    seed: int = 0,
    shuffled_ratio: float = 0.0,
    alpha: float = 1.0,
) -> Partition:
    """Build a partition by name. ``labels``: the training labels (1-D; for a
    language model, pass any tensor of length N with scheme "iid").
    ``shuffled_ratio`` is used by "sorted" only, ``alpha`` by "dirichlet" only."""
    if scheme == "iid":
        return IIDPartition(len(labels), n_workers, seed)
    if scheme == "sorted":
        return SortedPartition(labels, n_workers, shuffled_ratio, seed)
    if scheme == "dirichlet":
        return DirichletPartition(labels, n_workers, alpha, seed)
    raise ValueError(f"unknown partition scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
