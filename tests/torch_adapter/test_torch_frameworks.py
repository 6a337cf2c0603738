"""Training frameworks that take a torch optimizer: Hugging Face's ``Trainer`` and Lightning's ``Trainer``, each
training a small model with our AdamW, checkpointing (the model as safetensors for Hugging Face, the optimizer's
state dict in both) and resuming from a checkpoint.

A resumed run must end on the very bits of the uninterrupted one, and the run must follow the same framework
driving torch.optim.AdamW. The frameworks are imported inside the tests, so that collecting the suite does not load
them.
"""

from __future__ import annotations

import os

import pytest
import torch

from xpoptim.adapters import torch as xt

STEPS = 6
#: The reference's tolerance: our AdamW against torch.optim.AdamW on float32 parameters over a few steps, as in
#: test_torch_contract.test_kept_and_fresh_grads_follow_torch_adamw.
TORCH_ADAMW = {"rtol": 1e-6, "atol": 1e-7}


def _data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 8, generator=g), torch.randn(n, 2, generator=g)


def _ours(params, **kw):
    return xt.AdamW(params, compile=False, **kw)


def _check_saved_state(opt_state: dict) -> None:
    """Our state dict at the step-2 checkpoint: named tensors, two steps taken by every parameter."""
    assert sorted(opt_state["state"][0]) == ["exp_avg", "exp_avg_sq", "state_version", "step"]
    assert all(int(st["step"].item()) == 2 for st in opt_state["state"].values())


def _check_runs(full: torch.nn.Module, resumed: torch.nn.Module, ref: torch.nn.Module) -> None:
    """The resumed run ends on the uninterrupted run's bits, which follow the torch.optim.AdamW run."""
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(full.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, **TORCH_ADAMW)


# ------------------------------------------------------------------------------------------------------------------
# Hugging Face Trainer
# ------------------------------------------------------------------------------------------------------------------


def _transformers():
    transformers = pytest.importorskip("transformers", reason="Hugging Face transformers is not installed (the test extra installs it)")
    pytest.importorskip("accelerate", reason="Hugging Face's Trainer needs accelerate (the test extra installs it)")
    return transformers


def _hf_run(out: str, opt_cls, resume: str | None = None) -> torch.nn.Module:
    transformers = _transformers()

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.l1, self.l2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 2)

        def forward(self, x, labels=None):
            out = self.l2(torch.tanh(self.l1(x)))
            return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}

    x, y = _data(64)
    model = Net()
    args = transformers.TrainingArguments(
        output_dir=out,
        max_steps=STEPS,
        per_device_train_batch_size=8,
        save_strategy="steps",
        save_steps=2,
        learning_rate=1e-2,
        use_cpu=True,
        report_to=[],
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    opt = opt_cls(model.parameters(), lr=1e-2, weight_decay=0.01)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=[{"x": x[i], "labels": y[i]} for i in range(64)], optimizers=(opt, None))
    trainer.train(resume_from_checkpoint=resume)
    return model


def test_hugging_face_trainer_checkpoints_and_resumes_bit_for_bit(tmp_path):
    """The Trainer writes ``model.safetensors`` and ``optimizer.pt`` at each checkpoint; resuming from step 2 ends
    on the uninterrupted run's bits; the run follows the Trainer driving torch.optim.AdamW."""
    _transformers()
    load_file = pytest.importorskip("safetensors.torch", reason="safetensors is not installed (the torch extra installs it)").load_file
    full = _hf_run(str(tmp_path / "full"), _ours)
    ckpt = tmp_path / "full" / "checkpoint-2"
    assert {"model.safetensors", "optimizer.pt"} <= set(os.listdir(ckpt))
    saved = load_file(str(ckpt / "model.safetensors"))
    assert sorted(saved) == ["l1.bias", "l1.weight", "l2.bias", "l2.weight"]
    _check_saved_state(torch.load(ckpt / "optimizer.pt", weights_only=True))
    resumed = _hf_run(str(tmp_path / "resumed"), _ours, resume=str(ckpt))
    _check_runs(full, resumed, _hf_run(str(tmp_path / "torch"), torch.optim.AdamW))


# ------------------------------------------------------------------------------------------------------------------
# Lightning
# ------------------------------------------------------------------------------------------------------------------


def _lightning_run(root: str, opt_cls, ckpt: str | None = None) -> torch.nn.Module:
    L = pytest.importorskip("lightning", reason="Lightning is not installed (the test extra installs it)")
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Net(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.l1, self.l2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 2)

        def forward(self, x):
            return self.l2(torch.tanh(self.l1(x)))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self(x), y)

        def configure_optimizers(self):
            opt = opt_cls(self.parameters(), lr=1e-2, weight_decay=0.01)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)}

    # Two steps per epoch: the checkpoint of step 2 ends an epoch, where Lightning resumes a plain DataLoader exactly.
    x, y = _data(16)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=False)
    model = Net()
    trainer = L.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=root, every_n_train_steps=2, save_top_k=-1, filename="{step}")],
        default_root_dir=root,
    )
    trainer.fit(model, loader, ckpt_path=ckpt)
    return model


def test_lightning_checkpoints_and_resumes_bit_for_bit(tmp_path):
    """Lightning's checkpoint holds our optimizer's state dict; resuming from step 2 (with a scheduler) ends on the
    uninterrupted run's bits; the run follows Lightning driving torch.optim.AdamW."""
    full = _lightning_run(str(tmp_path / "full"), _ours)
    ckpt = tmp_path / "full" / "step=2.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    (opt_state,) = saved["optimizer_states"]
    _check_saved_state(opt_state)
    resumed = _lightning_run(str(tmp_path / "resumed"), _ours, ckpt=str(ckpt))
    _check_runs(full, resumed, _lightning_run(str(tmp_path / "torch"), torch.optim.AdamW))
