"""Train an RNP: ``python -m pyro_rnp.fit --dataset fashion [--preset quick]``.

The loop, top to bottom: load data; build or restore the model, optimizer and
RNG state; for each epoch, shuffle with a seed of (seed, epoch), take SVI steps,
evaluate on held-out images, append metrics, save a checkpoint, refresh figures.
Ctrl-C saves the current state (mid-epoch) and says how to resume.
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
import signal
import sys
import time

import click
import torch
from tqdm.auto import tqdm

from . import components
from . import data as datasets
from . import figures
from .cli import TrainingError, resolve_device, run
from .config import DATASETS, LIKELIHOODS, SCHEDULES, RNPConfig
from .evaluate import evaluate
from .model import RNP
from .runs import (CHECKPOINT, RunError, append_metrics, load_checkpoint, load_state, new_run_dir, read_config,
                   read_metrics, save_checkpoint, set_rng_state, write_config)
from .training import TrainStep, make_optimizer, state_finite

MAX_BAD_STEPS = 20  # consecutive non-finite losses before giving up

# CLI flag -> config field; a resumed run refuses any of these that disagree with its config
CONFIG_FLAGS = {"dataset": "dataset", "preset": "schedule", "batch_size": "batch_size", "lr": "lr",
                "head_lr_scale": "head_lr_scale",
                "z_dim": "z_dim", "depth": "depth", "steps": "steps", "hidden": "hidden",
                "likelihood": "likelihood", "seed": "seed", "limit": "limit", "exclude_classes": "exclude_classes",
                "prior": "prior", "prior_components": "prior_components", "flow_layers": "flow_layers",
                "guide": "guide", "guide_rank": "guide_rank", "decoder": "decoder", "plugins": "plugins"}


class ClassList(click.ParamType):
    """A comma-separated list of non-negative class labels, as a tuple of ints."""
    name = "LABELS"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            labels = tuple(sorted({int(v) for v in str(value).split(",") if v.strip()}))
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of class labels", param, ctx)
        if not labels or min(labels) < 0:
            self.fail(f"{value!r} is not a comma-separated list of class labels", param, ctx)
        return labels


class StopRequest:
    """First Ctrl-C: finish the current step, save, exit. Second: abort at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("Stopping after this step to save a checkpoint (Ctrl-C again to abort without saving)...")

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._previous)


def _load_data(config: RNPConfig, data_dir, download: bool):
    train = datasets.load_images(config.dataset, "train", data_dir, download, config.limit, config.exclude_classes)
    test = datasets.load_images(config.dataset, "test", data_dir, download,
                                config.eval_limit, config.exclude_classes)
    return train.tensors[0], test.tensors[0]


