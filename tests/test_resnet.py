"""Tests for alwayssparse.models.resnet: architecture sizes, shapes, init and trainability."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from alwayssparse.data.images import ImageBatches, ImageSet
from alwayssparse.models.resnet import (
    RESNET_PRESETS,
    BasicBlock,
    Bottleneck,
    PadShortcut,
    ResNet,
    ResNetConfig,
    build_resnet,
)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Runs every test of this module single-threaded.

    These small models gain little from intra-op threads, and on a busy 2-core machine
    OpenMP threads waiting on each other made the training test ~10x slower.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _meta_params(config: ResNetConfig | str, **overrides: object) -> int:
    """Parameter count of a model built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        return build_resnet(config, **overrides).num_parameters()


@pytest.mark.parametrize(
    ("arch", "expected"),
    [
        # torchvision's counts for the same architectures.
        ("resnet18", 11_689_512),
        ("resnet34", 21_797_672),
        ("resnet50", 25_557_032),
        ("resnet101", 44_549_160),
        ("resnet152", 60_192_808),
    ],
)
def test_imagenet_parameter_counts(arch: str, expected: int) -> None:
    assert _meta_params(arch) == expected


@pytest.mark.parametrize(
    ("arch", "expected"),
    [
        # He et al. 2016, table 6: 0.27M, 0.46M, 0.66M, 0.85M, 1.7M (option A shortcuts).
        ("cifar_resnet20", 269_722),
        ("cifar_resnet32", 464_154),
        ("cifar_resnet44", 658_586),
        ("cifar_resnet56", 853_018),
        ("cifar_resnet110", 1_727_962),
        ("resnet18_cifar", 11_173_962),
    ],
)
def test_cifar_parameter_counts(arch: str, expected: int) -> None:
    assert _meta_params(arch) == expected


def test_resnet50_structure_and_forward() -> None:
    torch.manual_seed(0)
    model = build_resnet("resnet50").eval()
    assert isinstance(model.conv1, nn.Conv2d) and model.conv1.kernel_size == (7, 7)
    assert isinstance(model.fc, nn.Linear) and model.fc.out_features == 1000
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    # v1.5: the stride of a down-sampling bottleneck is on its 3x3 conv.
    first = model.get_submodule("layer2.0")
    assert isinstance(first, Bottleneck)
    assert first.conv1.stride == (1, 1) and first.conv2.stride == (2, 2)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 1000)
    assert torch.isfinite(out).all()


def test_state_dict_keys_follow_torchvision() -> None:
    with torch.device("meta"):
        keys = set(build_resnet("resnet50").state_dict())
    for key in (
        "conv1.weight",
        "bn1.running_mean",
        "layer1.0.downsample.0.weight",
        "layer4.2.bn3.weight",
        "fc.weight",
        "fc.bias",
    ):
        assert key in keys


@pytest.mark.parametrize(
    ("preset", "in_channels", "size"),
    [("cifar_resnet20", 3, 32), ("mnist_resnet20", 1, 28), ("resnet18_cifar", 3, 32)],
)
def test_cifar_forward_shapes(preset: str, in_channels: int, size: int) -> None:
    model = build_resnet(preset).eval()
    with torch.no_grad():
        out = model(torch.randn(3, in_channels, size, size))
    assert out.shape == (3, 10)


def test_cifar_option_a_shortcuts_are_parameter_free() -> None:
    model = build_resnet("cifar_resnet20", num_classes=100)
    assert model.fc.out_features == 100
    shortcuts = [b.downsample for b in model.blocks() if b.downsample is not None]
    assert len(shortcuts) == 2  # entering stage 2 and stage 3
    assert all(isinstance(s, PadShortcut) for s in shortcuts)
    x = torch.randn(2, 16, 32, 32)
    y = PadShortcut(16, 32, 2)(x)
    assert y.shape == (2, 32, 16, 16)
    assert torch.equal(y[:, :16], x[:, :, ::2, ::2])
    assert torch.equal(y[:, 16:], torch.zeros_like(y[:, 16:]))
    assert all(isinstance(b, BasicBlock) for b in model.blocks())
    # Only the convolutions, BatchNorms and the classifier hold parameters.
    owners = {type(m) for m in model.modules() if any(True for _ in m.parameters(recurse=False))}
    assert owners == {nn.Conv2d, nn.BatchNorm2d, nn.Linear}


