"""Transfer to unseen classes (the paper's Fig. 6; the command: ``python -m pyro_rnp.transfer``).

The run must have been trained without those classes (``fit --exclude-classes 7``).
Every decoder parameter (hypernetwork, program executor, prior) stays frozen; only
the guide's encoder is adapted, with the same SVI objective, on the unseen
classes' training images. If the learned programs are general, the unseen class
is explained once the encoder learns to find its programs.
"""
from __future__ import annotations

import pathlib

import torch

from ..model.registry import has, require
from ..training.loop import EpochSummary, TrainingLoop
from ..training.step import TrainStep
from .plots import colour_parts, image_grid


def freeze_decoder(rnp) -> list[torch.nn.Parameter]:
    """Freeze everything but the encoder; returns the encoder's parameters."""
    for p in rnp.parameters():
        p.requires_grad_(False)
    encoder = list(rnp.encoder.parameters())
    for p in encoder:
        p.requires_grad_(True)
    return encoder


def adapt_encoder(rnp, images: torch.Tensor, epochs: int, lr: float, batch_size: int = 64, grad_clip: float = 0.2,
                  seed: int = 0, progress: bool = False, fast: bool = True, amp: str | None = None) -> list[float]:
    """SVI steps on the encoder alone, with the training loop (``amp`` as TrainStep takes it); returns the mean
    loss per image of each epoch."""
    require(rnp, "guide", "transfer")
    optimizer = torch.optim.Adam(freeze_decoder(rnp), lr=lr)
    step = TrainStep(rnp, optimizer, grad_clip, frozen=(rnp.executor, rnp.prior), fast=fast, amp=amp)
    losses: list[float] = []

    def record(summary: EpochSummary) -> None:
        losses.append(summary.train_loss)

    TrainingLoop(step, images, batch_size, seed, progress=progress, label="adapt encoder").run(
        epochs, end_of_epoch=record)
    rnp.eval()
    return losses


def snapshot(model, x: torch.Tensor) -> dict:
    """What the transfer figure shows of a model on images x, before or after adaptation."""
    if has(model, "parts"):
        parts = model.parts(x)
        return {"mean": parts.canvas[:, 0].float().cpu().numpy(), "parts": colour_parts(parts.placed)}
    return {"mean": model.reconstruct(x)[:, 0].float().cpu().numpy(), "parts": None}


def plot_transfer(model, x: torch.Tensor, before: dict, path) -> pathlib.Path:
    """Unseen images: the data, then reconstruction (and parts) before and after adaptation."""
    after = snapshot(model, x)
    rows = [("data", x[:, 0].float().cpu().numpy())]
    for label, shown in (("before", before), ("after", after)):
        rows.append((label, shown["mean"]))
        if shown["parts"] is not None:
            rows.append((f"parts {label}", shown["parts"]))
    return image_grid(rows, path, "unseen class, encoder adapted with the decoder frozen")
