"""A small CNN for quick CPU runs (Fashion-MNIST in an epoch or so).

conv3x3(in -> 32) - ReLU - maxpool2 - conv3x3(32 -> 64) - ReLU - maxpool2 -
adaptive average pool to 7x7 - Linear(64*7*7 -> 128) - ReLU - Linear(128 -> classes).

For 28x28 inputs the adaptive pool is the identity (28 -> 14 -> 7); 32x32 inputs
(8x8 maps) are pooled to 7x7, so the parameter count does not depend on the image
size: 421,642 parameters for 1 channel, 422,218 for 3 (10 classes). Holds 4-D
conv weights, 2-D linear weights and 1-D biases, and no batch norm. PyTorch's
default initialization.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["SmallCNN", "small_cnn"]


class SmallCNN(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, hidden: int = 128):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 7 * 7, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.max_pool2d(F.relu(self.conv1(x)), 2)
        out = F.max_pool2d(F.relu(self.conv2(out)), 2)
        out = F.adaptive_avg_pool2d(out, 7).flatten(1)
        out = F.relu(self.fc1(out))
        return self.fc2(out)


def small_cnn(in_channels: int = 1, num_classes: int = 10) -> SmallCNN:
    return SmallCNN(in_channels, num_classes)
