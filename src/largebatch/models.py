"""Models in plain torch, sized from the data source.

Every model starts with a :class:`Normalize` layer, so data stays in its raw range (images
in [0, 1]) and adversarial budgets are in raw input units, as in the paper.

- ``mlp``: flatten -> 512 -> 256 -> classes, ReLU.
- ``c1``: the paper's C1 (reference code layout: batch-norm after the ReLU):
  conv 5x5 64 -> ReLU -> BN -> max-pool 3/2 (pad 1), twice; then FC 384 -> 192 -> classes.
- ``c2``: the paper's C2: four conv 3x3 without padding (64, 64, 128, 128), each
  ReLU -> BN, max-pool 2 after the second and the fourth; then FC 256 -> 256 -> classes.
- ``resnet20``: CIFAR-style ResNet (3 stages of 3 basic blocks, 16/32/64 channels).
- ``resnet18``: ResNet-18 (basic blocks 2-2-2-2, 64..512 channels); a 3x3 stride-1 stem
  for small images (at most 64 pixels wide), the 7x7 stride-2 stem and max-pool otherwise.

Input sizes other than 32x32 change only the width of the first fully connected layer,
which is found by a dry forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from largebatch.errors import UsageError

__all__ = ["MODELS", "Normalize", "build_model", "count_parameters"]

MODELS: tuple[str, ...] = ("mlp", "c1", "c2", "resnet20", "resnet18")


class Normalize(nn.Module):
    """(x - mean) / std per channel; mean and std are buffers, not parameters."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], ndim: int) -> None:
        super().__init__()
        # Broadcast over (N, C, H, W) for images, (N, D) for vectors.
        shape = (1, len(mean)) + (1,) * (ndim - 1)
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(shape))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _flat_width(features: nn.Module, input_shape: tuple[int, ...]) -> int:
    with torch.no_grad():
        was_training = features.training
        features.eval()
        out = features(torch.zeros(1, *input_shape))
        features.train(was_training)
    return int(out.numel())


def _classifier(in_width: int, hidden: Sequence[int], num_classes: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_width
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def _mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return _classifier(math.prod(input_shape), (512, 256), num_classes)


def _conv_relu_bn(cin: int, cout: int, kernel: int, padding: int) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel, padding=padding),
        nn.ReLU(inplace=True),
        nn.BatchNorm2d(cout),
    ]


def _c1(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    c = input_shape[0]
    features = nn.Sequential(
        *_conv_relu_bn(c, 64, 5, 2),
        nn.MaxPool2d(3, stride=2, padding=1),
        *_conv_relu_bn(64, 64, 5, 2),
        nn.MaxPool2d(3, stride=2, padding=1),
    )
    return nn.Sequential(
        features, _classifier(_flat_width(features, input_shape), (384, 192), num_classes)
    )


def _c2(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    c, h, w = input_shape
    if min(h, w) < 16:
        raise UsageError(
            f"model c2 needs images of at least 16x16 pixels, got {h}x{w}; use c1 or mlp"
        )
    features = nn.Sequential(
        *_conv_relu_bn(c, 64, 3, 0),
        *_conv_relu_bn(64, 64, 3, 0),
        nn.MaxPool2d(2),
        *_conv_relu_bn(64, 128, 3, 0),
        *_conv_relu_bn(128, 128, 3, 0),
        nn.MaxPool2d(2),
    )
    return nn.Sequential(
        features, _classifier(_flat_width(features, input_shape), (256, 256), num_classes)
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs with batch-norm; a 1x1 projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A stem, stages of basic blocks, global average pooling and a linear head."""

    def __init__(
        self,
        in_channels: int,
        widths: Sequence[int],
        depths: Sequence[int],
        num_classes: int,
        large_stem: bool = False,
    ) -> None:
        super().__init__()
        stem: list[nn.Module]
        if large_stem:
            stem = [
                nn.Conv2d(in_channels, widths[0], 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(widths[0]),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            ]
        else:
            stem = [
                nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
                nn.BatchNorm2d(widths[0]),
                nn.ReLU(inplace=True),
            ]
        self.stem = nn.Sequential(*stem)
        blocks: list[nn.Module] = []
        cin = widths[0]
        for i, (width, depth) in enumerate(zip(widths, depths, strict=True)):
            for j in range(depth):
                blocks.append(BasicBlock(cin, width, 2 if (i > 0 and j == 0) else 1))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _resnet20(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return ResNet(input_shape[0], (16, 32, 64), (3, 3, 3), num_classes)


def _resnet18(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    large = min(input_shape[1:]) > 64
    return ResNet(input_shape[0], (64, 128, 256, 512), (2, 2, 2, 2), num_classes, large)


_BUILDERS = {
    "mlp": _mlp,
    "c1": _c1,
    "c2": _c2,
    "resnet20": _resnet20,
    "resnet18": _resnet18,
}


def build_model(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> nn.Module:
    """Build model ``name`` for inputs of shape ``input_shape`` (per sample, e.g. (1, 28, 28)).

    ``mean``/``std`` (per channel, or one value per feature for vectors) become a leading
    :class:`Normalize` layer; omit them for none. Image models need (C, H, W) inputs.
    """
    if name not in _BUILDERS:
        raise UsageError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    shape = tuple(int(s) for s in input_shape)
    if name != "mlp" and len(shape) != 3:
        raise UsageError(
            f"model {name} needs image inputs (channels, height, width), got shape {shape}; "
            "use --model mlp for vector data"
        )
    body = _BUILDERS[name](shape, num_classes)
    if mean is None or std is None:
        return nn.Sequential(nn.Identity(), body)
    return nn.Sequential(Normalize(mean, std, len(shape)), body)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
