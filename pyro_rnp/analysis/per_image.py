"""Fit a few images as programs with a trained, frozen decoder: the autonormal guide.

    python -m pyro_rnp.fit --guide autonormal --from RUN_DIR --limit 10 [--epochs 500]

(the command is in pyro_rnp/fit.py.)

Each of the first N held-out images gets its own Normal q(z_n) (Pyro's AutoNormal),
started at the source run's amortized posterior (mean and diagonal scale); SVI then moves only those,
with the prior and decoder frozen. Comparing the result with the amortized guide on
the same images measures the amortization gap: how much the encoder loses by
predicting q from x in one pass. Use it to explain specific images as well as the
model can; use the amortized guides for anything that sees new images.
"""
from __future__ import annotations

import pathlib
from typing import Callable

import torch

from ..model.guides import AutoNormalGuide
from ..model.registry import build_model, has
from ..training.loop import EpochSummary, TrainingLoop
from ..training.runs import RunError
from ..training.step import TrainStep, make_optimizer
from .plots import colour_parts, image_grid

DEFAULT_IMAGES = 10
DEFAULT_PASSES = 500
DEFAULT_LR = 0.01
MAX_IMAGES = 1000  # one SVI step sees every image
EVAL_SAMPLES = 50  # samples per image for the comparison: with one, the mean -ELBO of 100 images moves by nats


def autonormal_from(source, images: torch.Tensor, config):
    """A new RNP that shares ``source``'s prior and decoder (frozen) and has an AutoNormal guide
    over ``images``, started at the source guide's point estimates."""
    if source.config.prior == "vamp":
        raise RunError("the autonormal guide cannot keep a vamp prior: the VampPrior is built from the "
                       "amortized guide it would replace. Use a run with another prior.")
    with torch.no_grad():
        init_loc = source.encode(images)
        # the source's diagonal scales where it has them: AutoNormal's default 0.1 can be far off
        init_scale = source.encoder.diagonal(images)[1] if hasattr(source.encoder, "diagonal") else 0.1
    guide = AutoNormalGuide(images, config.z_dim, init_loc=init_loc, init_scale=init_scale)
    rnp = build_model(config, prior=source.prior, guide=guide.to(images.device), decoder=source.executor)
    for module in (rnp.executor, rnp.prior):
        for p in module.parameters():
            p.requires_grad_(False)
    return rnp


def fit_autonormal(rnp, passes: int, lr: float, grad_clip: float = 0.2, progress: bool = False,
                   on_pass: Callable[[int, float], None] | None = None, stop: Callable[[], bool] | None = None,
                   fast: bool = True) -> list[float]:
    """SVI on the AutoNormal's parameters alone, all fitted images in every step (in their order), the
    rate decaying to 0 by a cosine, with the training loop (one step per epoch); returns the loss per
    image of every pass. ``on_pass(k, loss)`` is called after each; ``stop()`` ends early."""
    images = rnp.encoder.fitted_images
    optimizer = make_optimizer(rnp, lr)
    # cosine decay to 0: with one noisy sample per step, a constant rate leaves each image's q jittering
    step = TrainStep(rnp, optimizer, grad_clip, schedule="cosine", total_steps=passes,
                     frozen=(rnp.executor, rnp.prior), fast=fast)
    losses: list[float] = []

    def record(summary: EpochSummary) -> None:
        losses.append(summary.train_loss)
        if on_pass is not None:
            on_pass(summary.epoch - 1, summary.train_loss)

    loop = TrainingLoop(step, images, batch_size=images.shape[0], shuffle=False, progress=progress,
                        label="fit autonormal")
    loop.run(passes, stop=stop or (lambda: False), end_of_epoch=record)
    rnp.eval()
    return losses


def plot_autonormal(source, fitted, x: torch.Tensor, path) -> pathlib.Path:
    """The same images, reconstructed (and parsed) with the amortized guide and with the fitted one."""
    rows = [("data", x[:, 0].float().cpu().numpy())]
    for label, model in (("amortized", source), ("autonormal", fitted)):
        rows.append((label, model.reconstruct(x)[:, 0].float().cpu().numpy()))
        if has(model, "parts"):
            rows.append((f"parts, {label}", colour_parts(model.parts(x).placed)))
    return image_grid(rows, path, "the same images: amortized guide vs one Normal per image (decoder frozen)")
