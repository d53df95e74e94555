"""Device-resident batch loaders for a process's block of local workers.

A process hosts workers ``first_worker .. first_worker + L - 1`` of ``n_workers``.
Loaders yield stacked batches ``[L, B, ...]`` whose row l belongs to worker
``first_worker + l``. Every random choice (partition, shuffle, crop, flip) is
drawn for all ``n_workers`` from generators seeded by ``(seed, epoch)`` and then
sliced, so worker i gets identical batches under any process layout, and batch
``step`` of ``epoch`` is a pure function of ``(seed, epoch, step)``: a resumed run
passes ``start_step`` and needs no generator state from the checkpoint.

A batch is one gather from the device-resident data set, the augmentation
gather and a fused normalization, made for one step at a time (on a GPU for
several steps at once): no per-sample Python, no host-device copies (index and
augmentation tensors move once per epoch, to a GPU without waiting for it:
`_to_device`).
"""

from collections.abc import Iterator

import torch

from .augment import draw_crop_flip, random_crop_flip
from .dataset import Dataset
from .partition import Partition


def _local_block(n_workers: int, first_worker: int, num_local_workers: int | None) -> tuple[int, int]:
    if num_local_workers is None:
        num_local_workers = n_workers - first_worker
    if not 0 <= first_worker < n_workers:
        raise ValueError(f"first_worker={first_worker} is not a worker of 0..{n_workers - 1}")
    if num_local_workers < 1 or first_worker + num_local_workers > n_workers:
        raise ValueError(
            f"local workers {first_worker}..{first_worker + num_local_workers - 1} "
            f"do not fit in 0..{n_workers - 1}"
        )
    return int(first_worker), int(num_local_workers)


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU `tensor`'s copy on `device`. To a GPU it goes from pinned memory, queued on the
    current stream: from pageable memory the copy would wait for everything queued there (at an
    epoch's first batch, the last epoch's steps). The caching host allocator keeps the pinned
    copy until the device has read it."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _check_start(start_step: int, num_batches: int) -> None:
    if not 0 <= start_step <= num_batches:
        raise ValueError(f"start_step={start_step} outside 0..{num_batches} (batches per epoch)")


