"""Image classification with ResNets (topkast.md section 4, supplementary B); top-1 accuracy.

Data: Fashion-MNIST/MNIST IDX files, CIFAR-10 python batches, or a class-per-folder image
directory; a stratified hold-out of the training images is the validation split.

Under several processes each rank loads and augments only its rows of every global batch
(:class:`~alwayssparse.data.images.ImageBatches`) and evaluation counts are all-reduced.
BatchNorm statistics are those of the rank's shard unless the layers are synchronised
(``train.sync_batchnorm``, CUDA only), so only then does a run match one process.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

# The run config holds this task's section: imported as a module, read when a preset is built.
from alwayssparse import runconfig
from alwayssparse.data.images import (
    ImageBatches,
    ImageSet,
    channel_stats,
    count_correct,
    holdout_split,
    load_cifar10,
    load_image_folder,
    load_mnist_like,
    shard_rows,
)
from alwayssparse.models.resnet import ResNetConfig, build_resnet
from alwayssparse.presets import register_preset
from alwayssparse.tasks.base import Task, register_task

IMAGE_FORMATS = ("idx", "cifar10", "folder")


@dataclass
class ImageTaskConfig:
    """Image classification task.

    Attributes:
        model: The ResNet (``arch`` resnet50, cifar_resnet20, ...; classes and channels).
        format: ``"idx"`` (MNIST-like directory), ``"cifar10"`` (python batches directory) or
            ``"folder"`` (``root/class/*.png``; ``image_size`` pixels).
        path: The data directory.
        image_size: Side of the images for ``"folder"``.
        valid_fraction: Share of training images held out for validation.
    """

    model: ResNetConfig = field(
        default_factory=lambda: ResNetConfig(arch="cifar_resnet20", num_classes=10, in_channels=1)
    )
    format: str = "idx"
    path: str = ""
    image_size: int = 224
    valid_fraction: float = 0.1

    def validate(self) -> None:
        self.model.validate()
        if self.format not in IMAGE_FORMATS:
            raise ValueError(
                f"image.format must be one of {list(IMAGE_FORMATS)}, got {self.format!r}"
            )
        if not self.path:
            raise ValueError("image.path is required: the directory holding the images")


@register_task
class ImageTask(Task):
    """Cross-entropy on augmented batches; top-1 accuracy on held-out and test images."""

    name = "image"
    config_class = ImageTaskConfig
    unit = "images"
    metric = "accuracy"

    @classmethod
    def size_label(cls, section: Mapping[str, Any]) -> str:
        """The architecture, with its width if set: ``resnet50``, ``cifar_resnet20/w8``."""
        model = section.get("model", {})
        if "arch" not in model:
            return "?"
        return str(model["arch"]) + (f"/w{model['width']}" if model.get("width") else "")

    @classmethod
    def use_data(cls, section: ImageTaskConfig, corpus: str, paths: list[str]) -> None:
        """Images are not text: refuse, naming the options that give the image directory."""
        raise ValueError(
            f"task image reads images, not --{corpus}: give the directory as image.path=DIR "
            f"(with image.format= one of {list(IMAGE_FORMATS)})"
        )

    def __init__(
        self,
        config: ImageTaskConfig,
        batch_size: int,
        device: torch.device,
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(config, batch_size, device, rank=rank, world_size=world_size)
        if config.format == "folder":
            full = load_image_folder(config.path, config.image_size,
                                     channels=config.model.in_channels)  # fmt: skip
            train, test = holdout_split(full, 0.1, seed=1)
        else:
            splits = (
                load_mnist_like(config.path)
                if config.format == "idx"
                else load_cifar10(config.path)
            )
            train, test = splits.train, splits.test
        self.train_set, self.valid_set = holdout_split(train, config.valid_fraction)
        self.test_set: ImageSet = test
        self.mean, self.std = channel_stats(self.train_set.x)
        self._batches: Iterator[tuple[Tensor, Tensor]] | None = None
        self._order, self._position = torch.empty(0, dtype=torch.long), 0
        self._pending: tuple[Tensor, int] | None = None  # a loaded epoch, resumed at next batch

    def describe_data(self) -> str:
        sizes = (len(self.train_set.y), len(self.valid_set.y), len(self.test_set.y))
        return f"{self.config.format}: train/valid/test images {sizes}"

    def build_model(self) -> nn.Module:
        return build_resnet(self.config.model)

    def train_batch(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        if self._pending is not None:  # continue the epoch of a loaded checkpoint
            order, position = self._pending
            self._batches, self._pending = self._epoch(generator).batches(order, position), None
        for _ in range(2):
            if self._batches is None:
                epoch = self._epoch(generator)
                self._order, self._position = epoch.draw_order(), 0
                self._batches = epoch.batches(self._order)
            try:
                batch = next(self._batches)
            except StopIteration:  # next epoch: a fresh permutation
                self._batches = None
                continue
            self._position += 1
            return batch
        raise ValueError("the training split has fewer images than one batch")

    def _epoch(self, generator: torch.Generator) -> ImageBatches:
        return ImageBatches(self.train_set, self.batch_size, generator, train=True,
                            mean=self.mean, std=self.std, device=self.device, rank=self.rank,
                            world_size=self.world_size)  # fmt: skip

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(model(x), y)

    def units(self, batch: tuple[Tensor, Tensor]) -> int:
        return int(batch[0].shape[0])

    def evaluate(self, model: nn.Module, split: str, max_batches: int | None) -> dict[str, float]:
        data = self.valid_set if split == "valid" else self.test_set
        x, y = data.x, data.y
        if max_batches is not None:
            x, y = x[: max_batches * self.batch_size], y[: max_batches * self.batch_size]
        rows = shard_rows(len(x), self.rank, self.world_size)
        correct = count_correct(model, x[rows], y[rows], self.batch_size, mean=self.mean,
                                std=self.std)  # fmt: skip
        model.train()
        correct_total = self.reduce_sum(torch.tensor([correct], dtype=torch.float64))
        return {"accuracy": float(correct_total[0]) / len(x) if len(x) else 0.0}

    def state_dict(self) -> dict[str, Any]:
        """The epoch's order and how many of its batches were drawn: a resumed run continues
        the epoch (its augmentation draws come from the batch generator, in the checkpoint)."""
        if self._batches is None and self._pending is None:
            return {}
        return {"order": self._order.clone(), "position": self._position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._batches = None
        if state:
            order, position = state["order"], int(state["position"])
            if not isinstance(order, Tensor) or order.numel() != len(self.train_set.y):
                raise ValueError("image task state: its epoch order does not fit the data")
            self._order, self._position = order, position
            self._pending = (order, position)


# -- presets ------------------------------------------------------------------------------------


@register_preset("resnet50-imagenet")
def resnet50_imagenet() -> runconfig.RunConfig:
    """ResNet-50 on ImageNet class folders (image.path=DIR), Top-KAST (80%, 50%).

    As in topkast.md supplementary B: SGD momentum 0.9, lr 1.6 x batch/4096 with a 5% warm-up,
    x0.1 at 30/70/90% of the run, weight decay 1e-4, first/last layers dense; needs
    image.path=DIR with image.format=folder.
    """
    config = runconfig.RunConfig(task="image")
    config.image.model = ResNetConfig(arch="resnet50", num_classes=1000, in_channels=3)
    config.image.format, config.image.image_size = "folder", 224
    batch, steps = 256, 32_000 * 4096 // 256
    config.optim = runconfig.OptimConfig(name="sgd", lr=1.6 * batch / 4096, beta1=0.9,
                                         weight_decay=1e-4, warmup_steps=steps // 20,
                                         schedule="step", grad_clip=0.0)  # fmt: skip
    config.train = runconfig.LoopConfig(steps=steps, batch_size=batch, eval_interval=5000,
                                        checkpoint_interval=5000, final_eval_batches=0)  # fmt: skip
    config.sparsity.method, config.sparsity.sparsity = "topkast", 0.8
    config.sparsity.topkast.backward_sparsity = 0.5
    config.sparsity.layout.dense_first_last = True
    return config


@register_preset("resnet20-fashion-mnist")
def resnet20_fashion_mnist() -> runconfig.RunConfig:
    """CIFAR-style ResNet-20 on Fashion-MNIST IDX files (image.path=DIR), Top-KAST (80%, 50%)."""
    config = resnet50_imagenet()
    config.image.model = ResNetConfig(arch="cifar_resnet20", num_classes=10, in_channels=1)
    config.image.format = "idx"
    config.optim.lr, config.optim.warmup_steps = 0.1, 50
    config.train = runconfig.LoopConfig(steps=1000, batch_size=128, eval_interval=250,
                                        eval_batches=20, checkpoint_interval=250,
                                        final_eval_batches=0)  # fmt: skip
    return config