def train(config: RNPConfig, run_dir: pathlib.Path, device: torch.device, data_dir=None, download: bool = True,
          resume: bool = False, progress: bool = True, command: str | None = None) -> RNP:
    """Train (or continue) the run in ``run_dir`` to ``config.epochs`` epochs and return the model."""
    train_images, test_images = _load_data(config, data_dir, download)
    write_config(run_dir, config, command=command, device=str(device))
    if train_images.shape[0] < 2:
        raise TrainingError(f"need at least 2 training images, got {train_images.shape[0]}")
    batch_size = min(config.batch_size, train_images.shape[0])
    n_batches = train_images.shape[0] // batch_size
    if device.type == "cuda":  # the datasets are small: keep them on the GPU
        train_images, test_images = train_images.to(device), test_images.to(device)
    fixed_test = test_images[:8].to(device)

    torch.manual_seed(config.seed)
    rnp = RNP(config).to(device)
    optimizer = make_optimizer(rnp, config.lr, config.head_lr_scale)
    step_fn = TrainStep(rnp, optimizer, config.grad_clip, config.lr_warmup_steps, config.lr_schedule,
                        total_steps=config.epochs * n_batches)
    epoch, step, start_batch, wall_before = 0, 0, 0, 0.0
    if resume:
        payload = load_checkpoint(run_dir, map_location=device)
        load_state(rnp, payload, run_dir / CHECKPOINT)
        optimizer.load_state_dict(payload["optimizer"])
        set_rng_state(payload["rng"])
        epoch, step, start_batch = payload["epoch"], payload["step"], payload["batch_in_epoch"]
        wall_before = payload["wall_time_s"]
        tqdm.write(f"Resuming {run_dir} at epoch {epoch + 1}, step {step}.")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "figures").mkdir(exist_ok=True)
    started = time.perf_counter()

    def wall():
        return wall_before + time.perf_counter() - started

    def checkpoint(epoch_, batch_):
        return save_checkpoint(run_dir, rnp, optimizer, epoch=epoch_, step=step, batch_in_epoch=batch_,
                               wall_time_s=wall())

    if epoch >= config.epochs:
        tqdm.write(f"{run_dir} already has {epoch} of {config.epochs} epochs; pass --epochs N to train further.")
    estimated = resume
    bad_steps = 0
    with StopRequest() as stop:
        while epoch < config.epochs:
            order = torch.randperm(train_images.shape[0], generator=torch.Generator().manual_seed(
                config.seed * 1_000_003 + epoch)).to(train_images.device)
            total_loss, total_images, skipped = 0.0, 0, 0
            bar = tqdm(range(start_batch, n_batches), desc=f"epoch {epoch + 1}/{config.epochs}",
                       unit="batch", dynamic_ncols=True, disable=not progress, initial=start_batch, total=n_batches)
            epoch_start, timed_from = time.perf_counter(), None
            for b in bar:
                x = train_images[order[b * batch_size:(b + 1) * batch_size]].to(device, non_blocking=True)
                loss, applied = step_fn(x, step)
                if applied:
                    bad_steps = 0
                    step += 1
                    total_loss += loss.item()
                    total_images += x.shape[0]
                else:
                    skipped, bad_steps = skipped + 1, bad_steps + 1
                    if not state_finite(rnp) or bad_steps >= MAX_BAD_STEPS:
                        raise TrainingError(
                            f"training diverged at epoch {epoch + 1}, step {step}: "
                            + ("the weights are no longer finite" if not state_finite(rnp)
                               else f"{bad_steps} consecutive non-finite losses")
                            + f". The last good checkpoint (if any) is in {run_dir}; "
                            f"try a lower --lr than {config.lr:g}.")
                    tqdm.write(f"warning: non-finite loss at epoch {epoch + 1}, step {step}; update skipped")
                done = b + 1 - start_batch
                if done == 1:
                    timed_from = time.perf_counter()  # the first step includes one-off setup
                elif done > 1:
                    rate = (done - 1) * batch_size / (time.perf_counter() - timed_from)
                    bar.set_postfix(loss=f"{total_loss / max(total_images, 1):.1f}", img_s=f"{rate:.0f}")
                    if not estimated and done == 6:
                        estimated = True
                        _say_how_long(config, device, rate, n_batches * batch_size)
                if stop.requested:
                    bar.close()
                    path = checkpoint(epoch, b + 1)
                    _say_resume(run_dir, path, epoch, step)
                    sys.exit(130)
            bar.close()
            epoch += 1
            start_batch = 0
            train_time = time.perf_counter() - epoch_start
            diverged = TrainingError(f"training diverged in epoch {epoch}: the model's outputs are no longer "
                                     f"finite. The last good checkpoint (if any) is in {run_dir}; "
                                     f"try a lower --lr than {config.lr:g}.")
            if not state_finite(rnp):
                raise diverged
            try:
                scores = evaluate(rnp, test_images, device=device, progress=progress)
            except ValueError as e:  # a distribution refused non-finite parameters
                if "invalid values" in str(e):
                    raise diverged from None
                raise
            if not math.isfinite(scores["neg_elbo"]):
                raise diverged
            record = {"epoch": epoch, "step": step, "train_loss": total_loss / max(total_images, 1),
                      "test_neg_elbo": scores["neg_elbo"], "test_mse": scores["mse"],
                      "n_test": scores["n_images"], "likelihood": scores["likelihood"],
                      "images_per_s": total_images / max(train_time, 1e-9), "skipped_steps": skipped,
                      "lr": optimizer.param_groups[0]["lr"], "wall_time_s": wall()}
            append_metrics(run_dir, record)
            path = checkpoint(epoch, 0)
            tqdm.write(f"epoch {epoch}: train loss {record['train_loss']:.1f}, held-out -ELBO "
                       f"{record['test_neg_elbo']:.1f} nats/image ({record['likelihood']}), "
                       f"MSE {record['test_mse']:.4f}, {record['images_per_s']:.0f} img/s; saved {path}")
            if epoch % config.figure_every == 0 or epoch == config.epochs:
                write_figures(rnp, run_dir, fixed_test)
            if stop.requested:
                _say_resume(run_dir, path, epoch, step)
                sys.exit(130)
    return rnp.eval()


