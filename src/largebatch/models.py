"""Models in plain torch, sized from the data source.

Every model starts with a :class:`Normalize` layer, so data stays in its raw range (images
in [0, 1]) and adversarial budgets are in raw input units, as in the paper.

- ``mlp``: flatten -> 512 -> 256 -> classes, ReLU.
- ``c1``: the paper's C1 (reference code layout: batch-norm after the ReLU):
  conv 5x5 64 -> ReLU -> BN -> max-pool 3/2 (pad 1), twice; then FC 384 -> 192 -> classes.
- ``c2``: the paper's C2: four conv 3x3 without padding (64, 64, 128, 128), each
  ReLU -> BN, max-pool 2 after the second and the fourth; then FC 256 -> 256 -> classes.
- ``resnet20``: CIFAR-style ResNet (3 stages of 3 basic blocks, 16/32/64 channels).
- ``resnet18``: ResNet-18 (basic blocks 2-2-2-2, 64..512 channels).
- ``resnet50``: ResNet-50 (bottleneck blocks 3-4-6-3, 256..2048 output channels).
- ``squeezenext``: 1.0-SqNxt-23 (Gholami et al. 2018): SqueezeNext blocks 6-6-8-1 with
  32..256 channels, a 1x1 conv to 128 channels, average pooling, linear head.
- ``squeezenext-2x``: 2.0-SqNxt-23, the same with every width doubled.

The ResNets and SqueezeNexts have a 3x3 stride-1 stem for small images (at most 64 pixels
on the short side: Fashion-MNIST, CIFAR, Tiny ImageNet) and the 7x7 stride-2 stem with a
3/2 max-pool for larger ones (ImageNet); global average pooling makes them work at any size.
With 1000 classes at 224x224, resnet18 has 11,689,512 parameters and resnet50 25,557,032
(as torchvision's), squeezenext 718,280 and squeezenext-2x 2,572,200.

Other SqueezeNext widths and depths are built from Python, e.g. 2.0-SqNxt-23v5 for ImageNet::

    model = nn.Sequential(
        Normalize(mean, std, ndim=3),
        SqueezeNext(3, 1000, width=2.0, depths=(2, 4, 14, 1), large_input=True),
    )

For c1 and c2, input sizes other than 32x32 change only the width of the first fully
connected layer, which is found by a dry forward pass.

The ResNets and SqueezeNexts initialize convs Kaiming normal (fan out) and batch-norm to
scale 1, shift 0; linear layers (and all layers of mlp, c1, c2) keep torch's defaults.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from largebatch.errors import UsageError

__all__ = [
    "MODELS",
    "TRANSFORMER_SIZES",
    "Normalize",
    "ResNet",
    "SqueezeNext",
    "Transformer",
    "build_model",
    "count_parameters",
]

MODELS: tuple[str, ...] = (
    "mlp",
    "c1",
    "c2",
    "resnet20",
    "resnet18",
    "resnet50",
    "squeezenext",
    "squeezenext-2x",
    "transformer",
)

#: the transformer's sizes when a config or a checkpoint does not give them
TRANSFORMER_SIZES: dict[str, int] = {"d_model": 128, "n_layers": 2, "n_heads": 4}


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


def _conv_bn_relu(
    cin: int,
    cout: int,
    kernel: int | tuple[int, int],
    stride: int = 1,
    padding: int | tuple[int, int] = 0,
) -> nn.Sequential:
    # No conv bias: the batch-norm shift that follows makes it redundant.
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def _stem(in_channels: int, width: int, large_input: bool) -> nn.Sequential:
    """3x3 stride-1 conv for small images; 7x7 stride-2 conv and 3/2 max-pool for large ones.

    Output spatial size: unchanged for small inputs, a quarter (rounded up) for large ones.
    """
    if large_input:
        return nn.Sequential(
            *_conv_bn_relu(in_channels, width, 7, stride=2, padding=3),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
    return _conv_bn_relu(in_channels, width, 3, padding=1)


def _projection(cin: int, cout: int, stride: int) -> nn.Module:
    """Identity when the shape is kept, else a strided 1x1 conv with batch-norm."""
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))


def _is_large_input(input_shape: tuple[int, ...]) -> bool:
    # ImageNet-sized images get the downsampling stem; images up to 64 pixels keep full size.
    return min(input_shape[1:]) > 64


def _init_weights(model: nn.Module) -> None:
    """Kaiming normal (fan out) for convs; batch-norm scale 1 and shift 0; torch default for FC."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    """Two 3x3 convs with batch-norm; a 1x1 projection when the shape changes.

    Maps (N, cin, H, W) to (N, width, H / stride, W / stride).
    """

    expansion = 1

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.shortcut = _projection(cin, width, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce to ``width``, 3x3 (strided), 1x1 expand to ``4 * width``; batch-norm after each.

    Maps (N, cin, H, W) to (N, 4 * width, H / stride, W / stride). The stride sits on the
    3x3 conv (as in torchvision's ResNet-50, "v1.5"); parameter counts are the same either way.
    """

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = _projection(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A stem, stages of residual blocks, global average pooling and a linear head.

    ``widths[i]`` is the inner width of stage ``i``; its blocks output
    ``widths[i] * block.expansion`` channels. The first block of every stage but the first
    has stride 2. ``large_stem`` picks the 7x7 stride-2 stem with max-pool (see :func:`_stem`).
    Maps (N, in_channels, H, W) to logits (N, num_classes) for any H, W.
    """

    def __init__(
        self,
        in_channels: int,
        widths: Sequence[int],
        depths: Sequence[int],
        num_classes: int,
        large_stem: bool = False,
        block: type[BasicBlock] | type[Bottleneck] = BasicBlock,
    ) -> None:
        super().__init__()
        self.stem = _stem(in_channels, widths[0], large_stem)
        blocks: list[nn.Module] = []
        cin = widths[0]
        for i, (width, depth) in enumerate(zip(widths, depths, strict=True)):
            for j in range(depth):
                blocks.append(block(cin, width, 2 if (i > 0 and j == 0) else 1))
                cin = width * block.expansion
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class SqueezeNextBlock(nn.Module):
    """SqueezeNext block: two 1x1 squeezes, a 3x1 and a 1x3 conv, a 1x1 expansion.

    With S the squeezed width: 1x1 ``cin`` -> S (strided), 1x1 S -> S/2, 3x1 S/2 -> S,
    1x3 S -> S, 1x1 S -> ``cout``; every conv is followed by batch-norm and ReLU. S is
    ``cin / 2`` in general (the paper's C/2, C/4, C/2, C/2 pattern), ``cin`` in a stride-2
    block and ``cin / 4`` in a block that narrows the channels, as in the authors' released
    1.0-SqNxt-23, whose 0.72M parameters this reproduces (with ``cin / 2`` everywhere it
    would have 0.61M). The shortcut is the identity or, when the shape changes, a 1x1 conv
    with batch-norm; a ReLU follows the sum.
    Maps (N, cin, H, W) to (N, cout, H / stride, W / stride).
    """

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        if stride != 1:
            squeezed = cin
        elif cin > cout:
            squeezed = max(1, cin // 4)
        else:
            squeezed = max(1, cin // 2)
        half = max(1, squeezed // 2)
        self.body = nn.Sequential(
            _conv_bn_relu(cin, squeezed, 1, stride=stride),
            _conv_bn_relu(squeezed, half, 1),
            _conv_bn_relu(half, squeezed, (3, 1), padding=(1, 0)),
            _conv_bn_relu(squeezed, squeezed, (1, 3), padding=(0, 1)),
            _conv_bn_relu(squeezed, cout, 1),
        )
        self.shortcut = _projection(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class SqueezeNext(nn.Module):
    """SqueezeNext (Gholami et al. 2018), e.g. 1.0-SqNxt-23 with the defaults.

    Stem (64 channels, see :func:`_stem`), four stages of :class:`SqueezeNextBlock` with
    32, 64, 128, 256 output channels and ``depths`` blocks each (the first stage at stride 1,
    the others starting with a stride-2 block), a 1x1 conv to 128 channels with batch-norm
    and ReLU, global average pooling and a linear head. ``width`` multiplies every channel
    count (the paper uses 1.0, 1.5 and 2.0); ``depths=(2, 4, 14, 1)`` is the paper's v5
    variant. Maps (N, in_channels, H, W) to logits (N, num_classes) for any H, W.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        width: float = 1.0,
        depths: Sequence[int] = (6, 6, 8, 1),
        large_input: bool = False,
    ) -> None:
        super().__init__()
        if width <= 0 or len(depths) != 4 or min(depths) < 1:
            raise UsageError(
                f"SqueezeNext needs width > 0 and four stage depths >= 1, "
                f"got width={width}, depths={tuple(depths)}"
            )

        def scaled(channels: int) -> int:
            return max(1, round(channels * width))

        self.stem = _stem(in_channels, scaled(64), large_input)
        blocks: list[nn.Module] = []
        cin = scaled(64)
        for i, (channels, depth) in enumerate(zip((32, 64, 128, 256), depths, strict=True)):
            cout = scaled(channels)
            for j in range(depth):
                blocks.append(SqueezeNextBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.final = _conv_bn_relu(cin, scaled(128), 1)
        self.head = nn.Linear(scaled(128), num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.final(self.blocks(self.stem(x)))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _resnet20(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return ResNet(input_shape[0], (16, 32, 64), (3, 3, 3), num_classes)


def _resnet18(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    large = _is_large_input(input_shape)
    return ResNet(input_shape[0], (64, 128, 256, 512), (2, 2, 2, 2), num_classes, large)


def _resnet50(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    large = _is_large_input(input_shape)
    return ResNet(input_shape[0], (64, 128, 256, 512), (3, 4, 6, 3), num_classes, large, Bottleneck)


def _squeezenext(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return SqueezeNext(input_shape[0], num_classes, large_input=_is_large_input(input_shape))


def _squeezenext_2x(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    large = _is_large_input(input_shape)
    return SqueezeNext(input_shape[0], num_classes, width=2.0, large_input=large)


class Transformer(nn.Module):
    """A small causal Transformer over token ids (GPT-style, pre-norm): token and position
    embeddings, ``n_layers`` blocks of causal self-attention
    (``F.scaled_dot_product_attention``) and a 4x GELU MLP, a final norm, and a head that
    shares the token embedding's weight. Maps ``(batch, tokens)`` int64 ids to logits laid
    out ``(batch, vocab, tokens)``: the layout cross-entropy takes with ``(batch, tokens)``
    targets, so the default loss is the mean next-token cross-entropy."""

    def __init__(self, vocab: int, seq_len: int, d_model: int, n_layers: int, n_heads: int):
        super().__init__()
        if d_model % n_heads:
            raise UsageError(f"d_model ({d_model}) must be a multiple of n_heads ({n_heads})")
        self.tokens = nn.Embedding(vocab, d_model)
        self.positions = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, n_heads) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.head.weight = self.tokens.weight  # tied: one tensor, one gradient
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tokens(ids) + self.positions(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h)).transpose(1, 2)


class _Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.heads = n_heads
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv, self.proj = nn.Linear(d_model, 3 * d_model), nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model)
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        qkv = self.qkv(self.norm1(h)).view(b, t, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        mixed = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(mixed.transpose(1, 2).reshape(b, t, d))
        return h + self.mlp(self.norm2(h))


def _transformer(
    input_shape: tuple[int, ...], num_classes: int, sizes: dict[str, int] | None = None
) -> nn.Module:
    if len(input_shape) != 1 or num_classes < 2:
        raise UsageError(
            f"model transformer needs token sequences (dataset text), got inputs of shape "
            f"{input_shape} and {num_classes} classes"
        )
    return Transformer(num_classes, input_shape[0], **{**TRANSFORMER_SIZES, **(sizes or {})})


_BUILDERS = {
    "mlp": _mlp,
    "c1": _c1,
    "c2": _c2,
    "resnet20": _resnet20,
    "resnet18": _resnet18,
    "resnet50": _resnet50,
    "squeezenext": _squeezenext,
    "squeezenext-2x": _squeezenext_2x,
    "transformer": _transformer,
}


def build_model(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    sizes: dict[str, int] | None = None,
) -> nn.Module:
    """Build model ``name`` for inputs of shape ``input_shape`` (per sample, e.g. (1, 28, 28)).

    ``sizes``: the transformer's ``d_model``, ``n_layers`` and ``n_heads`` (default
    :data:`TRANSFORMER_SIZES`); its inputs are ``(seq_len,)`` token ids and
    ``num_classes`` is the vocabulary.

    ``name`` is one of :data:`MODELS` or a ``package.module:callable`` path to a function
    of yours returning an ``nn.Module``; it gets ``num_classes=`` and ``input_shape=``
    when its signature takes them (``mean``/``std`` are then not applied).

    ``mean``/``std`` (per channel, or one value per feature for vectors) become a leading
    :class:`Normalize` layer; omit them for none. Image models need (C, H, W) inputs.
    """
    if ":" in name:
        return _user_model(name, input_shape, num_classes)
    if name not in _BUILDERS:
        raise UsageError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    shape = tuple(int(s) for s in input_shape)
    if name == "transformer":
        return nn.Sequential(nn.Identity(), _transformer(shape, num_classes, sizes))
    if name != "mlp" and len(shape) != 3:
        raise UsageError(
            f"model {name} needs image inputs (channels, height, width), got shape {shape}; "
            "use --model mlp for vector data"
        )
    body = _BUILDERS[name](shape, num_classes)
    if not mean or not std:  # None, or () for data given as objects: no statistics
        return nn.Sequential(nn.Identity(), body)
    return nn.Sequential(Normalize(mean, std, len(shape)), body)


def _user_model(path: str, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """``--model package.module:callable``: called with ``num_classes=`` and
    ``input_shape=`` when its signature takes them; must return an ``nn.Module``."""
    from largebatch.user_code import call_with_accepted, load_callable

    function = load_callable(path, "--model")
    model = call_with_accepted(
        function,
        f"--model {path}",
        num_classes=num_classes,
        input_shape=tuple(int(s) for s in input_shape),
    )
    if not isinstance(model, nn.Module):
        raise UsageError(f"--model {path} returned a {type(model).__name__}, not an nn.Module")
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
