"""Batched CIFAR augmentation: random crop with zero padding + horizontal flip.

The same transform as torchvision's ``RandomCrop(32, padding=4)`` followed by
``RandomHorizontalFlip()`` on raw pixels (padding is black, before
normalization), done for a whole batch with one gather on the device. The
random draws are inputs, so the caller decides where randomness comes from.
"""

import torch

from .seeding import STREAM_AUGMENT, torch_generator


def draw_crop_flip(
    seed: int, epoch: int, n_workers: int, num_steps: int, batch_size: int, padding: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop offsets (int64 ``[n_workers, num_steps, batch_size, 2]``, (row, col)
    in ``0..2*padding``) and flips (bool ``[n_workers, num_steps, batch_size]``)
    for a whole epoch of every worker: a pure function of the arguments, drawn on
    CPU. Slice the rows of the local workers."""
    g = torch_generator(seed, STREAM_AUGMENT, epoch)
    offsets = torch.randint(0, 2 * padding + 1, (n_workers, num_steps, batch_size, 2), generator=g)
    flips = torch.randint(0, 2, (n_workers, num_steps, batch_size), generator=g).bool()
    return offsets, flips


def random_crop_flip(
    images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, padding: int = 4
) -> torch.Tensor:
    """``images [N, C, H, W]`` -> ``[N, C, H, W]``: sample n is the H x W window at
    (``offsets[n, 0]``, ``offsets[n, 1]``) of the image zero-padded by ``padding``
    on every side, mirrored left-right where ``flips[n]``.

    out[n, c, i, j] = padded[n, c, offsets[n, 0] + i, offsets[n, 1] + j']
    with j' = W - 1 - j if flips[n] else j.
    """
    n, c, h, w = images.shape
    device = images.device
    hp, wp = h + 2 * padding, w + 2 * padding
    padded = images.new_zeros((n, c, hp, wp))
    padded[:, :, padding : padding + h, padding : padding + w] = images
    offsets = offsets.to(device)
    rows = offsets[:, 0, None] + torch.arange(h, device=device)  # [N, H]
    cols = offsets[:, 1, None] + torch.arange(w, device=device)  # [N, W]
    cols = torch.where(flips.to(device)[:, None], cols.flip(1), cols)
    # One gather over flattened planes (several times faster than 4-D advanced indexing).
    pixels = (rows[:, :, None] * wp + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    return padded.view(n, c, hp * wp).gather(2, pixels).view(n, c, h, w)
