"""Model zoo (torch only; no torchvision).

    build(name, in_channels=3, num_classes=10, image_size=32, vocab_size=None)

names (case-insensitive): see NAMES.

| name      | file          | params (3x32x32 / 1x28x28, 10 classes) |
| --------- | ------------- | -------------------------------------- |
| resnet20  | resnet.py     | 272,474 / 272,186                      |
| resnet18  | resnet.py     | 11,173,962 / 11,172,810                |
| vgg16     | vgg.py        | 14,728,266 / 14,727,114                |
| small_cnn | small_cnn.py  | 422,218 / 421,642                      |
| lstm      | lstm.py       | 10,155,600 + 651 * vocab_size          |

All image models end in adaptive average pooling, so they take 1x28x28 as well
as 3x32x32 inputs and `image_size` changes nothing (it is checked and kept for
callers that pass it). Forward passes are functional (no in-place ops, no
data-dependent Python control flow) so they work with torch.func.functional_call
and torch.func.vmap over stacked parameters; batch-norm buffers are the only
state a forward pass updates. The LSTM switches by itself to an unfused
recurrence under torch.func transforms (aten::lstm has no vmap rule); see lstm.py.
Note: module.to("meta") un-shares the tied LSTM weights (decoder.weight is no
longer embedding.weight); the LSTM's forward reads embedding.weight for the
decoder, so the tie holds in the computation anyway.
"""

import torch.nn as nn

from .lstm import LSTMLanguageModel, lstm
from .resnet import CifarResNet, resnet18, resnet20
from .small_cnn import SmallCNN, small_cnn
from .vgg import VGG, vgg16

__all__ = [
    "NAMES",
    "build",
    "no_weight_decay_parameter_names",
    "CifarResNet",
    "VGG",
    "SmallCNN",
    "LSTMLanguageModel",
]

NAMES = ("resnet20", "resnet18", "vgg16", "small_cnn", "lstm")

_IMAGE_MODELS = {"resnet20": resnet20, "resnet18": resnet18, "vgg16": vgg16, "small_cnn": small_cnn}


def build(
    name: str,
    in_channels: int = 3,
    num_classes: int = 10,
    image_size: int = 32,
    vocab_size: int | None = None,
) -> nn.Module:
    """A freshly initialized model (deterministic under torch.manual_seed).

    For "lstm", vocab_size is required and in_channels / num_classes /
    image_size are ignored; for image models vocab_size is ignored.
    """
    key = name.lower()
    if key not in NAMES:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(NAMES)}")
    if key == "lstm":
        if vocab_size is None:
            raise ValueError("model 'lstm' needs vocab_size")
        return lstm(vocab_size)
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    return _IMAGE_MODELS[key](in_channels=in_channels, num_classes=num_classes)


def no_weight_decay_parameter_names(model: nn.Module) -> set[str]:
    """Names (as in model.named_parameters()) of all batch-norm weights and biases.

    The paper's training loop applies no weight decay to these (the original code's rule).
    """
    bn_params = set()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            bn_params.update(id(p) for p in module.parameters(recurse=False))
    return {name for name, p in model.named_parameters() if id(p) in bn_params}
