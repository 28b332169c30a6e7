"""The one training loop: epochs of SVI steps over a tensor of images.

fit, transfer and the per-image (autonormal) fit all run it. Top to bottom, an epoch:
shuffle with a seed of (seed, epoch) (or keep the order), cut into batches (under
torch.distributed each process takes its shard of every global batch), take a
TrainStep per batch, and every ``SYNC_EVERY`` steps read the loss and check that
training is still finite (the only times the loop waits for the device), update the
progress bar, and ask ``stop()``; at the end of an epoch, hand the epoch's summary to
``end_of_epoch``. It returns where it ended, so the caller can checkpoint there: after
the last epoch, or mid-epoch when ``stop()`` said so.

Divergence is refused the same way everywhere: ``MAX_BAD_STEPS`` consecutive
non-finite losses, or weights that are no longer finite, raise TrainingError.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from .distributed import Context, any_across, shard, sum_across
from .step import AlternatingBackpropStep, TrainStep

MAX_BAD_STEPS = 20  # consecutive non-finite losses before giving up
SYNC_EVERY = 10     # steps between reads of the loss and finiteness (each read waits for the device)


class TrainingError(Exception):
    """Training cannot go on (for example it diverged); str(e) says what happened and what to do."""


@dataclass
class Position:
    """Where training is: ``epoch`` epochs done, ``batch`` batches into the next, ``step`` steps in all."""
    epoch: int = 0
    batch: int = 0
    step: int = 0


@dataclass
class EpochSummary:
    epoch: int              # epochs done, this one included
    step: int
    train_loss: float       # mean loss per image over the applied steps (all processes)
    images: int             # images in the applied steps
    skipped_steps: int
    images_per_s: float     # the epoch's training images per second of its wall time


@dataclass(frozen=True)
class Batching:
    per_process: int        # images per process and step
    global_batch: int       # images per step over all processes
    batches: int            # steps per epoch


def batching(images: int, batch_size: int, context: Context = Context(), smallest: int = 2) -> Batching:
    """How ``images`` training images are cut into steps of ``batch_size`` per process; fewer than
    ``smallest`` images per process (batch norm needs 2) is refused."""
    per_process = min(batch_size, images // context.world)
    if per_process < smallest:
        raise TrainingError(f"need at least {smallest} training images per process, got {images} "
                            f"for {context.world} processes")
    return Batching(per_process, per_process * context.world, images // (per_process * context.world))


def state_finite(module: torch.nn.Module) -> bool:
    """Whether every parameter and floating-point buffer (batch-norm statistics) is finite."""
    tensors = [*module.parameters(), *(b for b in module.buffers() if b.is_floating_point())]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


class TrainingLoop:
    """Epochs of ``step`` over ``images`` (N, 1, H, W), ``batch_size`` per process and step.

    ``images_for_epoch(epoch)``, when given, returns the images (N, 1, H, W) that epoch trains on in
    place of ``images`` (a fresh binarisation each epoch). ``shuffle=False`` keeps the images' order
    (with one batch per epoch, every step sees them all in the same rows).
    ``on_rate(images_per_s, images_per_epoch)`` is called once, after the first few timed steps, so
    the caller can say how long training will take.
    """

    def __init__(self, step: TrainStep | AlternatingBackpropStep, images: torch.Tensor, batch_size: int,
                 seed: int = 0, shuffle: bool = True, context: Context = Context(), device: torch.device | None = None,
                 progress: bool = True, label: str = "epoch", hint: str = "",
                 on_rate: Callable[[float, int], None] | None = None,
                 images_for_epoch: Callable[[int], torch.Tensor] | None = None):
        self.step, self.images, self.seed, self.shuffle = step, images, seed, shuffle
        self.images_for_epoch = images_for_epoch
        self.context = context
        self.device = device or next(step.rnp.parameters()).device
        # a full-batch fit of a single image (the autonormal guide has no batch norm) is allowed
        plan = batching(images.shape[0], batch_size, context, smallest=min(2, images.shape[0]))
        self.per_process, self.global_batch, self.batches = plan.per_process, plan.global_batch, plan.batches
        self.progress = progress and context.is_main
        self.label, self.hint, self.on_rate = label, hint, on_rate
        self.say = tqdm.write if context.is_main else (lambda message: None)

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.images.shape[0], device=self.images.device)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.images.shape[0], generator=generator).to(self.images.device)

    def run(self, epochs: int, start: Position = Position(), stop: Callable[[], bool] = lambda: False,
            end_of_epoch: Callable[[EpochSummary], None] | None = None) -> tuple[Position, bool]:
        """Train from ``start`` to ``epochs`` epochs; returns (where it ended, whether ``stop()`` ended it)."""
        epoch, step, first = start.epoch, start.step, min(start.batch, self.batches)
        device, context = self.device, self.context
        zero = torch.zeros((), device=device)
        # one bar per epoch; with one batch per epoch (a full-batch fit), one bar over the epochs
        per_epoch_bars = self.batches > 1
        overall = tqdm(total=epochs, initial=epoch, desc=f"{self.label}{self.hint}", unit="step", dynamic_ncols=True,
                       disable=per_epoch_bars or not self.progress)
        while epoch < epochs:
            order = self.order(epoch)
            images = self.images if self.images_for_epoch is None else self.images_for_epoch(epoch)
            total_loss, total_images, skipped, bad_run = zero.clone(), zero.clone(), zero.clone(), zero.clone()
            bar = tqdm(range(first, self.batches), desc=f"{self.label} {epoch + 1}/{epochs}{self.hint}",
                       unit="batch", dynamic_ncols=True, disable=not (self.progress and per_epoch_bars),
                       initial=first, total=self.batches)
            epoch_start, timed_from = time.perf_counter(), None
            for b in bar:
                rows = shard(order, b, self.per_process, context)
                x = images[rows].to(device, non_blocking=True)
                loss, applied = self.step(x, step, index=rows)
                step += 1
                # kept on the device: reading them waits for the step, so they are read every SYNC_EVERY
                total_loss += torch.where(applied, loss, zero)
                total_images += applied * x.shape[0]
                skipped += ~applied
                bad_run = (bad_run + 1) * ~applied
                done = b + 1 - first
                if done == 1:
                    timed_from = time.perf_counter()  # the first step includes one-off setup
                if done % SYNC_EVERY and b + 1 < self.batches:
                    continue
                self._check_finite(skipped, bad_run, epoch, step)
                if done > 1:
                    rate = (done - 1) * self.global_batch / (time.perf_counter() - timed_from)
                    bar.set_postfix(loss=f"{total_loss.item() / max(total_images.item(), 1):.1f}",
                                    img_s=f"{rate:.0f}")
                    if self.on_rate is not None and done >= 6:
                        self.on_rate(rate, self.batches * self.global_batch)
                        self.on_rate = None
                if any_across(context, stop(), device):
                    bar.close(), overall.close()
                    return Position(epoch, b + 1, step), True
            bar.close()
            epoch, first = epoch + 1, 0
            train_time = time.perf_counter() - epoch_start
            if not state_finite(self.step.rnp):
                raise diverged(f"in epoch {epoch}: the weights are no longer finite", self.step)
            loss_sum, images, n_skipped = sum_across(context, total_loss.item(), total_images.item(),
                                                     skipped.item(), device=device)
            summary = EpochSummary(epoch, step, loss_sum / images if images else float("nan"), int(images),
                                   int(n_skipped), images / max(train_time, 1e-9))
            overall.update()
            overall.set_postfix(loss=f"{summary.train_loss:.1f}")
            if end_of_epoch is not None:
                end_of_epoch(summary)
            if any_across(context, stop(), device):
                overall.close()
                return Position(epoch, 0, step), True
        overall.close()
        return Position(epoch, 0, step), False

    def _check_finite(self, skipped, bad_run, epoch: int, step: int) -> None:
        """Raise TrainingError when training diverged; warn about skipped steps."""
        model = self.step.rnp
        if not int(skipped.item()):
            return
        bad = int(bad_run.item())
        weights_ok = state_finite(model)
        if not weights_ok or bad >= MAX_BAD_STEPS:
            reason = "the weights are no longer finite" if not weights_ok else f"{bad} consecutive non-finite losses"
            raise diverged(f"at epoch {epoch + 1}, step {step}: {reason}", self.step)
        if bad:
            self.say(f"warning: non-finite loss at epoch {epoch + 1} before step {step}; {int(skipped.item())} "
                     "update(s) skipped this epoch")


def diverged(where: str, step: TrainStep | None = None) -> TrainingError:
    """The one message for a run that diverged."""
    lr = f" than {step.optimizer.param_groups[0]['base_lr']:g}" if step is not None else ""
    return TrainingError(f"training diverged {where}. The last good checkpoint (if any) is in the run folder; "
                         f"try a lower --lr{lr}.")