class WorkerLoader:
    """Training batches of image classification for the local workers.

    Args:
        dataset: a `Dataset` (images uint8 on the training device).
        partition: a `Partition` of ``dataset.train_x`` over ``n_workers``.
        batch_size: samples per worker per step (B).
        first_worker, num_local_workers: the local block (default: all workers).
        seed: seeds the augmentation (the partition has its own seed).
        augment: random crop (zero padding ``padding``) + horizontal flip;
            None -> ``dataset.default_augment`` (True for CIFAR-10).

    ``num_batches_per_epoch = shard_size // batch_size`` (the last partial batch
    is dropped; with shards of unequal sizes, ``shard_size`` is their mean and each
    worker cycles through its own shard, ``Partition.epoch_indices``). ``epoch_batches(epoch, start_step)`` yields
    ``(x float32 [L, B, C, H, W] normalized, y int64 [L, B])`` on the device.

    On a GPU the batches of `STEPS_AT_ONCE` steps are made together (a view of them for
    each step): the same values in the same few kernels, which the host launches once for
    those steps, where at every step its launches are time the device waits.
    """

    STEPS_AT_ONCE = 8  # steps whose batches a GPU makes together

    def __init__(
        self,
        dataset: Dataset,
        partition: Partition,
        batch_size: int,
        first_worker: int = 0,
        num_local_workers: int | None = None,
        seed: int = 0,
        augment: bool | None = None,
        padding: int = 4,
    ):
        if dataset.is_language_model:
            raise ValueError("WorkerLoader is for image data sets; use LanguageModelLoader")
        if partition.num_samples != dataset.num_train:
            raise ValueError(
                f"the partition covers {partition.num_samples} samples but the training set "
                f"has {dataset.num_train}"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if batch_size > partition.shard_size:
            raise ValueError(
                f"batch_size={batch_size} is larger than each worker's shard of "
                f"{partition.shard_size} samples ({partition.num_samples} samples over "
                f"{partition.n_workers} workers): not a single full batch per epoch; "
                f"use batch_size <= {partition.shard_size} or fewer workers"
            )
        self.dataset = dataset
        self.partition = partition
        self.n_workers = partition.n_workers
        self.batch_size = int(batch_size)
        self.first_worker, self.num_local_workers = _local_block(
            self.n_workers, first_worker, num_local_workers
        )
        self.seed = int(seed)
        self.augment = dataset.default_augment if augment is None else bool(augment)
        self.padding = int(padding)
        self.num_batches_per_epoch = partition.shard_size // self.batch_size
        self._passes = {}  # worker_batch's: pass -> (indices, offsets, flips) of every local worker
        self.steps_at_once = self.STEPS_AT_ONCE if dataset.device.type == "cuda" else 1

    def __len__(self) -> int:
        return self.num_batches_per_epoch

    def _local(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor[self.first_worker : self.first_worker + self.num_local_workers]

    def _epoch_draws(self, epoch: int):
        """The local workers' sample indices of ``epoch`` (``[L, steps * B]``) and their crops and
        flips (None without augmentation), on the data set's device."""
        device, num_steps, batch = self.dataset.device, self.num_batches_per_epoch, self.batch_size
        indices = _to_device(self._local(self.partition.epoch_indices(epoch, num_steps, batch)), device)
        if not self.augment:
            return indices, None
        drawn = draw_crop_flip(self.seed, epoch, self.n_workers, num_steps, batch, self.padding)
        return indices, tuple(_to_device(self._local(t), device) for t in drawn)

    def epoch_batches(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches ``start_step .. num_batches_per_epoch - 1`` of ``epoch``: ``(x [L, B, C, H, W], y [L, B])``."""
        _check_start(start_step, self.num_batches_per_epoch)
        draws = self._epoch_draws(epoch)
        for first in range(start_step, self.num_batches_per_epoch, self.steps_at_once):
            steps = min(self.steps_at_once, self.num_batches_per_epoch - first)
            x, y = self._batch(draws, first, slice(None), steps)  # [L, steps * B, ...]: step after step
            x, y = x.unflatten(1, (steps, self.batch_size)), y.unflatten(1, (steps, self.batch_size))
            for step in range(steps):
                yield x[:, step], y[:, step]

    def worker_batch(self, worker: int, pass_: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Worker `worker`'s batch `step` of its pass `pass_` over its shard: its row of
        ``epoch_batches(pass_)``'s batch `step`, ``(x [B, C, H, W], y [B])``. An asynchronous run's
        worker goes through its own shard at its own pace, reshuffled when used up (the next pass)."""
        row = worker - self.first_worker
        if not 0 <= row < self.num_local_workers or not 0 <= step < self.num_batches_per_epoch:
            raise ValueError(f"worker {worker}, step {step}: not a local worker's batch ({self.num_batches_per_epoch} per pass)")
        if pass_ not in self._passes:
            if len(self._passes) >= 8:  # the workers' passes are near each other: keep the latest few
                del self._passes[min(self._passes)]
            self._passes[pass_] = self._epoch_draws(pass_)
        return self._batch(self._passes[pass_], step, row)

    def _batch(self, draws, step: int, rows, steps: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch `step` of an epoch's `draws` (`_epoch_draws`) for the local workers `rows`: a slice
        of them (``[L', B, ...]``) or one (``[B, ...]``), augmented and normalized; with `steps`,
        the batches of steps `step` .. `step + steps - 1` one after the other (``[L', steps * B, ...]``)."""
        indices, drawn = draws
        idx = indices[rows, step * self.batch_size : (step + steps) * self.batch_size]
        x = self.dataset.train_x[idx]
        if drawn is not None:
            offsets, flips = drawn
            images = x.reshape((-1,) + tuple(x.shape[-3:]))  # every sample of the batch, worker after worker
            x = random_crop_flip(images, offsets[rows, step : step + steps].reshape(-1, offsets.shape[-1]),
                                 flips[rows, step : step + steps].reshape(-1), self.padding).view(x.shape)
        return self.dataset.normalize(x), self.dataset.train_y[idx]


class LanguageModelLoader:
    """Training windows of the language model for the local workers.

    Worker w owns the fixed contiguous slice ``[w * S, (w + 1) * S)`` of the
    training token stream, ``S = T // n_workers`` (the paper's setup; the tail is
    dropped). Its slice is batchified as in PyTorch's word_language_model example:
    cut into ``batch_size`` contiguous rows of ``tokens_per_row = S // batch_size``
    tokens, so row b continues from one window to the next (carry the LSTM state).
    Step t yields ``inputs = rows[:, t*bptt : (t+1)*bptt]`` and the targets one
    token later, stacked over the local workers: ``[L, B, bptt]`` int64 each.
    ``num_batches_per_epoch = (tokens_per_row - 1) // bptt``: only full windows, so
    every batch has the same shape (the original BPTT iterator also yielded one
    shorter last window). There is no randomness: every epoch is the same.
    """

    def __init__(
        self,
        dataset: Dataset,
        n_workers: int,
        batch_size: int,
        first_worker: int = 0,
        num_local_workers: int | None = None,
        bptt: int = 30,
    ):
        tokens = dataset.train_x if isinstance(dataset, Dataset) else dataset
        if tokens.ndim != 1:
            raise ValueError(f"expected a 1-D token stream, got shape {list(tokens.shape)}")
        if n_workers < 1 or batch_size < 1 or bptt < 1:
            raise ValueError(f"n_workers, batch_size and bptt must be >= 1, got {n_workers}, {batch_size}, {bptt}")
        self.n_workers = int(n_workers)
        self.first_worker, self.num_local_workers = _local_block(self.n_workers, first_worker, num_local_workers)
        self.batch_size, self.bptt = int(batch_size), int(bptt)
        self.tokens_per_worker = tokens.numel() // self.n_workers
        self.tokens_per_row = self.tokens_per_worker // self.batch_size
        self.num_batches_per_epoch = (self.tokens_per_row - 1) // self.bptt if self.tokens_per_row else 0
        if self.num_batches_per_epoch < 1:
            raise ValueError(
                f"each worker's {self.tokens_per_worker} tokens in {batch_size} rows give "
                f"{self.tokens_per_row} tokens per row: not one window of bptt={bptt} "
                "(+1 for the target); lower batch_size or bptt"
            )
        used = self.batch_size * self.tokens_per_row
        starts = [(self.first_worker + l) * self.tokens_per_worker for l in range(self.num_local_workers)]
        self.rows = torch.stack(  # [L, B, tokens_per_row]
            [tokens[s : s + used].view(self.batch_size, self.tokens_per_row) for s in starts]
        )

    def __len__(self) -> int:
        return self.num_batches_per_epoch

    def epoch_batches(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Windows ``start_step .. num_batches_per_epoch - 1`` (same for every epoch)."""
        _check_start(start_step, self.num_batches_per_epoch)
        for step in range(start_step, self.num_batches_per_epoch):
            i = step * self.bptt
            yield (
                self.rows[:, :, i : i + self.bptt].contiguous(),
                self.rows[:, :, i + 1 : i + 1 + self.bptt].contiguous(),
            )
