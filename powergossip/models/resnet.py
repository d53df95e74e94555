"""CIFAR ResNets: ResNet-20 (He et al. 2016, section 4.2) and the CIFAR ResNet-18.

Both use basic blocks (two 3x3 convs with batch norm) and, where a block changes
the shape (stride 2 or a new width), a projection shortcut made of a 1x1 conv
and batch norm ("option B" of He et al.). Convolutions have no bias; the final
linear layer does. With 3 input channels and 10 classes:

- ResNet-20 (3 stages x 3 blocks, widths 16/32/64): 272,474 parameters, as in
  the PowerGossip / Choco-SGD code (269,722 of the zero-padding "option A"
  variant plus 2,752 for the two projection shortcuts).
- ResNet-18 (3x3 stem, no max pool, 4 stages x 2 blocks, widths 64..512):
  11,173,962 parameters.

Global average pooling is adaptive, so 1x28x28 inputs (Fashion-MNIST) work too.

Initialization follows the paper's code: ResNet-20 draws conv weights from
N(0, 2 / (k*k*out_channels)) (Kaiming normal, fan_out, ReLU gain) with batch norm
at weight 1 / bias 0 and PyTorch's default for the linear layer; ResNet-18 keeps
PyTorch's default initialization everywhere (as the code it comes from did).

Forward passes are functional (F.relu, out-of-place additions, no
data-dependent control flow), so the models work with
torch.func.functional_call and torch.func.vmap over stacked parameters.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["BasicBlock", "CifarResNet", "resnet20", "resnet18"]


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """3x3 conv stem (no max pool), stages of basic blocks, global pool, linear.

    Args:
        widths: output channels of each stage; every stage after the first
            halves the resolution with a stride-2 first block.
        blocks_per_stage: number of basic blocks in every stage.
        in_channels, num_classes: input channels and classifier outputs.
        he_init: Kaiming-normal (fan_out) conv init and BN (1, 0), as ResNet-20
            in the paper's code; False keeps PyTorch defaults.
    """

    def __init__(
        self,
        widths: tuple[int, ...],
        blocks_per_stage: int,
        in_channels: int = 3,
        num_classes: int = 10,
        he_init: bool = False,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages = []
        in_planes = widths[0]
        for s, planes in enumerate(widths):
            blocks = []
            for b in range(blocks_per_stage):
                stride = 2 if (s > 0 and b == 0) else 1
                blocks.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(widths[-1], num_classes)
        if he_init:
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


def resnet20(in_channels: int = 3, num_classes: int = 10) -> CifarResNet:
    """ResNet-20: 3 stages of 3 basic blocks, widths 16/32/64 (272,474 params)."""
    return CifarResNet((16, 32, 64), 3, in_channels, num_classes, he_init=True)


def resnet18(in_channels: int = 3, num_classes: int = 10) -> CifarResNet:
    """CIFAR ResNet-18: 4 stages of 2 basic blocks, widths 64..512 (11,173,962 params)."""
    return CifarResNet((64, 128, 256, 512), 2, in_channels, num_classes, he_init=False)
