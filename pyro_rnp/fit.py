"""Train a model: ``python -m pyro_rnp.fit --dataset fashion [--preset quick] [--model rnp]``.

The command builds the run's config from its options (or reads it back with
``--resume``) and calls ``train``: pyro_rnp/training/run.py does the run, with the
analysis layer's held-out scores and figures after each epoch. Ctrl-C saves the
current state (mid-epoch) and says how to resume. ``--guide autonormal --from
RUN_DIR`` fits a few images with a trained, frozen decoder instead (analysis/per_image.py).
"""
from __future__ import annotations

import dataclasses
import pathlib
import sys
import time

import click
import pyro
import torch

from .analysis.evaluate import evaluate
from .analysis.per_image import (DEFAULT_IMAGES, DEFAULT_LR, DEFAULT_PASSES, EVAL_SAMPLES, MAX_IMAGES,
                                 autonormal_from, fit_autonormal, plot_autonormal)
from .analysis.plots import plot_curves, plot_reconstructions, plot_samples
from .cli import (ClassList, StopRequest, check_amp, data_options, fast_path_enabled, held_out, resolve_device, run,
                  write_result)
from .data import DATASETS
from .fast import prepare_process_for_training
from .model import components
from .model.config import ANDOR_OUTPUTS, BINARIZATIONS, LIKELIHOODS, SCHEDULES, SPARSITIES, RNPConfig
from .model.likelihoods import make_likelihood
from .model.registry import model_entry, model_names
from .training.distributed import Context, broadcast_from_main, sum_across, teardown
from .training.distributed import setup as distributed_setup
from .training.runs import (CHECKPOINT, WEIGHTS, RunError, append_metrics, check_resumable, load_run, new_run_dir,
                            read_config, read_metrics, save_checkpoint, write_config)
from .training.run import train_run

# CLI flag -> config field; a resumed run refuses any of these that disagree with its config
CONFIG_FLAGS = {"dataset": "dataset", "preset": "schedule", "batch_size": "batch_size", "lr": "lr",
                "head_lr_scale": "head_lr_scale", "model_name": "model",
                "z_dim": "z_dim", "depth": "depth", "steps": "steps", "hidden": "hidden",
                "likelihood": "likelihood", "likelihood_scale": "likelihood_scale", "seed": "seed", "limit": "limit",
                "exclude_classes": "exclude_classes",
                "prior": "prior", "prior_components": "prior_components", "flow_layers": "flow_layers",
                "guide": "guide", "guide_rank": "guide_rank", "decoder": "decoder", "plugins": "plugins",
                "sparsity": "sparsity", "critic": "andor_critic", "andor_output": "andor_output",
                "binarize": "binarize", "curriculum": "curriculum_epochs"}


def train(config: RNPConfig, run_dir: pathlib.Path, device: torch.device, data_dir=None, download: bool = True,
          resume: bool = False, progress: bool = True, command: str | None = None,
          context: Context = Context(), prepare_process: bool = False, fast: bool = True):
    """Train (or continue) the run in ``run_dir`` to ``config.epochs`` epochs and return the model.
    Under torch.distributed every process calls this with its ``context``; rank 0 writes the run.
    Ctrl-C checkpoints and exits with status 130. ``prepare_process``: apply the process-wide
    training settings (pyro_rnp.fast.process) once the model is built."""
    def scores(model, images):
        return held_out_scores(model, images, context, device, progress and context.is_main)

    with StopRequest() as stop:
        trained = train_run(config, run_dir, device, scores, write_figures, data_dir, download, resume, progress,
                            command, context, stop=lambda: stop.requested, fast=fast,
                            before_training=(lambda: prepare_process_for_training(cpu=device.type == "cpu"))
                            if prepare_process else None)
    if trained.stopped:
        if context.is_main:
            click.echo(f"Interrupted at epoch {trained.position.epoch + 1}, step {trained.position.step}. "
                       f"Checkpoint saved to {trained.checkpoint}.\n"
                       f"Resume with: python -m pyro_rnp.fit --resume {run_dir}", err=True)
        sys.exit(130)
    return trained.model


