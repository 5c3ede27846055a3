"""State dicts of sparse models through the ecosystem's paths: state_dict(), save_pretrained.

A model under :class:`~alwayssparse.Sparsity` keeps its sparse weights in the backend's form
(the masked backend: ``layer.parametrizations.weight.original`` and the masks; the sparse
backend: ``layer.values``, ``layer.units``...), which a plain copy of the model does not know. So
that no path silently re-initialises a layer, the state dict of a sparse model holds, besides
those keys,

    layer.weight                   alpha = theta on A, zero elsewhere: the plain layer's key, so a
                                   plain model (``from_pretrained``, ``load_state_dict(...,
                                   strict=False)``) loads the same function; a strict load of it
                                   into a plain model refuses, naming the extra keys
    _alwayssparse.config           the Sparsity config (JSON, as uint8), the random generator, the
    _alwayssparse.generator        next step and the explored positions: what
    _alwayssparse.upcoming_step    ``sparsity.state_dict()`` holds, so that a checkpoint written
    _alwayssparse.ever_active.NAME by any trainer (HF ``Trainer``, Lightning, ``torch.save``)
                                   resumes the sparse run exactly

and loading such a state dict into the sparse model restores theta, the masks and the sparsity
state (``layer.weight`` is then redundant and skipped). A state dict holding only a plain
``layer.weight`` for a sparse layer is refused with a message: load plain weights before
``Sparsity(model, ...)``.

:func:`plain_state_dict` gives exactly the keys of the exported model (``weight`` = alpha, no
masks, no sparsity state): ``model.save_pretrained(dir, state_dict=plain_state_dict(model))``
writes a checkpoint that a plain model loads strictly, without a word of warning.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

STATE_PREFIX = "_alwayssparse."

_PLAIN = contextvars.ContextVar("alwayssparse_plain_state_dict", default=False)


@contextlib.contextmanager
def plain_state() -> Iterator[None]:
    """Inside, ``state_dict()`` of a sparse model holds only what the exported model would."""
    token = _PLAIN.set(True)
    try:
        yield
    finally:
        _PLAIN.reset(token)


def plain_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` as the exported model would hold it: every sparse weight as
    ``weight`` = theta on A (zero elsewhere), no masks, stored values or sparsity state."""
    with plain_state():
        return model.state_dict()


def register_weight_hooks(
    module: nn.Module,
    attr: str,
    alpha: Callable[[], Tensor],
    internal: tuple[str, ...],
    describe: str,
) -> list[RemovableHandle]:
    """State-dict hooks of one sparse weight held by ``module`` in a backend's own form.

    Args:
        module: The layer (the masked backend's parametrized layer, or a ``SparseLinear``).
        attr: The plain weight's name (``"weight"``).
        alpha: Builds theta on A as a dense tensor of the plain weight's shape.
        internal: The backend's keys below the module's prefix (``"parametrizations.weight."``,
            ``"values"``...); a key starting with the first one marks a sparse checkpoint.
        describe: What the backend's keys are, for the error message.
    """

    def save(module: nn.Module, state: dict[str, Any], prefix: str, _metadata: Any) -> None:
        if _PLAIN.get():
            for key in [k for k in state if k.startswith(prefix)]:
                if any(key[len(prefix) :].startswith(name) for name in internal):
                    del state[key]
        state[prefix + attr] = alpha().detach()

    def load(
        module: nn.Module,
        state: dict[str, Any],
        prefix: str,
        _metadata: Any,
        _strict: bool,
        _missing: list[str],
        _unexpected: list[str],
        errors: list[str],
    ) -> None:
        key = prefix + attr
        if key not in state:
            return
        if any(k.startswith(prefix + internal[0]) for k in state):
            del state[key]  # theta and the masks are loaded; alpha is derived from them
            return
        del state[key]
        errors.append(
            f"{key} is a plain weight, but {prefix[:-1] or 'this layer'} is sparse ({describe}) "
            "and the state dict holds no sparse state for it: load plain (pretrained) weights "
            "into the model before Sparsity(model, ...), or load this checkpoint into a plain "
            "model"
        )

    return [
        module.register_state_dict_post_hook(save),
        module.register_load_state_dict_pre_hook(load),
    ]


def register_sparsity_state_hooks(
    model: nn.Module,
    state_dict: Callable[[], dict[str, Any]],
    load_state_dict: Callable[[dict[str, Any]], None],
    names: list[str],
) -> list[RemovableHandle]:
    """Carry ``sparsity.state_dict()`` inside ``model.state_dict()`` (keys ``_alwayssparse.*``)
    and restore it after ``model.load_state_dict`` of a state dict that holds it."""
    pending: list[dict[str, Any]] = []

    def save(module: nn.Module, state: dict[str, Any], prefix: str, _metadata: Any) -> None:
        if _PLAIN.get():
            return
        state.update({prefix + k: v for k, v in encode_state(state_dict()).items()})

    def load(
        module: nn.Module,
        state: dict[str, Any],
        prefix: str,
        *_args: Any,
    ) -> None:
        pending.clear()  # what an earlier, failed load left
        start = prefix + STATE_PREFIX
        found = {k[len(prefix) :]: state.pop(k) for k in [k for k in state if k.startswith(start)]}
        if found:
            pending.append(decode_state(found, names))

    def after_load(module: nn.Module, _incompatible: Any) -> None:
        while pending:
            load_state_dict(pending.pop())

    return [
        model.register_state_dict_post_hook(save),
        model.register_load_state_dict_pre_hook(load),
        model.register_load_state_dict_post_hook(after_load),
    ]


def encode_state(state: dict[str, Any]) -> dict[str, Tensor]:
    """``sparsity.state_dict()`` as flat tensors (safetensors holds nothing else)."""
    config = json.dumps(state["config"], sort_keys=True).encode()
    encoded = {
        STATE_PREFIX + "config": torch.frombuffer(bytearray(config), dtype=torch.uint8),
        STATE_PREFIX + "generator": state["generator"].clone(),
        STATE_PREFIX + "upcoming_step": torch.tensor(int(state["upcoming_step"])),
    }
    for name, mask in state["ever_active"].items():
        encoded[f"{STATE_PREFIX}ever_active.{name}"] = mask
    return encoded


def decode_state(encoded: dict[str, Tensor], names: list[str]) -> dict[str, Any]:
    """The inverse of :func:`encode_state` (keys without the model's prefix)."""
    keys = ("config", "generator", "upcoming_step")
    missing = [k for k in keys if STATE_PREFIX + k not in encoded]
    if missing:
        raise ValueError(f"the sparsity state in this state dict lacks {missing}")
    config = bytes(encoded[STATE_PREFIX + "config"].to(torch.uint8).tolist()).decode()
    ever = f"{STATE_PREFIX}ever_active."
    return {
        "config": json.loads(config),
        "generator": encoded[STATE_PREFIX + "generator"].to(torch.uint8),
        "upcoming_step": int(encoded[STATE_PREFIX + "upcoming_step"]),
        "ever_active": {name: encoded[ever + name] for name in names if ever + name in encoded},
    }
