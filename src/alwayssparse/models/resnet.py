"""Residual networks for image classification: ImageNet ResNets and CIFAR-size ResNets.

Implements the architectures of He, Zhang, Ren and Sun, "Deep Residual Learning for
Image Recognition" (CVPR 2016):

* **ImageNet ResNets** (paper section 3.4 and table 1): ``resnet18`` / ``resnet34``
  (basic blocks) and ``resnet50`` / ``resnet101`` / ``resnet152`` (bottleneck blocks).
  ResNet-50 is the model of the Top-KAST ImageNet experiments (Jayakumar et al. 2020,
  section 4 and supplementary B, "a ResNet-50 set up as in prior work"): bottleneck
  blocks ``[3, 4, 6, 3]``, a 7x7/2 convolution plus 3x3/2 max-pool stem, BatchNorm after
  every convolution and 1000 classes, 25,557,032 parameters. We use the "v1.5" variant of
  torchvision (and of the RigL / Top-KAST reference code): in a down-sampling bottleneck
  the stride sits on the 3x3 convolution rather than on the first 1x1 convolution, which
  does not change the parameter count but is about 0.5% more accurate. Projection
  shortcuts (option B: a strided 1x1 convolution plus BatchNorm) are used wherever the
  shape changes.
* **CIFAR ResNets** (paper section 4.2): ``cifar_resnet{6n+2}`` (ResNet-20/32/44/56/110,
  ...) with a 3x3 stem, three stages of ``n`` basic blocks with 16/32/64 channels and
  feature maps 32/16/8, global average pooling and a linear classifier. Shortcuts use
  **option A** as in the paper's CIFAR experiments: identity, and where the shape changes
  a parameter-free shortcut that subsamples with stride 2 and zero-pads the new channels.
  This gives ResNet-20 its published 0.27M parameters and means every weight of the
  model lives in a convolution or the classifier that the sparsity library can mask.
* ``resnet18_cifar``: the widely used CIFAR adaptation of ResNet-18 (3x3/1 stem, no
  max-pool, basic blocks ``[2, 2, 2, 2]`` with 64-512 channels, projection shortcuts).

All weights live in ``nn.Conv2d`` / ``nn.Linear`` modules that are *called* in
``forward``, so a ``torch.nn.utils.parametrize`` sparsity parametrization of
``module.weight`` is always applied. Module names follow torchvision (``conv1``,
``bn1``, ``layer1`` ... ``layer4``, ``fc``; blocks have ``conv1``/``bn1``/...,
``downsample``), so the "first and last layer dense" option finds the stem ``conv1``
and the classifier ``fc``, and ImageNet state dicts are key-compatible with
torchvision's.

Shapes use ``B`` = batch, ``C`` = channels, ``H`` x ``W`` = spatial size and ``K`` =
``num_classes``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "RESNET_PRESETS",
    "BasicBlock",
    "Bottleneck",
    "PadShortcut",
    "ResNet",
    "ResNetConfig",
    "build_resnet",
]

# ImageNet architectures: name -> (block type, blocks per stage). He et al. 2016, table 1.
_IMAGENET_ARCHS: dict[str, tuple[str, tuple[int, ...]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}
_CIFAR_ARCH = re.compile(r"cifar_resnet(\d+)")


@dataclass
class ResNetConfig:
    """Hyper-parameters of :class:`ResNet`.

    Attributes:
        arch: ``"resnet18"``, ``"resnet34"``, ``"resnet50"``, ``"resnet101"``,
            ``"resnet152"`` (ImageNet stem), ``"cifar_resnet{D}"`` with depth
            ``D = 6n + 2`` (e.g. ``cifar_resnet20``, ``cifar_resnet56``), or
            ``"resnet18_cifar"``.
        num_classes: Number of output logits ``K``.
        in_channels: Channels of the input images: 3 for RGB (ImageNet, CIFAR), 1 for
            greyscale (MNIST, Fashion-MNIST).
        width: Channels of the first stage; later stages double it. ``None`` selects the
            published value: 64 for the ImageNet ResNets and ``resnet18_cifar``, 16 for
            the ``cifar_resnet`` family. Bottleneck stages output ``4 * width * 2**i``.
        zero_init_residual: If true, the last BatchNorm scale (gamma) of every residual
            block is initialised to zero, so each block starts as the identity (Goyal et
            al. 2017, "Accurate, Large Minibatch SGD", section 5.1); helps large-batch
            training.
    """

    arch: str = "resnet50"
    num_classes: int = 1000
    in_channels: int = 3
    width: int | None = None
    zero_init_residual: bool = False

    def validate(self) -> None:
        """Checks that the configuration describes a buildable model.

        Raises:
            ValueError: If ``arch`` is unknown (or a ``cifar_resnet`` depth is not
                ``6n + 2``) or a size is not a positive integer. The message names the
                offending field.
        """
        _arch_spec(self.arch)  # raises for an unknown arch
        for name in ("num_classes", "in_channels", "width"):
            value = getattr(self, name)
            if name == "width" and value is None:
                continue
            # bool is a subclass of int; reject it so that e.g. width=True is an error.
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class _ArchSpec:
    """Resolved architecture: stem kind, block kind, blocks per stage, default width."""

    stem: str  # "imagenet" (7x7/2 + max-pool) or "cifar" (3x3/1)
    block: str  # "basic" or "bottleneck"
    layers: tuple[int, ...]
    default_width: int
    shortcut: str  # "B" (1x1 conv projection) or "A" (subsample + zero padding)


def _arch_spec(arch: str) -> _ArchSpec:
    """Maps an architecture name to its :class:`_ArchSpec`.

    Raises:
        ValueError: If ``arch`` is unknown or a CIFAR depth is not of the form ``6n + 2``.
    """
    if arch in _IMAGENET_ARCHS:
        block, layers = _IMAGENET_ARCHS[arch]
        return _ArchSpec("imagenet", block, layers, 64, "B")
    if arch == "resnet18_cifar":
        return _ArchSpec("cifar", "basic", (2, 2, 2, 2), 64, "B")
    match = _CIFAR_ARCH.fullmatch(arch)
    if match is not None:
        depth = int(match.group(1))
        # 1 stem conv + 3 stages x n blocks x 2 convs + 1 fc = 6n + 2 weighted layers.
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"cifar_resnet depth must be 6n + 2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        return _ArchSpec("cifar", "basic", (n, n, n), 16, "A")
    known = ", ".join([*_IMAGENET_ARCHS, "resnet18_cifar", "cifar_resnet{6n+2}"])
    raise ValueError(f"unknown arch {arch!r}; expected one of {known}")


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias (the following BatchNorm has one)."""
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution without bias (the following BatchNorm has one)."""
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)


class PadShortcut(nn.Module):
    """Option-A shortcut of He et al. 2016 (section 4.2): subsample, then zero-pad channels.

    Parameter-free: the identity on the old channels, spatially subsampled by taking
    every ``stride``-th pixel, with zeros for the ``out_ch - in_ch`` new channels.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        if out_ch < in_ch:
            raise ValueError(f"option-A shortcut cannot shrink channels ({in_ch} -> {out_ch})")
        self.stride = stride
        self.extra = out_ch - in_ch

    def forward(self, x: Tensor) -> Tensor:
        """Maps ``[B, C, H, W]`` to ``[B, C + extra, ceil(H / s), ceil(W / s)]``."""
        x = x[:, :, :: self.stride, :: self.stride]  # [B, C, H', W']
        # Pad the channel dim (third from last): pad spec is (W_lo, W_hi, H_lo, H_hi, C_lo, C_hi).
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))


