"""Random images and labels of any shape, for speed runs and tests.

Uniform uint8 pixels and uniform labels, a pure function of the arguments (the
same seed gives the same data on every machine). Nothing here is learnable
beyond memorization.
"""

import torch

from .seeding import STREAM_SYNTHETIC, torch_generator

# Statistics of uniform pixels on [0, 1]: mean 1/2, std 1/sqrt(12).
MEAN_VALUE = 0.5
STD_VALUE = 0.2887


def make_synthetic(
    num_train: int = 50_000,
    num_test: int = 10_000,
    in_channels: int = 3,
    image_size: int = 32,
    num_classes: int = 10,
    seed: int = 0,
):
    """Return ``(train_x, train_y, test_x, test_y)`` on CPU: uint8 images
    ``[N, in_channels, image_size, image_size]``, int64 labels in 0..num_classes-1."""
    for name, value in [("num_train", num_train), ("in_channels", in_channels),
                        ("image_size", image_size), ("num_classes", num_classes)]:
        if value < 1:
            raise ValueError(f"synthetic data: {name} must be >= 1, got {value}")
    if num_test < 0:
        raise ValueError(f"synthetic data: num_test must be >= 0, got {num_test}")
    out = []
    for split, n in enumerate((num_train, num_test)):
        g = torch_generator(seed, STREAM_SYNTHETIC, split)
        x = torch.randint(0, 256, (n, in_channels, image_size, image_size), generator=g,
                          dtype=torch.uint8)
        y = torch.randint(0, num_classes, (n,), generator=g, dtype=torch.int64)
        out += [x, y]
    return tuple(out)
