"""A training run in its folder: data, model, optimizer and RNG state (new or resumed), the training
loop, and after every epoch the held-out scores, one line of metrics and a checkpoint.

``train_run`` is what ``python -m pyro_rnp.fit`` runs. What is scored after an epoch and
which figures are drawn come from the caller (the fit command passes the analysis
layer's evaluation and figures), so this layer needs nothing above it.
"""
from __future__ import annotations

import math
import pathlib
import time
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..data import binarize, load_images
from ..model.config import RNPConfig
from ..model.program import ProgramExecutor
from ..model.registry import build_model
from .distributed import Context, sync_batch_norms
from .loop import EpochSummary, Position, TrainingLoop, batching, diverged
from .runs import (CHECKPOINT, append_metrics, load_checkpoint, load_state, save_checkpoint, set_rng_state,
                   write_config)
from .step import AlternatingBackpropStep, TrainStep, make_optimizer

Scores = Callable[[torch.nn.Module, torch.Tensor], dict]   # (model, held-out images) -> {"neg_elbo", "mse", ...}
Figures = Callable[[torch.nn.Module, pathlib.Path, torch.Tensor], None]  # (model, run folder, a few images)


@dataclass
class TrainedRun:
    model: torch.nn.Module
    position: Position       # where training ended
    stopped: bool            # whether stop() ended it before config.epochs
    checkpoint: pathlib.Path


def compile_model(model: torch.nn.Module, **options) -> None:
    """torch.compile the parts with static shapes and no Python-side state: the encoder's convolutional
    and fully connected stacks (compiled as modules, so that every guide method that reads them runs
    compiled, not only ``forward``), and an mlp decoder. The program executor's generated layers run
    through autograd Functions of their own. ``options`` go to ``torch.compile`` (e.g. backend)."""
    stacks = [getattr(model.encoder, name) for name in ("features", "mlp") if hasattr(model.encoder, name)]
    for module in stacks or [model.encoder]:
        module.compile(**options)
    if not getattr(model, "has_parts", False):
        model.executor.compile(**options)


