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
from .distributed import (Context, any_across, broadcast_from_main, shard, sum_across,
                          sync_batch_norms, teardown)
from .distributed import setup as distributed_setup
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
          resume: bool = False, progress: bool = True, command: str | None = None,
          context: Context = Context()) -> RNP:
    """Train (or continue) the run in ``run_dir`` to ``config.epochs`` epochs and return the model.
    Under torch.distributed every process calls this with its ``context``; rank 0 writes the run."""
    main = context.is_main
    say = tqdm.write if main else (lambda message: None)
    train_images, test_images = _load_data(config, data_dir, download)
    dtype = torch.get_default_dtype()  # float32 unless the caller chose float64 (torch.set_default_dtype)
    train_images, test_images = train_images.to(dtype), test_images.to(dtype)
    per_process = min(config.batch_size, train_images.shape[0] // context.world)
    if per_process < 2:
        raise TrainingError(f"need at least 2 training images per process, got {train_images.shape[0]} "
                            f"for {context.world} processes")
    global_batch = per_process * context.world
    n_batches = train_images.shape[0] // global_batch
    run_dir = pathlib.Path(run_dir)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "figures").mkdir(exist_ok=True)
        write_config(run_dir, config, command=command, device=str(device),
                     distributed={"processes": context.world, "backend": context.backend,
                                  "batch_per_process": per_process, "global_batch_size": global_batch,
                                  "lr": config.lr})
    if device.type == "cuda":  # the datasets are small: keep them on the GPU
        train_images, test_images = train_images.to(device), test_images.to(device)
    fixed_test = test_images[:8].to(device)

    torch.manual_seed(config.seed)
    rnp = RNP(config).to(device)
    if context.active:
        sync_batch_norms(rnp)  # batch statistics over the global batch, as one process would compute them
    if config.compile:
        compile_model(rnp)
    optimizer = make_optimizer(rnp, config.lr, config.head_lr_scale)
    step_fn = TrainStep(rnp, optimizer, config.grad_clip, config.lr_warmup_steps, config.lr_schedule,
                        total_steps=config.epochs * n_batches, context=context, amp=config.amp)
    epoch, step, start_batch, wall_before = 0, 0, 0, 0.0
    if resume:
        payload = load_checkpoint(run_dir, map_location=device)
        load_state(rnp, payload, run_dir / CHECKPOINT)
        optimizer.load_state_dict(payload["optimizer"])
        set_rng_state(payload["rng"])
        epoch, step = payload["epoch"], payload["step"]
        # the position in the epoch, in images: the number of processes may have changed
        seen = payload.get("images_in_epoch", payload["batch_in_epoch"] * config.batch_size)
        start_batch = min(seen // global_batch, n_batches)
        wall_before = payload["wall_time_s"]
        say(f"Resuming {run_dir} at epoch {epoch + 1}, step {step}.")
    started = time.perf_counter()

    def wall():
        return wall_before + time.perf_counter() - started

    def checkpoint(epoch_, batch_):
        if not main:
            return run_dir / CHECKPOINT
        return save_checkpoint(run_dir, rnp, optimizer, epoch=epoch_, step=step, batch_in_epoch=batch_,
                               wall_time_s=wall(), images_in_epoch=batch_ * global_batch,
                               processes=context.world)

    if epoch >= config.epochs:
        say(f"{run_dir} already has {epoch} of {config.epochs} epochs; pass --epochs N to train further.")
    estimated = resume
    where = f"{context.world} processes x {per_process} = batch {global_batch}, " if context.active else ""
    with StopRequest() as stop:
        while epoch < config.epochs:
            order = torch.randperm(train_images.shape[0], generator=torch.Generator().manual_seed(
                config.seed * 1_000_003 + epoch)).to(train_images.device)
            zero = torch.zeros((), device=device)
            total_loss, total_images, skipped, bad_run = zero.clone(), zero.clone(), zero.clone(), zero.clone()
            bar = tqdm(range(start_batch, n_batches), desc=f"epoch {epoch + 1}/{config.epochs}",
                       unit="batch", dynamic_ncols=True, disable=not (progress and main), initial=start_batch,
                       total=n_batches)
            if context.active:
                bar.set_description(f"epoch {epoch + 1}/{config.epochs} ({where}lr {config.lr:g})")
            epoch_start, timed_from = time.perf_counter(), None
            for b in bar:
                x = train_images[shard(order, b, per_process, context)].to(device, non_blocking=True)
                loss, applied = step_fn(x, step)
                step += 1
                # kept on the device: reading them waits for the step, so they are read every SYNC_EVERY
                total_loss += torch.where(applied, loss, zero)
                total_images += applied * x.shape[0]
                skipped += ~applied
                bad_run = (bad_run + 1) * ~applied
                done = b + 1 - start_batch
                if done == 1:
                    timed_from = time.perf_counter()  # the first step includes one-off setup
                if done % SYNC_EVERY and b + 1 < n_batches:
                    continue
                _check_finite(rnp, skipped, bad_run, epoch, step, run_dir, config, say)
                if done > 1:
                    rate = (done - 1) * global_batch / (time.perf_counter() - timed_from)
                    bar.set_postfix(loss=f"{total_loss.item() / max(total_images.item(), 1):.1f}",
                                    img_s=f"{rate:.0f}")
                    if not estimated and done >= 6:
                        estimated = True
                        if main:
                            _say_how_long(config, device, rate, n_batches * global_batch)
                if any_across(context, stop.requested, device):
                    bar.close()
                    path = checkpoint(epoch, b + 1)
                    if main:
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
            loss_sum, images, n_skipped = sum_across(context, total_loss.item(), total_images.item(), skipped.item(),
                                                     device=device)
            try:
                scores = _evaluate(rnp, test_images, context, device, progress and main)
            except ValueError as e:  # a distribution refused non-finite parameters
                if "invalid values" in str(e):
                    raise diverged from None
                raise
            if not math.isfinite(scores["neg_elbo"]):
                raise diverged
            record = {"epoch": epoch, "step": step, "train_loss": loss_sum / max(images, 1),
                      "test_neg_elbo": scores["neg_elbo"], "test_mse": scores["mse"],
                      "n_test": scores["n_images"], "likelihood": scores["likelihood"],
                      "images_per_s": images / max(train_time, 1e-9), "skipped_steps": int(n_skipped),
                      "lr": optimizer.param_groups[0]["lr"], "wall_time_s": wall()}
            if main:
                append_metrics(run_dir, record)
            path = checkpoint(epoch, 0)
            say(f"epoch {epoch}: train loss {record['train_loss']:.1f}, held-out -ELBO "
                f"{record['test_neg_elbo']:.1f} nats/image ({record['likelihood']}), "
                f"MSE {record['test_mse']:.4f}, {record['images_per_s']:.0f} img/s; saved {path}")
            if main and (epoch % config.figure_every == 0 or epoch == config.epochs):
                write_figures(rnp, run_dir, fixed_test)
            if any_across(context, stop.requested, device):
                if main:
                    _say_resume(run_dir, path, epoch, step)
                sys.exit(130)
    return rnp.eval()


SYNC_EVERY = 10  # steps between reads of the loss and finiteness (each read waits for the device)


def compile_model(rnp: RNP) -> None:
    """torch.compile the parts with static shapes and no Python-side state: the encoder, and an mlp
    decoder. The program executor's generated layers run through our own autograd Functions."""
    rnp.encoder.compile()
    if not rnp.has_parts:
        rnp.executor.compile()


def _check_finite(rnp, skipped, bad_run, epoch, step, run_dir, config, say) -> None:
    bad = int(bad_run.item())
    if not int(skipped.item()):
        return
    weights_ok = state_finite(rnp)
    if not weights_ok or bad >= MAX_BAD_STEPS:
        raise TrainingError(
            f"training diverged at epoch {epoch + 1}, step {step}: "
            + ("the weights are no longer finite" if not weights_ok else f"{bad} consecutive non-finite losses")
            + f". The last good checkpoint (if any) is in {run_dir}; try a lower --lr than {config.lr:g}.")
    if bad:
        say(f"warning: non-finite loss at epoch {epoch + 1} before step {step}; {int(skipped.item())} "
            "update(s) skipped this epoch")


def _evaluate(rnp, test_images, context: Context, device, progress) -> dict:
    """Held-out scores; under torch.distributed each process takes every N-th image and the sums are pooled."""
    if not context.active:
        return evaluate(rnp, test_images, device=device, progress=progress)
    part = evaluate(rnp, test_images[context.rank::context.world], device=device, progress=progress)
    n = part["n_images"]
    elbo, mse, total = sum_across(context, part["neg_elbo"] * n, part["mse"] * n, n, device=device)
    return {**part, "neg_elbo": elbo / total, "mse": mse / total, "n_images": int(total)}


def write_figures(rnp: RNP, run_dir: pathlib.Path, x: torch.Tensor) -> None:
    rnp.eval()
    folder = run_dir / "figures"
    figures.plot_reconstructions(rnp, x, folder / "reconstructions.png")
    figures.plot_samples(rnp, x.shape[0], folder / "samples.png")
    figures.plot_curves(read_metrics(run_dir), folder / "curves.png")


def _say_how_long(config, device, images_per_s, epoch_images):
    hours = config.epochs * epoch_images / images_per_s / 3600
    epochs = f"{config.epochs} epochs" if config.epochs != 1 else "1 epoch"
    take = "take" if config.epochs != 1 else "takes"
    message = (f"At {images_per_s:.0f} images/s on {device.type}, {epochs} of {epoch_images} "
               f"images {take} {_duration(hours)} (not counting evaluation).")
    if device.type == "cpu" and config.schedule == "paper":
        message += " For a run of minutes on a CPU, use --preset quick."
    tqdm.write(message)


def _duration(hours: float) -> str:
    if hours * 60 < 1.5:
        return "about a minute" if hours * 60 >= 0.5 else "less than a minute"
    if hours < 1:
        return f"about {hours * 60:.0f} minutes"
    if hours < 48:
        return f"about {hours:.1f} hours"
    return f"about {hours / 24:.1f} days"


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
@click.option("--batch-size", type=click.IntRange(min=2),
              help="Images per SVI step, per process under torchrun [preset: 64].")
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
@click.option("--limit", type=click.IntRange(min=2),
              help="Use only the first N training images (with --guide autonormal: the first N held-out, 10).")
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
@click.option("--amp", type=click.Choice(["bf16"]), help="Mixed precision on CUDA: the forward pass in bfloat16 "
              "under autocast (weights, gradients and Adam stay float32). Recorded in config.json.")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the encoder (and an mlp decoder). "
              "Recorded in config.json; see the README's performance section for what it gains.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.pass_context
def main(ctx, dataset, preset, epochs, batch_size, lr, head_lr_scale, z_dim, depth, steps, hidden, likelihood,
         prior, prior_components, flow_layers, guide, guide_rank, decoder, plugins, source_dir,
         device, seed, limit, exclude_classes, data_dir, no_download, run_dir, resume_dir, eval_limit, amp, compile_,
         quiet):
    """Train a Recursive Neural Program with SVI (Trace_ELBO) and write a run folder.

    Under torchrun (torchrun --nproc_per_node N -m pyro_rnp.fit ...) it trains with N processes:
    --batch-size is per process; see guides/scaling.md."""
    torch_device = resolve_device(device)
    if amp and torch_device.type != "cuda":
        raise click.BadParameter("bf16 autocast is for CUDA devices; on a CPU train in float32 (drop --amp)",
                                 param_hint="--amp")
    given = {name: ctx.params[name] for name in CONFIG_FLAGS
             if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}
    if "plugins" in given:
        given["plugins"] = _load_plugins(plugins)
    _check_component_names(prior, guide, decoder)
    if guide == "autonormal" or source_dir is not None:
        from .oneshot import fit_autonormal_command
        return fit_autonormal_command(ctx, source_dir, guide, resume_dir, run_dir, torch_device, data_dir,
                                      not no_download, not quiet)
    context, torch_device = distributed_setup(torch_device)  # one process unless launched by torchrun
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
        changes.update(amp=amp, compile=compile_)  # speed options follow the command line
        config = dataclasses.replace(config, **changes)
        run_dir = resume_dir
    else:
        overrides = {CONFIG_FLAGS[k]: v for k, v in given.items() if k not in ("dataset", "preset")}
        overrides.update({k: v for k, v in (("epochs", epochs), ("eval_limit", eval_limit)) if v is not None})
        overrides.update(amp=amp, compile=compile_)
        try:
            config = RNPConfig.preset(dataset, preset, **overrides)
        except ValueError as e:
            raise click.UsageError(str(e)) from None
        run_dir = run_dir or new_run_dir(dataset)
        run_dir = broadcast_from_main(context, run_dir)  # under torchrun: rank 0's folder name everywhere
        if (run_dir / CHECKPOINT).exists():
            raise RunError(f"{run_dir} already holds a run; use --resume {run_dir} to continue it, "
                           "or choose another --run-dir.")
    echo = click.echo if context.is_main else (lambda message: None)
    batch = (f"batch {config.batch_size} per process x {context.world} processes" if context.active
             else f"batch {config.batch_size}")
    echo(f"Run folder: {run_dir}  ({config.dataset}, preset {config.schedule}, {config.epochs} epochs, "
         f"{batch}, lr {config.lr:g}, depth {config.depth}, likelihood {config.likelihood}, device {torch_device})")
    launcher = "torchrun -m pyro_rnp.fit" if context.active else "python -m pyro_rnp.fit"
    try:
        train(config, run_dir, torch_device, data_dir, download=not no_download, resume=resume_dir is not None,
              progress=not quiet, command=" ".join([launcher, *sys.argv[1:]]), context=context)
    finally:
        teardown(context)
    echo(f"Done. Figures in {run_dir / 'figures'}; load the model with pyro_rnp.load_run('{run_dir}').")


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