def held_out_scores(model, test_images, context: Context, device, progress) -> dict:
    """Held-out scores; under torch.distributed each process takes every N-th image and the sums are pooled."""
    if not context.active:
        return evaluate(model, test_images, device=device, progress=progress)
    part = evaluate(model, test_images[context.rank::context.world], device=device, progress=progress)
    n = part["n_images"]
    elbo, mse, total = sum_across(context, part["neg_elbo"] * n, part["mse"] * n, n, device=device)
    return {**part, "neg_elbo": elbo / total, "mse": mse / total, "n_images": int(total)}


def write_figures(model, run_dir: pathlib.Path, x: torch.Tensor) -> None:
    """The figures a run refreshes while it trains: reconstructions, samples, curves."""
    model.eval()
    folder = pathlib.Path(run_dir) / "figures"
    plot_reconstructions(model, x, folder / "reconstructions.png")
    plot_samples(model, x.shape[0], folder / "samples.png")
    plot_curves(read_metrics(run_dir), folder / "curves.png")


@click.command(name="pyro_rnp.fit", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--dataset", type=click.Choice(DATASETS), default="fashion", show_default=True,
              help="Training data (Omniglot: background set; its evaluation set is held out).")
@click.option("--preset", type=click.Choice(SCHEDULES), default="paper", show_default=True,
              help="paper: the paper's settings (200 epochs, 400 for Omniglot, lr 4e-5). "
                   "quick: same model, a schedule of minutes on a CPU. long (rnp, vae): quick's rates over "
                   "20 epochs.")
@click.option("--epochs", type=click.IntRange(min=1), help="Epochs to train (with --resume: the new total).")
@click.option("--batch-size", type=click.IntRange(min=2),
              help="Images per SVI step, per process under torchrun [preset: 64].")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Adam learning rate [preset].")
@click.option("--head-lr-scale", type=click.FloatRange(min=0, min_open=True),
              help="The hypernetwork head's learning rate as a fraction of --lr [paper: 1; quick: 0.2].")
@click.option("--z-dim", type=click.IntRange(min=1), help="Program vector size |z| [32; 96 for Omniglot].")
@click.option("--depth", type=click.IntRange(min=1), help="Levels K of the program tree [2].")
@click.option("--steps", type=click.IntRange(min=1), help="Children per program, tau [4].")
@click.option("--curriculum", type=click.IntRange(min=0), help="Train one depth at a time: depth 1 for the "
              "first N epochs, then depth 2 from those weights, ..., the full --depth for the rest (rnp only; see "
              "guides/training.md) [0: off].")
@click.option("--hidden", type=click.IntRange(min=1), help="Width of the hypernetwork and generated layers [64].")
@click.option("--likelihood", type=click.Choice(LIKELIHOODS),
              help="normal: Gaussian with a fixed sigma (0.5: the paper's loss); normal-learned, normal-pixel: "
              "sigma learned (one, or per pixel); laplace: scale learned; continuous-bernoulli: grey levels in "
              "[0, 1]; bernoulli: binarised pixels [normal].")
@click.option("--likelihood-scale", type=click.FloatRange(min=0, min_open=True),
              help="sigma of --likelihood normal, the starting sigma or b of the learned ones "
              "[0.5, the paper's; 0.3 on multi-mnist, AIR's].")
@click.option("--binarize", type=click.Choice(BINARIZATIONS), help="dynamic: train on a fresh Bernoulli draw of "
              "every pixel from its grey level each epoch, evaluate on one fixed draw of the held-out images (the "
              "standard binarised-MNIST benchmark; with --likelihood bernoulli) [none].")
@click.option("--prior", help="p(z): normal (paper), mog, vamp, flow, or one registered by a --plugin [normal].")
@click.option("--prior-components", type=click.IntRange(min=1), help="K for --prior mog and vamp [16].")
@click.option("--flow-layers", type=click.IntRange(min=1), help="Transforms in --prior flow and --guide resnet-iaf [2].")
@click.option("--guide", help="q(z | x): resnet (paper), resnet-lowrank, resnet-iaf, autonormal (needs --from), "
              "or one registered by a --plugin [resnet].")
