"""PyTorch Lightning: sparse training by adding one callback.

    sparse = SparsityCallback(method="rigl", sparsity=0.9)
    trainer = pl.Trainer(max_steps=10_000, callbacks=[sparse])
    trainer.fit(module, data)

What the callback does, in Lightning's hooks (the user's ``training_step`` is unchanged):

- ``setup`` (stage ``fit``, before ``configure_optimizers``): ``Sparsity(pl_module, ...)``, or of
  the submodule named ``module=``; the run length is ``total_steps=`` or ``trainer.max_steps`` or
  ``trainer.estimated_stepping_batches``. The object is also ``pl_module.sparsity``.
- ``on_before_optimizer_step`` (after the closure's backward and the precision plugin's unscaling,
  before gradient clipping, once per optimizer step whatever ``accumulate_grad_batches``): adds
  the regulariser's gradient, exactly as ``loss + sparsity.regularizer()`` would.
- after every optimizer step that ran (a post-step hook on the optimizer, registered in
  ``on_fit_start``): ``sparsity.step(step, optimizer)``.

Manual optimization works the same (Lightning calls ``on_before_optimizer_step`` from
``optimizer.step()``). Checkpoints (``ModelCheckpoint``, ``trainer.save_checkpoint``,
``fit(ckpt_path=...)``) need nothing more: ``pl_module.state_dict()`` holds the masks and the
sparsity state. One optimizer must hold the sparse weights.
"""

from __future__ import annotations

from typing import Any

try:
    import pytorch_lightning as pl
except ImportError:  # the unified package
    import lightning.pytorch as pl  # type: ignore[no-redef]

from alwayssparse.integrations._common import SparsityDriver
from alwayssparse.sparsity import Sparsity, SparsityConfig

__all__ = ["SparsityCallback"]


class SparsityCallback(pl.Callback):
    """Makes the LightningModule (or its submodule ``module``) sparse and trains it so.

    Args:
        config: A :class:`~alwayssparse.SparsityConfig` (or ``None``: defaults plus ``options``).
        module: Name of the submodule to make sparse (default: the whole LightningModule).
        seed: Seed of the method's random choices.
        total_steps: Run length in optimizer steps (default: ``trainer.max_steps``, else
            ``trainer.estimated_stepping_batches``).
        **options: Keyword options of :class:`~alwayssparse.Sparsity`.
    """

    def __init__(
        self,
        config: SparsityConfig | None = None,
        *,
        module: str | None = None,
        seed: int = 0,
        total_steps: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        self.module = module
        self.driver = SparsityDriver(config, seed=seed, total_steps=total_steps, **options)

    @property
    def sparsity(self) -> Sparsity | None:
        """The :class:`~alwayssparse.Sparsity` once attached (``setup``)."""
        return self.driver.sparsity

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.driver.sparsity is not None:
            return
        target = pl_module if self.module is None else pl_module.get_submodule(self.module)
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        if total is None and self.driver.total_steps is None:
            estimated = trainer.estimated_stepping_batches
            total = int(estimated) if estimated != float("inf") else None
        sparsity = self.driver.attach(target, total)
        object.__setattr__(pl_module, "sparsity", sparsity)  # not a submodule

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.driver.hook_optimizer(self.driver.holding_optimizer(list(trainer.optimizers)))

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        self.driver.add_regularizer_gradient()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.driver.unhook()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self.driver.unhook()