def load_datasets(config: RNPConfig, data_dir, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(training images, held-out images) of the run, in the default dtype; under ``binarize
    "dynamic"`` the held-out images binarised (their fixed draw), the training images grey."""
    train = load_images(config.dataset, "train", data_dir, download, config.limit, config.exclude_classes)
    test = load_images(config.dataset, "test", data_dir, download, config.eval_limit, config.exclude_classes)
    dtype = torch.get_default_dtype()  # float32 unless the caller chose float64 (torch.set_default_dtype)
    test_images = test.tensors[0].to(dtype)
    if config.binarize == "dynamic":  # the held-out draw; the training images are drawn afresh each epoch
        test_images = binarize(test_images, config.seed)
    return train.tensors[0].to(dtype), test_images


def train_run(config: RNPConfig, run_dir: pathlib.Path, device: torch.device, scores: Scores,
              figures: Figures | None = None, data_dir=None, download: bool = True, resume: bool = False,
              progress: bool = True, command: str | None = None, context: Context = Context(),
              stop: Callable[[], bool] = lambda: False, fast: bool = True,
              before_training: Callable[[], None] | None = None) -> TrainedRun:
    """Train (or continue) the run in ``run_dir`` to ``config.epochs`` epochs.

    Under torch.distributed every process calls this with its ``context``; rank 0 writes the run.
    ``stop()`` is asked every few steps: when it says so, the state is checkpointed where it is
    and the run returns with ``stopped``. ``before_training()`` is called once the model is built
    (the fit command prepares the process there, see pyro_rnp.fast.process).
    """
    main = context.is_main
    say = tqdm.write if main else (lambda message: None)
    train_images, test_images = load_datasets(config, data_dir, download)
    run_dir = pathlib.Path(run_dir)
    if device.type == "cuda":  # the datasets are small: keep them on the GPU
        train_images, test_images = train_images.to(device), test_images.to(device)
    fixed_test = test_images[:8].to(device)

    torch.manual_seed(config.seed)
    model = build_model(config).to(device)
    if context.active:
        sync_batch_norms(model)  # batch statistics over the global batch, as one process would compute them
    if config.compile:
        compile_model(model)
    optimizer = make_optimizer(model, config.lr, config.head_lr_scale)
    plan = batching(train_images.shape[0], config.batch_size, context)
    per_process, global_batch = plan.per_process, plan.global_batch
    total_steps = config.epochs * plan.batches
    if getattr(model, "objective", None) == "alternating_backprop":  # no guide to train: Langevin, then g
        step = AlternatingBackpropStep(model, optimizer, train_images.shape[0], config.grad_clip,
                                       config.lr_warmup_steps, config.lr_schedule, total_steps, context)
    else:
        step = TrainStep(model, optimizer, config.grad_clip, config.lr_warmup_steps, config.lr_schedule,
                         total_steps=total_steps, context=context, amp=config.amp, fast=fast)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "figures").mkdir(exist_ok=True)
        write_config(run_dir, config, command=command, device=str(device),
                     distributed={"processes": context.world, "backend": context.backend,
                                  "batch_per_process": per_process, "global_batch_size": global_batch,
                                  "lr": config.lr})
    start, wall_before = Position(), 0.0
    if resume:
        payload = load_checkpoint(run_dir, map_location=device, resume=True)
        load_state(model, payload, run_dir / CHECKPOINT)
        optimizer.load_state_dict(payload["optimizer"])
        set_rng_state(payload["rng"])
        # the position in the epoch, in images: the number of processes may have changed
        seen = payload.get("images_in_epoch", payload["batch_in_epoch"] * config.batch_size)
        start = Position(payload["epoch"], seen // global_batch, payload["step"])
        wall_before = payload["wall_time_s"]
        say(f"Resuming {run_dir} at epoch {start.epoch + 1}, step {start.step}.")
    if context.active and context.rank > 0:
        # the model is the same everywhere (built from one seed, and DDP starts from rank 0's weights),
        # but each process draws its own noise: its own stream, also after a resume (which restored rank
        # 0's states on every process)
        torch.manual_seed(rank_seed(config.seed, context.rank, start.step))
    train_at_depth(model, config.depth_in_epoch(start.epoch))
    if before_training is not None:
        before_training()
    started = time.perf_counter()

    def wall() -> float:
        return wall_before + time.perf_counter() - started

    saved: list[Position] = []  # where the checkpoint on disk was taken

    def checkpoint(at: Position) -> pathlib.Path:
        if main and (not saved or saved[-1] != at):
            save_checkpoint(run_dir, model, optimizer, epoch=at.epoch, step=at.step, batch_in_epoch=at.batch,
                            wall_time_s=wall(), images_in_epoch=at.batch * global_batch, processes=context.world)
            saved[:] = [at]
        return run_dir / CHECKPOINT

    def end_of_epoch(summary: EpochSummary) -> None:
        try:
            held_out = scores(model, test_images)
        except ValueError as e:  # a distribution refused non-finite parameters
            if "invalid values" in str(e):
                raise diverged(f"in epoch {summary.epoch}: the model's outputs are no longer finite", step) from None
            raise
        if not math.isfinite(held_out["neg_elbo"]):
            raise diverged(f"in epoch {summary.epoch}: the model's outputs are no longer finite", step)
        record = {"epoch": summary.epoch, "step": summary.step, "train_loss": summary.train_loss,
                  "test_neg_elbo": held_out["neg_elbo"], "test_mse": held_out["mse"],
                  "n_test": held_out["n_images"], "likelihood": held_out["likelihood"],
                  "images_per_s": summary.images_per_s, "skipped_steps": summary.skipped_steps,
                  "lr": optimizer.param_groups[0]["lr"], "wall_time_s": wall()}
        trained_depth, next_depth = config.depth_in_epoch(summary.epoch - 1), config.depth_in_epoch(summary.epoch)
        if config.curriculum_epochs:
            record["depth"] = trained_depth
        if main:
            append_metrics(run_dir, record)
        path = checkpoint(Position(summary.epoch, 0, summary.step))
        say(f"epoch {summary.epoch}: train loss {record['train_loss']:.1f}, held-out -ELBO "
            f"{record['test_neg_elbo']:.1f} nats/image ({record['likelihood']}), "
            f"MSE {record['test_mse']:.4f}, {record['images_per_s']:.0f} img/s; saved {path}")
        if main and figures is not None and (summary.epoch % config.figure_every == 0
                                             or summary.epoch == config.epochs):
            figures(model, run_dir, fixed_test)
        if next_depth != trained_depth:
            say(f"epoch {summary.epoch + 1} on: depth {next_depth}, from the weights trained at depth {trained_depth}")
        train_at_depth(model, next_depth)

    if start.epoch >= config.epochs:
        say(f"{run_dir} already has {start.epoch} of {config.epochs} epochs; pass --epochs N to train further.")
    hint = (f" ({context.world} processes x {per_process} = batch {global_batch}, lr {config.lr:g})"
            if context.active else "")
    loop = TrainingLoop(step, train_images, per_process, config.seed, context=context, device=device,
                        progress=progress, hint=hint,
                        on_rate=None if resume or not main else _how_long_teller(config, device),
                        images_for_epoch=(lambda epoch: binarize(train_images, config.seed, epoch))
                        if config.binarize == "dynamic" else None)
    end, stopped = loop.run(config.epochs, start, stop, end_of_epoch)
    # stopped at an epoch's end, the checkpoint of that epoch is already the one to resume from
    path = checkpoint(end) if stopped else run_dir / CHECKPOINT
    train_at_depth(model, config.depth)  # the model as load_run builds it
    return TrainedRun(model.eval(), end, stopped, path)


def train_at_depth(model: torch.nn.Module, depth: int) -> None:
    """Run the model's program tree to ``depth`` levels from now on (a curriculum's stages; see
    RNPConfig.curriculum_epochs). The parameters do not depend on the depth: one hypernetwork
    generates every level's programs, so a stage continues from the weights of the one before."""
    executor = getattr(model, "executor", None)  # a model's decoder; only a program tree has a depth
    if isinstance(executor, ProgramExecutor):
        executor.depth = depth


