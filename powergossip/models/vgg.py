"""VGG-16 with batch norm, CIFAR variant.

Feature stack (Simonyan & Zisserman 2015, configuration D, with batch norm after
every conv): 64, 64, M, 128, 128, M, 256 x3, M, 512 x3, M, 512 x3, M, where each
number is a 3x3 conv (padding 1, with bias) + BN + ReLU and M a 2x2 max pool.

Classifier: a single Linear(512, num_classes) after global average pooling (the
common CIFAR choice, e.g. kuangliu/pytorch-cifar): 14,728,266 parameters for
3 input channels and 10 classes. The max pools use ceil_mode=True, which changes
nothing for 32x32 inputs (32 -> 16 -> 8 -> 4 -> 2 -> 1) but keeps 28x28 inputs
from shrinking to zero (28 -> 14 -> 7 -> 4 -> 2 -> 1).

Init: convs Kaiming normal (fan_out, ReLU), conv biases 0, BN (1, 0), linear
PyTorch default.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["VGG", "vgg16", "VGG16_CONFIG"]

VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    def __init__(self, config=VGG16_CONFIG, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2, stride=2, ceil_mode=True))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1), nn.BatchNorm2d(item), nn.ReLU()]
                channels = item
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(x)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.classifier(out)


def vgg16(in_channels: int = 3, num_classes: int = 10) -> VGG:
    return VGG(VGG16_CONFIG, in_channels, num_classes)