def test_zero_init_residual_and_kaiming_init() -> None:
    torch.manual_seed(0)
    model = build_resnet("cifar_resnet20", zero_init_residual=True).requires_grad_(False)
    assert all(float(b.last_bn().weight.abs().sum()) == 0.0 for b in model.blocks())
    assert float(model.bn1.weight.sum()) == model.bn1.num_features  # other BNs: gamma 1
    plain = build_resnet("cifar_resnet20").requires_grad_(False)
    assert all(float(b.last_bn().weight.min()) == 1.0 for b in plain.blocks())
    # kaiming_normal_(mode="fan_out"): std = sqrt(2 / (out_channels * k * k)).
    conv = plain.get_submodule("layer3.0.conv2")
    assert isinstance(conv, nn.Conv2d)
    expected = (2.0 / (conv.out_channels * 9)) ** 0.5
    assert abs(float(conv.weight.std()) - expected) < 0.1 * expected


class _ZeroMask(nn.Module):
    """Parametrization that masks every weight to zero."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * 0.0


def test_weights_are_read_through_modules() -> None:
    """A parametrize mask on every conv must take effect (no cached / functional weights)."""
    # A narrow ResNet-50 covers stem, bottlenecks and projection shortcuts cheaply.
    model = build_resnet("resnet50", width=8, num_classes=5).eval()
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.utils.parametrize.register_parametrization(module, "weight", _ZeroMask())
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    # All convs zero -> eval BatchNorm outputs its shift (0) -> pooled features 0 -> bias.
    assert torch.allclose(out, model.fc.bias.expand(2, 5))


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="6n \\+ 2"):
        ResNetConfig("cifar_resnet21").validate()
    with pytest.raises(ValueError, match="unknown arch"):
        ResNet(ResNetConfig("vgg16"))
    with pytest.raises(ValueError, match="num_classes"):
        ResNetConfig("resnet50", num_classes=0).validate()
    with pytest.raises(KeyError, match="unknown ResNet preset"):
        build_resnet("resnet51")
    with pytest.raises(ValueError, match="expected input"):
        build_resnet("tiny")(torch.randn(2, 1, 32, 32))


def test_presets_are_not_mutated() -> None:
    build_resnet("tiny", num_classes=3)
    assert RESNET_PRESETS["tiny"].num_classes == 10
    for config in RESNET_PRESETS.values():
        config.validate()


def test_sgd_steps_lower_the_loss() -> None:
    """A tiny CIFAR ResNet fits a small synthetic 2-class problem within a few steps."""
    gen = torch.Generator().manual_seed(0)
    n = 64
    y = torch.arange(n) % 2
    # Class 0: dark images, class 1: bright images, plus noise. Learnable in a few steps.
    base = torch.where(y[:, None, None, None] == 1, 170.0, 70.0)
    noise = torch.randn(n, 3, 16, 16, generator=gen) * 30.0
    x = (base + noise).clamp(0, 255).to(torch.uint8)
    data = ImageSet(x, y.long())
    torch.manual_seed(0)
    model = build_resnet("tiny", num_classes=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    batches = ImageBatches(data, 16, gen, train=True)
    eval_batches = ImageBatches(data, n, mean=batches.mean, std=batches.std)
    eval_x, eval_y = next(iter(eval_batches))  # the whole set, un-augmented

    def full_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss = float(loss_fn(model(eval_x), eval_y))
        model.train()
        return loss

    before = full_loss()
    for _ in range(3):  # 3 epochs x 4 steps
        for xb, yb in batches:
            opt.zero_grad()
            loss_fn(model(xb), yb).backward()
            opt.step()
    after = full_loss()
    assert after < 0.5 * before, (before, after)