def write_figures(rnp: RNP, run_dir: pathlib.Path, x: torch.Tensor) -> None:
    rnp.eval()
    folder = run_dir / "figures"
    figures.plot_reconstructions(rnp, x, folder / "reconstructions.png")
    figures.plot_samples(rnp, x.shape[0], folder / "samples.png")
    figures.plot_curves(read_metrics(run_dir), folder / "curves.png")


def _say_how_long(config, device, images_per_s, epoch_images):
    hours = config.epochs * epoch_images / images_per_s / 3600
    message = (f"At {images_per_s:.0f} images/s on {device.type}, {config.epochs} epochs of {epoch_images} "
               f"images take about {_duration(hours)} (not counting evaluation).")
    if device.type == "cpu" and config.schedule == "paper":
        message += " For a run of minutes on a CPU, use --preset quick."
    tqdm.write(message)


def _duration(hours: float) -> str:
    if hours < 1:
        return f"{hours * 60:.0f} minutes"
    if hours < 48:
        return f"{hours:.1f} hours"
    return f"{hours / 24:.1f} days"


def _say_resume(run_dir, path, epoch, step):
    tqdm.write(f"Interrupted at epoch {epoch + 1}, step {step}. Checkpoint saved to {path}.\n"
               f"Resume with: python -m pyro_rnp.fit --resume {run_dir}")


@click.command(name="pyro_rnp.fit", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--dataset", type=click.Choice(DATASETS), default="fashion", show_default=True,
              help="Training data (Omniglot: background set; its evaluation set is held out).")
@click.option("--preset", type=click.Choice(SCHEDULES), default="paper", show_default=True,
              help="paper: the paper's settings (200 epochs, 400 for Omniglot, lr 4e-5). "
                   "quick: same model, a schedule of minutes on a CPU.")
@click.option("--epochs", type=click.IntRange(min=1), help="Epochs to train (with --resume: the new total).")
@click.option("--batch-size", type=click.IntRange(min=2), help="Images per SVI step [preset: 64].")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Adam learning rate [preset].")
@click.option("--head-lr-scale", type=click.FloatRange(min=0, min_open=True),
              help="The hypernetwork head's learning rate as a fraction of --lr [paper: 1; quick: 0.2].")
@click.option("--z-dim", type=click.IntRange(min=1), help="Program vector size |z| [32; 96 for Omniglot].")
@click.option("--depth", type=click.IntRange(min=1), help="Levels K of the program tree [2].")
@click.option("--steps", type=click.IntRange(min=1), help="Children per program, tau [4].")
@click.option("--hidden", type=click.IntRange(min=1), help="Width of the hypernetwork and generated layers [64].")
@click.option("--likelihood", type=click.Choice(LIKELIHOODS),
              help="normal: Gaussian with sigma 0.5 (the paper's loss); bernoulli: binarised pixels [normal].")
@click.option("--prior", help="p(z): normal (paper), mog, vamp, flow, or one registered by a --plugin [normal].")
@click.option("--prior-components", type=click.IntRange(min=1), help="K for --prior mog and vamp [16].")
@click.option("--flow-layers", type=click.IntRange(min=1), help="Transforms in --prior flow and --guide resnet-iaf [2].")
@click.option("--guide", help="q(z | x): resnet (paper), resnet-lowrank, resnet-iaf, autonormal (needs --from), "
              "or one registered by a --plugin [resnet].")
@click.option("--guide-rank", type=click.IntRange(min=1), help="Covariance rank of --guide resnet-lowrank [4].")
@click.option("--decoder", help="rnp (paper) or mlp (the baseline VAE) [rnp].")
@click.option("--plugin", "plugins", multiple=True,
              help="A .py file or module that registers priors, guides or decoders (repeatable); recorded in the "
                   "run so that load_run imports it again.")
@click.option("--from", "source_dir", type=click.Path(path_type=pathlib.Path),
              help="With --guide autonormal: the trained run whose prior and decoder are kept, frozen.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="auto picks CUDA when available.")
@click.option("--seed", type=int, help="Random seed for initialisation, shuffling and sampling [0].")
@click.option("--limit", type=click.IntRange(min=2), help="Use only the first N training images.")
@click.option("--exclude-classes", type=ClassList(), help="Comma-separated labels to leave out of training and "
              "held-out data, e.g. 7 or 7,8 (for transfer experiments).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=pathlib.Path), envvar="PYRO_RNP_DATA",
              show_envvar=True, help="Folder with the datasets in torchvision's layout [~/.cache/pyro_rnp/data].")
@click.option("--no-download", is_flag=True, help="Never download; fail if the data is not in --data-dir.")
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=pathlib.Path),
              help="Where to write the run [runs/<dataset>-<timestamp>].")
