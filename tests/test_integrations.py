"""The trainer integrations in the real loops: PyTorch Lightning and the Hugging Face Trainer.

Each callback run is compared with the hand-written three-line loop on the same model, data and
optimizer: the masks must be identical and the weights equal to float rounding, which checks
that the regulariser's gradient and ``sparsity.step`` land where the loop puts them. Resuming
from the trainers' own checkpoints must continue the run exactly.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from alwayssparse import Sparsity

pl = pytest.importorskip("pytorch_lightning")
transformers = pytest.importorskip("transformers")

from alwayssparse.integrations import SparsityCallback, SparsityTrainerCallback  # noqa: E402

OPTIONS: dict[str, dict[str, Any]] = {
    "topkast": {"sparsity": 0.75, "backward_sparsity": 0.5, "exploration_coefficient": 1e-2},
    "rigl": {"sparsity": 0.75, "update_interval": 2},
}


@pytest.fixture(autouse=True)
def _quiet() -> None:
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")


# -- Lightning ------------------------------------------------------------------------------


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                                 nn.Linear(32, 4))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g))
            for _ in range(8)]  # fmt: skip


def _loader(epoch: int = 8) -> DataLoader:
    return DataLoader(_batches()[:epoch], batch_size=None)  # the items are batches already


def _lightning(callback: SparsityCallback, steps: int, tmp_path: Path, **kwargs: Any) -> Any:
    return pl.Trainer(max_steps=steps, callbacks=[callback], accelerator="cpu", logger=False,
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, **kwargs)  # fmt: skip


def _reference(method: str, steps: int, epoch: int = 8) -> tuple[Classifier, Sparsity]:
    """The hand-written loop (the README's three sparsity lines) over epochs of ``epoch``
    batches."""
    module = Classifier()
    sp = Sparsity(module, method=method, total_steps=steps, **OPTIONS[method])
    optimizer = module.configure_optimizers()
    batches = _batches()[:epoch] * steps
    for step, batch in enumerate(batches[:steps]):
        loss = module.training_step(batch, step) + sp.regularizer()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        sp.step(step, optimizer)
    return module, sp


def _assert_same(sp: Sparsity, module: nn.Module, ref_sp: Sparsity, ref: nn.Module) -> None:
    for name, (a, b) in ref_sp.masks().items():
        assert torch.equal(sp.masks()[name][0], a), name
        assert torch.equal(sp.masks()[name][1], b), name
    for (name, p), q in zip(module.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("method", ["topkast", "rigl"])
def test_lightning_callback_matches_the_hand_written_loop(method: str, tmp_path: Path) -> None:
    module = Classifier()
    callback = SparsityCallback(method=method, **OPTIONS[method])
    _lightning(callback, 6, tmp_path).fit(module, _loader())
    assert callback.sparsity is not None and module.sparsity is callback.sparsity
    assert callback.sparsity.upcoming_step == 6  # stepped after each optimizer step
    _assert_same(callback.sparsity, module, *reversed(_reference(method, 6)))


def test_lightning_checkpoint_resumes_exactly(tmp_path: Path) -> None:
    # The first 3 of 6 steps (total_steps=6: the RigL schedule of the 6-step reference).
    first = Classifier()
    callback = SparsityCallback(method="rigl", total_steps=6, **OPTIONS["rigl"])
    trainer = _lightning(callback, 3, tmp_path)
    # Epochs of one batch: whatever position Lightning resumes the (not resumable) data at,
    # every step sees the same batch.
    trainer.fit(first, _loader(1))
    trainer.save_checkpoint(tmp_path / "three.ckpt")
    resumed = Classifier()
    callback = SparsityCallback(method="rigl", total_steps=6, **OPTIONS["rigl"])
    trainer = _lightning(callback, 6, tmp_path)
    trainer.fit(resumed, _loader(1), ckpt_path=tmp_path / "three.ckpt")
    assert callback.sparsity is not None
    _assert_same(callback.sparsity, resumed, *reversed(_reference("rigl", 6, epoch=1)))


# -- the Hugging Face Trainer -------------------------------------------------------------------


def _gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2,
                                     n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def _tokens() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    rows = torch.randint(0, 64, (8, 12), generator=g)
    # The first label is never predicted: -100 makes the Trainer's token count (which
    # normalises the summed loss) that of the model's own mean.
    labels = rows.clone()
    labels[:, 0] = -100
    return [{"input_ids": r, "labels": lab} for r, lab in zip(rows, labels, strict=True)]


def _hf_args(tmp_path: Path, steps: int, **kwargs: Any) -> Any:
    # One batch = the whole data set, plain SGD at a constant learning rate, no clipping: the
    # reference loop below is then the same computation (Adam would turn the rounding of tiny
    # gradients, summed in another order, into whole steps of size lr).
    options: dict[str, Any] = dict(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=8, optim="sgd",
        learning_rate=0.1, lr_scheduler_type="constant", max_grad_norm=0.0,
        report_to="none", use_cpu=True, disable_tqdm=True, logging_strategy="no",
        save_strategy="no", seed=0, dataloader_num_workers=0,
    )  # fmt: skip
    return transformers.TrainingArguments(**{**options, **kwargs})


def _hf_reference(method: str, backend: str, steps: int) -> tuple[nn.Module, Sparsity]:
    model = _gpt2()
    sp = Sparsity(model, method=method, backend=backend, total_steps=steps, **OPTIONS[method])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = {k: torch.stack([row[k] for row in _tokens()]) for k in ("input_ids", "labels")}
    for step in range(steps):
        loss = model(**batch).loss + sp.regularizer()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        sp.step(step, optimizer)
    return model, sp


@pytest.mark.parametrize(("method", "backend"), [("topkast", "masked"), ("rigl", "sparse")])
def test_hf_trainer_callback_matches_the_hand_written_loop(
    method: str, backend: str, tmp_path: Path
) -> None:
    model = _gpt2()
    callback = SparsityTrainerCallback(method=method, backend=backend, **OPTIONS[method])
    trainer = transformers.Trainer(model=model, args=_hf_args(tmp_path, 4),
                                   train_dataset=_tokens(), callbacks=[callback])  # fmt: skip
    assert callback.sparsity is not None  # attached in Trainer.__init__, before the optimizer
    trainer.train()
    assert callback.sparsity.upcoming_step == 4
    reference, ref_sp = _hf_reference(method, backend, 4)
    for name, (a, b) in ref_sp.masks().items():
        assert torch.equal(callback.sparsity.masks()[name][0], a), name
        assert torch.equal(callback.sparsity.masks()[name][1], b), name
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_hf_trainer_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    def run(steps: int, out: Path, resume: str | None = None, **kwargs: Any) -> Sparsity:
        callback = SparsityTrainerCallback(method="rigl", **OPTIONS["rigl"])
        trainer = transformers.Trainer(model=_gpt2(), args=_hf_args(out, steps, **kwargs),
                                       train_dataset=_tokens(), callbacks=[callback])  # fmt: skip
        trainer.train(resume_from_checkpoint=resume)
        assert callback.sparsity is not None
        return callback.sparsity

    # The run that saves at step 2 is the uninterrupted run; resuming from its checkpoint-2 (the
    # Trainer's model.safetensors, optimizer.pt, trainer_state.json) must end where it ended.
    whole = run(4, tmp_path / "whole", save_strategy="steps", save_steps=2)
    resumed = run(4, tmp_path / "resumed", resume=str(tmp_path / "whole" / "checkpoint-2"))
    for name, (a, b) in whole.masks().items():
        assert torch.equal(resumed.masks()[name][0], a) and torch.equal(resumed.masks()[name][1], b)
    for t, u in zip(whole.tensors, resumed.tensors, strict=True):
        torch.testing.assert_close(u.weight, t.weight)


# -- the README's examples -------------------------------------------------------------------


def _readme_examples() -> dict[str, str]:
    """The README's runnable ``py`` blocks, by the section they are in."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = {}
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        title = section.splitlines()[0].strip()
        for i, block in enumerate(re.findall(r"```py\n(.*?)```", section, flags=re.S)):
            blocks[f"{title} {i}"] = block
    return blocks


def test_readme_has_an_example_per_integration() -> None:
    titles = {name.rsplit(" ", 1)[0] for name in _readme_examples()}
    assert titles == {"Hugging Face models and checkpoints", "PyTorch Lightning",
                      "Hugging Face Trainer", "Sparse export and inference"}  # fmt: skip


@pytest.mark.parametrize("name", sorted(_readme_examples()))
def test_readme_example_runs(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the examples write their checkpoints into the working directory
    torch.manual_seed(0)
    namespace: dict[str, Any] = {}
    exec(compile(_readme_examples()[name], f"README: {name}", "exec"), namespace)
    if "sparsity" in namespace and name.startswith("Hugging Face models"):
        ids = torch.randint(0, 256, (2, 8))
        model, plain = namespace["model"].eval(), namespace["plain"].eval()
        with torch.no_grad():
            torch.testing.assert_close(plain(ids).logits, model(ids).logits)
    if "sparse" in namespace and hasattr(namespace["sparse"], "sparsity"):
        densities = namespace["sparse"].sparsity.densities().values()
        assert all(forward == pytest.approx(0.1, abs=0.01) for forward, _ in densities)
    if name.startswith("Hugging Face Trainer"):
        assert (tmp_path / "gpt2-trainer" / "checkpoint-10" / "model.safetensors").exists()
    if name.startswith("Sparse export"):
        assert namespace["logits"].shape == (1, 16, 256)