def rank_seed(seed: int, rank: int, step: int) -> int:
    """The seed of process ``rank``'s random stream from ``step`` on (rank 0 keeps the run's own stream)."""
    return (seed * 1_000_003 + rank * 7_919 + step) % (2 ** 63)


def _how_long_teller(config: RNPConfig, device: torch.device) -> Callable[[float, int], None]:
    def tell(images_per_s: float, epoch_images: int) -> None:
        tqdm.write(how_long_message(config, device, images_per_s, epoch_images))
    return tell


def how_long_message(config: RNPConfig, device: torch.device, images_per_s: float, epoch_images: int) -> str:
    """How long the run's epochs take at the measured speed, in words."""
    hours = config.epochs * epoch_images / images_per_s / 3600
    epochs = f"{config.epochs} epochs" if config.epochs != 1 else "1 epoch"
    take = "take" if config.epochs != 1 else "takes"
    message = (f"At {images_per_s:.0f} images/s on {device.type}, {epochs} of {epoch_images} "
               f"images {take} {_duration(hours)} (not counting evaluation).")
    if device.type == "cpu" and config.schedule == "paper":
        message += " For a run of minutes on a CPU, use --preset quick."
    return message


def _duration(hours: float) -> str:
    if hours * 60 < 1.5:
        return "about a minute" if hours * 60 >= 0.5 else "less than a minute"
    if hours < 1:
        return f"about {hours * 60:.0f} minutes"
    if hours < 48:
        return f"about {hours:.1f} hours"
    return f"about {hours / 24:.1f} days"