@click.option("--guide-rank", type=click.IntRange(min=1), help="Covariance rank of --guide resnet-lowrank [4].")
@click.option("--model", "model_name", help="The model to train: "
              + "; ".join(f"{name}: {model_entry(name).description}" for name in model_names())
              + "; or one registered by a --plugin [rnp].")
@click.option("--decoder", help="The rnp model's decoder: rnp (the program executor) or one registered by a "
              "--plugin; mlp is --model vae [rnp].")
@click.option("--sparsity", type=click.Choice(SPARSITIES), help="The sparse-andor model's generator: top-k "
              "(the paper's) or none (its ablation: the same network without top-k) [top-k].")
@click.option("--critic/--no-critic", default=None, help="The sparse-andor model: learn with the paper's "
              "energy-based critic [no: see guides/sparse-andor.md].")
@click.option("--andor-output", type=click.Choice(ANDOR_OUTPUTS), help="The sparse-andor generator's last layer: "
              "linear, or a sigmoid (the paper's tanh for [0, 1] pixels) [linear: see guides/sparse-andor.md].")
@click.option("--plugin", "plugins", multiple=True,
              help="A .py file or module that registers priors, guides, decoders or models (repeatable); recorded "
                   "in the run so that load_run imports it again.")
@click.option("--from", "source_dir", type=click.Path(path_type=pathlib.Path),
              help="With --guide autonormal: the trained run whose prior and decoder are kept, frozen.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="auto picks CUDA when available.")
@click.option("--seed", type=int, help="Random seed for initialisation, shuffling and sampling [0].")
@click.option("--limit", type=click.IntRange(min=2),
              help="Use only the first N training images (with --guide autonormal: the first N held-out, 10).")
@click.option("--exclude-classes", type=ClassList(), help="Comma-separated labels to leave out of training and "
              "held-out data, e.g. 7 or 7,8 (for transfer experiments).")
@data_options
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=pathlib.Path),
              help="Where to write the run [runs/<dataset>-<timestamp>].")
@click.option("--resume", "resume_dir", type=click.Path(path_type=pathlib.Path),
              help="Continue the run in RUN_DIR from its checkpoint, with its config.")
@click.option("--eval-limit", type=click.IntRange(min=1),
              help="Held-out images evaluated after each epoch [paper: all; quick: 2000].")
@click.option("--amp", type=click.Choice(["bf16"]), help="Mixed precision: the forward pass in bfloat16 under "
              "autocast (weights, gradients and Adam stay float32), on CUDA or on a CPU that computes bfloat16 "
              "natively. Recorded in config.json; see guides/training.md.")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the encoder (and an mlp decoder). "
              "Recorded in config.json; see the README's performance section for what it gains.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.pass_context
