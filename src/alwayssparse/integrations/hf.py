"""Hugging Face ``Trainer``: sparse training by adding one callback.

    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[SparsityTrainerCallback(method="topkast", sparsity=0.9)])
    trainer.train()

What the callback does, in the Trainer's events (``compute_loss`` is unchanged, no subclass):

- ``on_init_end`` (end of ``Trainer.__init__``, before ``train()`` builds the optimizer):
  ``Sparsity(model, ...)``; the run length is ``total_steps=`` or ``args.max_steps`` (methods
  with schedules, e.g. RigL, need one of them when training by epochs). A callback added later
  (``trainer.add_callback``) attaches in ``on_train_begin`` instead, which the masked backend
  allows (the sparse backend needs the optimizer built after it).
- ``on_pre_optimizer_step`` (after gradient accumulation and clipping, once per optimizer
  step): adds the regulariser's gradient. Equivalent to adding ``sparsity.regularizer()`` to the
  loss of the accumulated batch, except that gradient clipping does not see it.
- after every optimizer step that ran (a post-step hook on the torch optimizer inside
  accelerate's wrapper, so a step skipped by the fp16 scaler is no step):
  ``sparsity.step(step, optimizer)``.

Checkpoints and ``resume_from_checkpoint`` need nothing more: the model's state dict (what
``save_pretrained`` writes) holds the masks and the sparsity state, and the Trainer loads it
through ``model.load_state_dict``. ``from_pretrained`` of such a checkpoint gives a plain model
with the same function (weights theta * A); ``sparsity.plain_state_dict()`` writes one without
the extra keys.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from alwayssparse.integrations._common import SparsityDriver
from alwayssparse.sparsity import Sparsity, SparsityConfig

__all__ = ["SparsityTrainerCallback"]


class SparsityTrainerCallback(TrainerCallback):
    """Makes the Trainer's model sparse and trains it so.

    Args:
        config: A :class:`~alwayssparse.SparsityConfig` (or ``None``: defaults plus ``options``).
        seed: Seed of the method's random choices.
        total_steps: Run length in optimizer steps (default: ``args.max_steps``).
        **options: Keyword options of :class:`~alwayssparse.Sparsity`.
    """

    def __init__(
        self,
        config: SparsityConfig | None = None,
        *,
        seed: int = 0,
        total_steps: int | None = None,
        **options: Any,
    ) -> None:
        self.driver = SparsityDriver(config, seed=seed, total_steps=total_steps, **options)

    @property
    def sparsity(self) -> Sparsity | None:
        """The :class:`~alwayssparse.Sparsity` once attached."""
        return self.driver.sparsity

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model = kwargs.get("model")
        if model is not None:
            self.driver.attach(model, args.max_steps if args.max_steps > 0 else None)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        sparsity = self.driver.attach(kwargs["model"], state.max_steps or None)
        if sparsity.upcoming_step != state.global_step:
            raise ValueError(
                f"the Trainer starts at step {state.global_step} but the model's sparsity state "
                f"is at step {sparsity.upcoming_step}: resume from a checkpoint of this model "
                "under Sparsity (its state dict carries the masks and the sparsity state)"
            )
        has_regularizer = sparsity.method.regularizer(sparsity.tensors) is not None
        if args.fp16 and args.max_grad_norm <= 0 and has_regularizer:
            raise ValueError(
                "fp16 loss scaling without gradient clipping leaves the gradients scaled until "
                "the optimizer step, so the regulariser's gradient cannot be added: set "
                "max_grad_norm > 0"
            )
        optimizer = kwargs.get("optimizer")
        if optimizer is None:
            raise ValueError("the Trainer passed no optimizer to on_train_begin")
        self.driver.hook_optimizer(self.driver.holding_optimizer([optimizer]))

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.driver.add_regularizer_gradient()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.driver.unhook()