def _shortcut(in_ch: int, out_ch: int, stride: int, kind: str) -> nn.Module | None:
    """Returns the shortcut for a block, or ``None`` where the identity fits."""
    if stride == 1 and in_ch == out_ch:
        return None
    if kind == "A":
        return PadShortcut(in_ch, out_ch, stride)
    # Option B: a learned projection, named ``downsample`` with torchvision's layout.
    return nn.Sequential(_conv1x1(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (He et al. 2016, figure 5 left).

    Attributes:
        conv1: 3x3 convolution carrying the block's stride.
        conv2: 3x3 convolution.
        bn2: The last BatchNorm; zero-initialised when ``zero_init_residual`` is set.
        downsample: Shortcut module, or ``None`` for the identity.
    """

    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int = 1, shortcut: str = "B") -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = _conv3x3(in_ch, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_ch, out_ch, stride, shortcut)

    def last_bn(self) -> nn.BatchNorm2d:
        """Returns the BatchNorm whose output is added to the shortcut."""
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        """Maps ``[B, C_in, H, W]`` to ``[B, width, H / stride, W / stride]``."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))  # [B, width, H', W']
        out = self.bn2(self.conv2(out))  # [B, width, H', W']
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4) with a residual connection (figure 5 right).

    The stride is on the 3x3 convolution (ResNet "v1.5", as torchvision), not on the
    first 1x1 convolution as in the original paper.

    Attributes:
        conv1: 1x1 convolution reducing to ``width`` channels.
        conv2: 3x3 convolution carrying the block's stride.
        conv3: 1x1 convolution expanding to ``4 * width`` channels.
        bn3: The last BatchNorm; zero-initialised when ``zero_init_residual`` is set.
        downsample: Shortcut module, or ``None`` for the identity.
    """

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1, shortcut: str = "B") -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = _conv1x1(in_ch, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, out_ch)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_ch, out_ch, stride, shortcut)

    def last_bn(self) -> nn.BatchNorm2d:
        """Returns the BatchNorm whose output is added to the shortcut."""
        return self.bn3

    def forward(self, x: Tensor) -> Tensor:
        """Maps ``[B, C_in, H, W]`` to ``[B, 4 * width, H / stride, W / stride]``."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))  # [B, width, H, W]
        out = self.relu(self.bn2(self.conv2(out)))  # [B, width, H', W']
        out = self.bn3(self.conv3(out))  # [B, 4 * width, H', W']
        return self.relu(out + identity)


class ResNet(nn.Module):
    """A residual network: stem, stages of residual blocks, global pool, linear classifier.

    Attributes:
        config: The (validated) configuration.
        conv1: Stem convolution (7x7/2 for ImageNet, 3x3/1 for CIFAR).
        bn1: Stem BatchNorm.
        maxpool: 3x3/2 max-pool for the ImageNet stem, identity for the CIFAR stem.
        layer1 ... layerN: ``nn.Sequential`` stages of blocks; every stage after the
            first halves the resolution and doubles the width.
        fc: ``nn.Linear(C_last, K)`` classifier.
    """

    def __init__(self, config: ResNetConfig) -> None:
        """Builds and initialises the model.

        Args:
            config: Model hyper-parameters; validated here.

        Raises:
            ValueError: If ``config`` is invalid (see :meth:`ResNetConfig.validate`).
        """
        super().__init__()
        config.validate()
        self.config = config
        spec = _arch_spec(config.arch)
        width = config.width if config.width is not None else spec.default_width
        block_cls: type[BasicBlock] | type[Bottleneck] = (
            Bottleneck if spec.block == "bottleneck" else BasicBlock
        )
        self._build_stem(spec.stem, config.in_channels, width)
        in_ch = width
        self.stage_names: list[str] = []
        for i, n_blocks in enumerate(spec.layers):
            stage_width = width * 2**i
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n_blocks):
                blocks.append(block_cls(in_ch, stage_width, stride if j == 0 else 1, spec.shortcut))
                in_ch = stage_width * block_cls.expansion
            name = f"layer{i + 1}"
            self.add_module(name, nn.Sequential(*blocks))
            self.stage_names.append(name)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, config.num_classes)
        self._init_weights()

    def _build_stem(self, stem: str, in_channels: int, width: int) -> None:
        """Creates ``conv1``, ``bn1``, ``relu`` and ``maxpool``."""
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            # Small images: keep full resolution in the first stage (He et al. section 4.2).
            self.conv1 = _conv3x3(in_channels, width)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)

    def blocks(self) -> list[BasicBlock | Bottleneck]:
        """Returns all residual blocks in forward order."""
        return [b for b in self.modules() if isinstance(b, BasicBlock | Bottleneck)]

    def _init_weights(self) -> None:
        """Kaiming initialisation (He et al. 2015, "Delving Deep into Rectifiers").

        Convolutions get ``kaiming_normal_`` with ``mode="fan_out"`` and the ReLU gain,
        as in torchvision and the RigL / Top-KAST ResNet-50; BatchNorms scale 1 and
        shift 0; the classifier keeps PyTorch's default (Kaiming-uniform) ``nn.Linear``
        initialisation. With ``zero_init_residual`` the last BatchNorm scale of every
        block is zero, so the residual branch starts switched off.
        """
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if self.config.zero_init_residual:
            for block in self.blocks():
                nn.init.zeros_(block.last_bn().weight)

    def forward_features(self, x: Tensor) -> Tensor:
        """Maps images ``[B, C_in, H, W]`` to pooled features ``[B, C_last]``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # [B, width, H/s, W/s]
        for name in self.stage_names:
            x = getattr(self, name)(x)  # [B, C_i, H_i, W_i]
        return torch.flatten(self.avgpool(x), 1)  # [B, C_last, 1, 1] -> [B, C_last]

    def forward(self, x: Tensor) -> Tensor:
        """Computes class logits.

        Args:
            x: Float images of shape ``[B, in_channels, H, W]``; any ``H, W`` large
                enough to survive the down-sampling (at least 32 for ImageNet models).

        Returns:
            Logits of shape ``[B, K]``.

        Raises:
            ValueError: If ``x`` is not 4-D or has the wrong number of channels.
        """
        if x.dim() != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"expected input [B, {self.config.in_channels}, H, W], got {tuple(x.shape)}"
            )
        return self.fc(self.forward_features(x))  # [B, K]

    def num_parameters(self) -> int:
        """Returns the number of scalar parameters (BatchNorm buffers not included)."""
        return sum(p.numel() for p in self.parameters())


RESNET_PRESETS: dict[str, ResNetConfig] = {
    "resnet18": ResNetConfig("resnet18"),
    "resnet34": ResNetConfig("resnet34"),
    "resnet50": ResNetConfig("resnet50"),
    "resnet101": ResNetConfig("resnet101"),
    "resnet152": ResNetConfig("resnet152"),
    "cifar_resnet20": ResNetConfig("cifar_resnet20", num_classes=10),
    "cifar_resnet32": ResNetConfig("cifar_resnet32", num_classes=10),
    "cifar_resnet44": ResNetConfig("cifar_resnet44", num_classes=10),
    "cifar_resnet56": ResNetConfig("cifar_resnet56", num_classes=10),
    "cifar_resnet110": ResNetConfig("cifar_resnet110", num_classes=10),
    "resnet18_cifar": ResNetConfig("resnet18_cifar", num_classes=10),
    # Fashion-MNIST / MNIST: greyscale 28x28 input.
    "mnist_resnet20": ResNetConfig("cifar_resnet20", num_classes=10, in_channels=1),
    # For tests and smoke runs: one block per stage, 8/16/32 channels (~20k parameters).
    "tiny": ResNetConfig("cifar_resnet8", num_classes=10, width=8),
}
"""Named configurations for :func:`build_resnet`. Copy before changing fields."""


def build_resnet(config: ResNetConfig | str, **overrides: object) -> ResNet:
    """Builds a :class:`ResNet` from a config or a :data:`RESNET_PRESETS` name.

    Args:
        config: A :class:`ResNetConfig`, or the name of a preset.
        **overrides: Fields to replace, e.g. ``num_classes=100`` or ``in_channels=1``.

    Returns:
        The initialised model (on the default device; wrap the call in
        ``with torch.device("meta"):`` to build it without allocating memory).

    Raises:
        KeyError: If ``config`` names no preset.
        ValueError: If the resulting configuration is invalid.
    """
    if isinstance(config, str):
        if config not in RESNET_PRESETS:
            raise KeyError(f"unknown ResNet preset {config!r}; known: {sorted(RESNET_PRESETS)}")
        config = RESNET_PRESETS[config]
    # replace() copies, so presets shared at module level are never mutated.
    return ResNet(replace(config, **overrides))  # type: ignore[arg-type]