@click.option("--resume", "resume_dir", type=click.Path(path_type=pathlib.Path),
              help="Continue the run in RUN_DIR from its checkpoint, with its config.")
@click.option("--eval-limit", type=click.IntRange(min=1),
              help="Held-out images evaluated after each epoch [paper: all; quick: 2000].")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.pass_context
def main(ctx, dataset, preset, epochs, batch_size, lr, head_lr_scale, z_dim, depth, steps, hidden, likelihood,
         prior, prior_components, flow_layers, guide, guide_rank, decoder, plugins, source_dir,
         device, seed, limit, exclude_classes, data_dir, no_download, run_dir, resume_dir, eval_limit, quiet):
    """Train a Recursive Neural Program with SVI (Trace_ELBO) and write a run folder."""
    torch_device = resolve_device(device)
    given = {name: ctx.params[name] for name in CONFIG_FLAGS
             if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}
    if "plugins" in given:
        given["plugins"] = _load_plugins(plugins)
    _check_component_names(prior, guide, decoder)
    if guide == "autonormal" or source_dir is not None:
        from .oneshot import fit_autonormal_command
        return fit_autonormal_command(ctx, source_dir, guide, resume_dir, run_dir, torch_device, data_dir,
                                      not no_download, not quiet)
    if resume_dir is not None:
        if run_dir is not None:
            raise click.UsageError("--resume continues a run in its own folder; drop --run-dir")
        config = read_config(resume_dir)
        clashes = [f"--{flag.replace('_', '-')} {value}" + f" (the run has {getattr(config, CONFIG_FLAGS[flag])})"
                   for flag, value in given.items() if value != getattr(config, CONFIG_FLAGS[flag])]
        if clashes:
            raise RunError(f"cannot resume {resume_dir} with a different config: {', '.join(clashes)}. "
                           "Drop those flags to continue the run as it was (only --epochs, --eval-limit, --device, "
                           "--data-dir and --no-download may change), or start a new run.")
        changes = {k: v for k, v in (("epochs", epochs), ("eval_limit", eval_limit)) if v is not None}
        config = dataclasses.replace(config, **changes)
        run_dir = resume_dir
    else:
        overrides = {CONFIG_FLAGS[k]: v for k, v in given.items() if k not in ("dataset", "preset")}
        overrides.update({k: v for k, v in (("epochs", epochs), ("eval_limit", eval_limit)) if v is not None})
        try:
            config = RNPConfig.preset(dataset, preset, **overrides)
        except ValueError as e:
            raise click.UsageError(str(e)) from None
        run_dir = run_dir or new_run_dir(dataset)
        if (run_dir / CHECKPOINT).exists():
            raise RunError(f"{run_dir} already holds a run; use --resume {run_dir} to continue it, "
                           "or choose another --run-dir.")
    click.echo(f"Run folder: {run_dir}  ({config.dataset}, preset {config.schedule}, {config.epochs} epochs, "
               f"batch {config.batch_size}, lr {config.lr:g}, depth {config.depth}, likelihood {config.likelihood}, "
               f"device {torch_device})")
    train(config, run_dir, torch_device, data_dir, download=not no_download, resume=resume_dir is not None,
          progress=not quiet, command=" ".join(["python -m pyro_rnp.fit", *sys.argv[1:]]))
    click.echo(f"Done. Figures in {run_dir / 'figures'}; load the model with pyro_rnp.load_run('{run_dir}').")


def _load_plugins(plugins) -> tuple[str, ...]:
    """Import each plugin now; .py paths are recorded absolute so the run folder finds them again."""
    recorded = []
    for spec in plugins:
        if spec.endswith(".py"):
            spec = str(pathlib.Path(spec).resolve())
        try:
            components.import_plugin(spec)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--plugin") from None
        recorded.append(spec)
    return tuple(recorded)


def _check_component_names(prior, guide, decoder) -> None:
    for kind, name in (("prior", prior), ("guide", guide), ("decoder", decoder)):
        if name is not None and name not in components.names(kind):
            raise click.BadParameter(f"unknown {kind} {name!r}; choose one of {', '.join(components.names(kind))}",
                                     param_hint=f"--{kind}")


if __name__ == "__main__":
    run(main)
