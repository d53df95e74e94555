"""The in-memory data set: all tensors on the training device, plus metadata."""

from dataclasses import dataclass, field

import torch


@dataclass
class Dataset:
    """A whole data set resident on one device.

    Image tasks: ``train_x`` / ``test_x`` are uint8 ``[N, C, H, W]`` raw pixels
    (0..255; 4x smaller than float, and augmentation pads with true black);
    ``normalize`` turns them into float32 ``(x / 255 - mean) / std`` per channel.
    ``train_y`` / ``test_y`` are int64 ``[N]``.

    Language model (``is_language_model``): ``train_x`` / ``valid_x`` / ``test_x``
    are int64 token-id streams ``[T]``; the ``*_y`` fields are None (targets are
    the stream shifted by one); ``num_classes == len(vocab)``.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor | None
    test_x: torch.Tensor
    test_y: torch.Tensor | None
    num_classes: int
    in_channels: int = 0
    image_size: int = 0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    vocab: list[str] | None = None
    valid_x: torch.Tensor | None = None
    is_language_model: bool = False
    default_augment: bool = False  # random crop + flip by default (CIFAR-10)
    _affine: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def device(self) -> torch.device:
        return self.train_x.device

    @property
    def num_train(self) -> int:
        return self.train_x.shape[0]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Raw images ``[..., C, H, W]`` (uint8 0..255, or float already scaled
        to [0, 1]) -> float32 ``(x - mean) / std`` per channel."""
        scale_by_255 = images.dtype == torch.uint8
        key = (images.device, scale_by_255)
        if key not in self._affine:
            mean = torch.tensor(self.mean, dtype=torch.float32, device=images.device).view(-1, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32, device=images.device).view(-1, 1, 1)
            scale = 1.0 / (std * (255.0 if scale_by_255 else 1.0))
            self._affine[key] = (scale, mean / std)
        scale, shift = self._affine[key]
        return images.to(torch.float32) * scale - shift
