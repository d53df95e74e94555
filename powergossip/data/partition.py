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
- ``"dirichlet_per_class"``: each class's examples divided over the workers in
  Dirichlet(alpha) proportions, so shards have unequal sizes (the split of the
  RelaySGD and quasi-global-momentum experiments; ``PerClassDirichletPartition``).
  Every example is in exactly one shard; a worker's shard is cycled through,
  reshuffled each time it is used up (``epoch_indices``).
"""

import math

import numpy as np
import torch

from .seeding import (
    STREAM_DIRICHLET_ASSIGN,
    STREAM_CYCLE,
    STREAM_DIRICHLET_PRIOR,
    STREAM_IID,
    STREAM_PER_CLASS,
    STREAM_SORTED,
    STREAM_WITHIN_SHARD,
    numpy_generator,
    torch_generator,
)

SCHEMES = ("iid", "sorted", "dirichlet", "dirichlet_per_class")


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

    def epoch_indices(self, epoch: int, num_steps: int, batch_size: int) -> torch.Tensor:
        """LongTensor ``[n_workers, num_steps * batch_size]`` (CPU): the samples each worker
        visits in ``epoch`` of ``num_steps`` batches, in order (here the first of its shard's
        ``worker_indices(epoch)``)."""
        return self.worker_indices(epoch)[:, : num_steps * batch_size]

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


def _largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Integers proportional to ``weights`` (summing to 1) that sum exactly to ``total``."""
    want = weights * total
    counts = np.floor(want).astype(np.int64)
    short = total - int(counts.sum())
    counts[np.argsort(-(want - counts), kind="stable")[:short]] += 1
    return counts


def _dirichlet_labels(labels: torch.Tensor, alpha: float) -> tuple[np.ndarray, int]:
    """A Dirichlet split's labels as numpy and their number of classes; alpha checked."""
    labels = _check_labels(labels)
    if not (alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"dirichlet alpha must be a positive finite number, got {alpha}")
    labels_np = labels.numpy()
    return labels_np, int(labels_np.max()) + 1


class DirichletPartition(Partition):
    """Fixed shards with Dirichlet(alpha) class proportions per worker, exact
    equal sizes (see module docstring for the assignment scheme)."""

    def __init__(self, labels: torch.Tensor, n_workers: int, alpha: float = 1.0, seed: int = 0):
        labels_np, num_classes = _dirichlet_labels(labels, alpha)
        super().__init__(len(labels_np), n_workers, seed)
        self.alpha = float(alpha)
        n, s = self.n_workers, self.shard_size

        rng = numpy_generator(self.seed, STREAM_DIRICHLET_PRIOR)
        proportions = rng.dirichlet(np.full(num_classes, self.alpha), size=n)
        proportions = np.nan_to_num(proportions, nan=0.0)
        self.proportions = proportions  # [n_workers, K], the drawn priors

        remaining = np.bincount(labels_np, minlength=num_classes).astype(np.int64)
        counts = np.zeros((n, num_classes), dtype=np.int64)
        for w in rng.permutation(n):
            p = proportions[w]
            c = np.minimum(_largest_remainder(p, s), remaining)
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