def main(ctx, dataset, preset, epochs, batch_size, lr, head_lr_scale, z_dim, depth, steps, curriculum, hidden,
         likelihood, likelihood_scale, binarize, prior, prior_components, flow_layers, guide, guide_rank, model_name, decoder, sparsity,
         critic, andor_output, plugins, source_dir, device, seed, limit, exclude_classes, data_dir, no_download, run_dir,
         resume_dir, eval_limit, amp, compile_, quiet):
    """Train a model (a Recursive Neural Program by default) with SVI and write a run folder.

    Under torchrun (torchrun --nproc_per_node N -m pyro_rnp.fit ...) it trains with N processes:
    --batch-size is per process; see guides/scaling.md."""
    torch_device = resolve_device(device)
    check_amp(amp, torch_device)
    given = {name: ctx.params[name] for name in CONFIG_FLAGS
             if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}
    if "plugins" in given:
        given["plugins"] = _load_plugins(plugins)
    _check_component_names(prior, guide, decoder)
    if model_name is not None and model_name not in model_names():
        raise click.BadParameter(f"unknown model {model_name!r}; choose one of {', '.join(model_names())}",
                                 param_hint="--model")
    if decoder == "mlp" and model_name not in (None, "vae"):
        raise click.BadParameter("the mlp decoder is the vae model: use --model vae", param_hint="--decoder")
    if guide == "autonormal" or source_dir is not None:
        return fit_autonormal_command(ctx, source_dir, guide, resume_dir, run_dir, torch_device, data_dir,
                                      not no_download, not quiet)
    context, torch_device = distributed_setup(torch_device)  # one process unless launched by torchrun
    if resume_dir is not None:
        if run_dir is not None:
            raise click.UsageError("--resume continues a run in its own folder; drop --run-dir")
        config = read_config(resume_dir)
        check_resumable(resume_dir)
        clashes = [f"{_flag(flag)} {value}" + f" (the run has {getattr(config, CONFIG_FLAGS[flag])})"
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
        if (run_dir / CHECKPOINT).exists() or (run_dir / WEIGHTS).exists():
            raise RunError(f"{run_dir} already holds a run; use --resume {run_dir} to continue it, "
                           "or choose another --run-dir.")
    echo = click.echo if context.is_main else (lambda message: None)
    batch = (f"batch {config.batch_size} per process x {context.world} processes" if context.active
             else f"batch {config.batch_size}")
    likelihood = make_likelihood(config.likelihood, config.likelihood_scale, config.image_size).name
    if config.binarize != "none":
        likelihood += f" on {config.binarize}ally binarised images"
    depth = f"depth {config.depth}, " if config.model == "rnp" else ""
    if config.curriculum_epochs:
        n = config.curriculum_epochs
        depth = f"depth 1 to {config.depth}, {n} epoch{'s' if n != 1 else ''} per depth below {config.depth}, "
    epoch_count = f"{config.epochs} epoch{'s' if config.epochs != 1 else ''}"
    echo(f"Run folder: {run_dir}  ({config.model} on {config.dataset}, preset {config.schedule}, {epoch_count}, "
         f"{batch}, lr {config.lr:g}, {depth}likelihood {likelihood}, device {torch_device})")
    launcher = "torchrun -m pyro_rnp.fit" if context.active else "python -m pyro_rnp.fit"
    try:
        train(config, run_dir, torch_device, data_dir, download=not no_download, resume=resume_dir is not None,
              progress=not quiet, command=" ".join([launcher, *sys.argv[1:]]), context=context,
              prepare_process=True, fast=fast_path_enabled())
    finally:
        teardown(context)
    echo(f"Done. Figures in {run_dir / 'figures'}; load the model with pyro_rnp.load_run('{run_dir}').")


def fit_autonormal_command(ctx, source_dir, guide, resume_dir, run_dir, device, data_dir, download, progress):
    """``fit --guide autonormal --from RUN_DIR``: see pyro_rnp/analysis/per_image.py."""
    if guide != "autonormal":
        raise click.UsageError("--from is for --guide autonormal (fitting a few images with a trained decoder)")
    if source_dir is None:
        raise click.UsageError("--guide autonormal fits images with a trained, frozen decoder: "
                               "pass --from RUN_DIR (a run trained with an amortized guide)")
    if resume_dir is not None:
        raise click.UsageError("--resume does not apply to --guide autonormal (a run of minutes); start it again")
    params = ctx.params
    allowed = {"limit", "epochs", "lr", "seed", "guide", "source_dir", "device", "data_dir", "no_download",
               "run_dir", "quiet", "eval_limit"}
    extra = [_flag(name) for name in params
             if name not in allowed and ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]
    if extra:
        raise click.UsageError(f"{', '.join(extra)} cannot change a trained decoder; --guide autonormal takes "
                               "--from, --limit, --epochs, --lr, --seed and the data and output flags")
    n = params["limit"] or DEFAULT_IMAGES
    if n > MAX_IMAGES:
        raise click.BadParameter(f"the autonormal guide fits at most {MAX_IMAGES} images; use an amortized guide "
                                 "for more", param_hint="--limit")
    source_config = read_config(source_dir)
    source = load_run(source_dir, device=device, fast=fast_path_enabled())
    if source.config.guide == "autonormal":
        raise RunError(f"{source_dir} is itself an autonormal run; pass the run it was fitted from")
    config = dataclasses.replace(source_config, guide="autonormal", limit=n, exclude_classes=(),
                                 epochs=params["epochs"] or DEFAULT_PASSES, lr=params["lr"] or DEFAULT_LR,
                                 seed=params["seed"] if params["seed"] is not None else source_config.seed,
                                 lr_warmup_steps=0, lr_schedule="cosine", head_lr_scale=1.0)
    images, _ = held_out(config, data_dir, download, n)
    images = images.to(device)
    run_dir = pathlib.Path(run_dir or f"runs/{config.dataset}-autonormal-{time.strftime('%Y%m%d-%H%M%S')}")
    if (run_dir / "checkpoint.pt").exists():
        raise RunError(f"{run_dir} already holds a run; choose another --run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "figures").mkdir(exist_ok=True)
    write_config(run_dir, config, command=" ".join(["python -m pyro_rnp.fit", *sys.argv[1:]]), device=str(device),
                 source_run=str(source_dir))
    click.echo(f"Run folder: {run_dir}  (autonormal over {images.shape[0]} held-out {config.dataset} images, "
               f"decoder and prior from {source_dir}, frozen; {config.epochs} steps, lr {config.lr:g})")

    torch.manual_seed(config.seed)
    pyro.set_rng_seed(config.seed)
    amortized = evaluate(source, images, iw_samples=EVAL_SAMPLES)
    rnp = autonormal_from(source, images, config)
    started = time.perf_counter()

    def record(k, loss):
        if (k + 1) % 50 == 0 or k + 1 == config.epochs:
            append_metrics(run_dir, {"step": k + 1, "train_loss": loss, "wall_time_s": time.perf_counter() - started})

    prepare_process_for_training(cpu=device.type == "cpu")
    with StopRequest() as stop:
        losses = fit_autonormal(rnp, config.epochs, config.lr, config.grad_clip, progress, record,
                                stop=lambda: stop.requested, fast=fast_path_enabled())
    save_checkpoint(run_dir, rnp, None, epoch=1, step=len(losses), batch_in_epoch=0,
                    wall_time_s=time.perf_counter() - started)
    fitted = evaluate(rnp, images, iw_samples=EVAL_SAMPLES)
    result = {"n_images": images.shape[0], "steps": len(losses), "lr": config.lr, "likelihood": fitted["likelihood"],
              "source_run": str(source_dir), "neg_elbo_amortized": amortized["neg_elbo"],
              "mse_amortized": amortized["mse"], "neg_elbo_autonormal": fitted["neg_elbo"],
              "mse_autonormal": fitted["mse"], "iw_samples": EVAL_SAMPLES,
              "iwae_nll_amortized": amortized["iwae_nll"], "iwae_nll_autonormal": fitted["iwae_nll"]}
    write_result(run_dir, "autonormal.json", result)
    figure = plot_autonormal(source, rnp, images[:8], run_dir / "figures" / "autonormal.png")
    click.echo(f"{result['n_images']} images, likelihood {result['likelihood']} (nats per image): "
               f"-ELBO amortized {result['neg_elbo_amortized']:.1f} -> autonormal {result['neg_elbo_autonormal']:.1f}; "
               f"MSE {result['mse_amortized']:.4f} -> {result['mse_autonormal']:.4f}")
    click.echo(f"Written to {run_dir / 'autonormal.json'} and {figure}; the run loads with load_run('{run_dir}').")
    if len(losses) < config.epochs:
        sys.exit(130)
    return rnp


def _flag(param: str) -> str:
    """The command-line spelling of a parameter of main."""
    return {"model_name": "--model", "plugins": "--plugin", "source_dir": "--from", "resume_dir": "--resume",
            "compile_": "--compile"}.get(param, "--" + param.replace("_", "-"))


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
    """Unknown component names are refused with the valid ones, before anything is built."""
    for kind, name in (("prior", prior), ("guide", guide), ("decoder", decoder)):
        if name is not None and name not in components.names(kind):
            raise click.BadParameter(f"unknown {kind} {name!r}; choose one of {', '.join(components.names(kind))}",
                                     param_hint=f"--{kind}")


if __name__ == "__main__":
    run(main)