class PerClassDirichletPartition(Partition):
    """Each class divided over the workers in Dirichlet(alpha) proportions: fixed shards of
    unequal sizes holding every example once (Hsu, Qi, Brown 2019's per-class split, as the
    RelaySGD, arXiv 2110.04175, and quasi-global momentum, arXiv 2102.04761, experiments use it).

    The draw, from the seed alone (every layout gets the same shards): the workers form
    ``ceil(n_workers / K)`` consecutive groups of near-equal size, at most K each (K = max
    label + 1), and each class's examples (a random permutation) are dealt to the groups in
    proportion to their sizes, so that with a small alpha, where a class goes almost whole to
    one worker, every worker can still get a class. Within a group, class by class, the
    proportions q ~ Dirichlet(alpha 1_g) over its g workers, with no share for a worker already
    holding its group's mean shard size (unless every worker does; renormalized), are rounded
    to counts by largest remainder. A draw that leaves a worker without an example is redrawn
    (the attempt number is a key of the draw), at most MAX_ATTEMPTS times, then refused.

    ``shard_sizes`` [n_workers], ``class_counts`` [n_workers, K] and ``proportions``
    [K, n_workers] (each class's share of its group's part, zero outside the group) describe
    the draw; ``shard_size`` is the mean shard size (rounded down), which sets the epoch length.
    """

    MAX_ATTEMPTS = 100

    def __init__(self, labels: torch.Tensor, n_workers: int, alpha: float = 1.0, seed: int = 0):
        labels_np, num_classes = _dirichlet_labels(labels, alpha)
        super().__init__(len(labels_np), n_workers, seed)
        self.alpha = float(alpha)
        for attempt in range(self.MAX_ATTEMPTS):
            shards, counts, proportions = self._draw(labels_np, num_classes, attempt)
            if counts.sum(axis=1).min() > 0:
                break
        else:
            raise ValueError(f"dirichlet_alpha={alpha}: {self.MAX_ATTEMPTS} per-class draws over {n_workers} workers "
                             f"each left a worker without an example; use a larger dirichlet_alpha or fewer workers")
        self.class_counts, self.proportions = counts, proportions
        self.shards = [torch.from_numpy(shard).long() for shard in shards]
        self.shard_sizes = torch.tensor([len(shard) for shard in shards])

    def _draw(self, labels_np: np.ndarray, num_classes: int, attempt: int):
        n = self.n_workers
        rng = numpy_generator(self.seed, STREAM_PER_CLASS, attempt)
        num_groups = -(-n // num_classes)
        bounds = [round(g * n / num_groups) for g in range(num_groups + 1)]
        groups = [np.arange(bounds[g], bounds[g + 1]) for g in range(num_groups)]
        sizes = np.array([len(group) for group in groups], dtype=np.float64)
        members = [rng.permutation(np.flatnonzero(labels_np == k)) for k in range(num_classes)]
        shares = np.stack([_largest_remainder(sizes / n, len(members[k])) for k in range(num_classes)])  # [K, groups]
        counts = np.zeros((n, num_classes), dtype=np.int64)
        proportions = np.zeros((num_classes, n))
        parts = [[] for _ in range(n)]
        for g, group in enumerate(groups):
            mean = shares[:, g].sum() / len(group)
            for k in range(num_classes):
                q = rng.dirichlet(np.full(len(group), self.alpha))
                q = np.nan_to_num(q, nan=0.0)
                open_ = counts[group].sum(axis=1) < mean
                if (q * open_).sum() > 0:  # workers at their group's mean take no more
                    q = q * open_
                q = q / q.sum() if q.sum() > 0 else np.full(len(group), 1.0 / len(group))
                proportions[k, group] = q
                taken = _largest_remainder(q, int(shares[k, g]))
                start = int(shares[k, :g].sum())
                for w, c in zip(group, taken):
                    parts[w].append(members[k][start : start + c])
                    start += c
                counts[group, k] = taken
        return [np.concatenate(p) for p in parts], counts, proportions

    def worker_indices(self, epoch: int) -> torch.Tensor:
        raise TypeError("the per-class Dirichlet shards have unequal sizes: use epoch_indices")

    def epoch_indices(self, epoch: int, num_steps: int, batch_size: int) -> torch.Tensor:
        """Each worker goes on through its own shard where the last epoch stopped: its
        positions ``epoch * num_steps * batch_size + j`` of an endless stream in which pass p
        over the shard is a permutation drawn from (seed, worker, p), so a shard smaller than
        a batch is cycled through within one batch."""
        length = num_steps * batch_size
        rows = []
        for w, shard in enumerate(self.shards):
            positions = torch.arange(epoch * length, (epoch + 1) * length)
            passes, offsets = positions // len(shard), positions % len(shard)
            row = torch.empty(length, dtype=torch.long)
            for p in range(int(passes[0]), int(passes[-1]) + 1):
                order = shard[torch.randperm(len(shard), generator=torch_generator(self.seed, STREAM_CYCLE, w, p))]
                mask = passes == p
                row[mask] = order[offsets[mask]]
            rows.append(row)
        return torch.stack(rows)


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
    ``shuffled_ratio`` is used by "sorted" only, ``alpha`` by the Dirichlet schemes only."""
    if scheme == "iid":
        return IIDPartition(len(labels), n_workers, seed)
    if scheme == "sorted":
        return SortedPartition(labels, n_workers, shuffled_ratio, seed)
    if scheme == "dirichlet":
        return DirichletPartition(labels, n_workers, alpha, seed)
    if scheme == "dirichlet_per_class":
        return PerClassDirichletPartition(labels, n_workers, alpha, seed)
    raise ValueError(f"unknown partition scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
