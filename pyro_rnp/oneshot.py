"""Fit a few images as programs with a trained, frozen decoder: the autonormal guide.

    python -m pyro_rnp.fit --guide autonormal --from RUN_DIR --limit 10 [--epochs 500]

Each of the first N held-out images gets its own Normal q(z_n) (Pyro's AutoNormal),
started at the source run's amortized posterior (mean and diagonal scale); SVI then moves only those,
with the prior and decoder frozen. Comparing the result with the amortized guide on
the same images measures the amortization gap: how much the encoder loses by
predicting q from x in one pass. Use it to explain specific images as well as the
model can; use the amortized guides for anything that sees new images.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import time

import click
import pyro
import torch
from tqdm.auto import tqdm

from .cli import held_out
from .evaluate import evaluate
from .files import atomic_write
from .guides import AutoNormalGuide
from .model import RNP
from .runs import RunError, append_metrics, load_run, read_config, save_checkpoint, write_config
from .training import TrainStep, make_optimizer

DEFAULT_IMAGES = 10
DEFAULT_PASSES = 500
DEFAULT_LR = 0.01
MAX_IMAGES = 1000  # one SVI step sees every image
EVAL_SAMPLES = 50  # samples per image for the comparison: with one, the mean -ELBO of 100 images moves by nats


def autonormal_from(source: RNP, images: torch.Tensor, config) -> RNP:
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
    rnp = RNP(config, prior=source.prior, guide=guide.to(images.device), decoder=source.executor)
    for module in (rnp.executor, rnp.prior):
        for p in module.parameters():
            p.requires_grad_(False)
    return rnp


def fit_autonormal(rnp: RNP, passes: int, lr: float, grad_clip: float = 0.2, progress: bool = False,
                   on_pass=None, stop=None) -> list[float]:
    """SVI on the AutoNormal's parameters alone, all fitted images per step, the rate decaying to 0
    by a cosine; returns the loss per image of every pass. ``on_pass(k, loss)`` is called after each; ``stop()`` ends early."""
    images = rnp.encoder.fitted_images
    optimizer = make_optimizer(rnp, lr)
    # cosine decay to 0: with one noisy sample per step, a constant rate leaves each image's q jittering
    step = TrainStep(rnp, optimizer, grad_clip, schedule="cosine", total_steps=passes,
                     frozen=(rnp.executor, rnp.prior))
    losses = []
    bar = tqdm(range(passes), desc="fit autonormal", unit="step", disable=not progress, dynamic_ncols=True)
    for k in bar:
        loss, applied = step(images, k)
        losses.append(loss.item() / images.shape[0] if applied else float("nan"))
        bar.set_postfix(loss=f"{losses[-1]:.1f}")
        if on_pass is not None:
            on_pass(k, losses[-1])
        if stop is not None and stop():
            break
    rnp.eval()
    return losses


def fit_autonormal_command(ctx, source_dir, guide, resume_dir, run_dir, device, data_dir, download, progress):
    """``fit --guide autonormal --from RUN_DIR``: see the module docstring."""
    from .fit import StopRequest

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
    extra = [f"--{name.replace('_', '-')}" for name in params
             if name not in allowed and ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]
    if extra:
        raise click.UsageError(f"{', '.join(extra)} cannot change a trained decoder; --guide autonormal takes "
                               "--from, --limit, --epochs, --lr, --seed and the data and output flags")
    n = params["limit"] or DEFAULT_IMAGES
    if n > MAX_IMAGES:
        raise click.BadParameter(f"the autonormal guide fits at most {MAX_IMAGES} images; use an amortized guide "
                                 "for more", param_hint="--limit")
    source_config = read_config(source_dir)
    source = load_run(source_dir, device=device)
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

    with StopRequest() as stop:
        losses = fit_autonormal(rnp, config.epochs, config.lr, config.grad_clip, progress, record,
                                stop=lambda: stop.requested)
    save_checkpoint(run_dir, rnp, None, epoch=1, step=len(losses), batch_in_epoch=0,
                    wall_time_s=time.perf_counter() - started)
    fitted = evaluate(rnp, images, iw_samples=EVAL_SAMPLES)
    result = {"n_images": images.shape[0], "steps": len(losses), "lr": config.lr, "likelihood": fitted["likelihood"],
              "source_run": str(source_dir), "neg_elbo_amortized": amortized["neg_elbo"],
              "mse_amortized": amortized["mse"], "neg_elbo_autonormal": fitted["neg_elbo"],
              "mse_autonormal": fitted["mse"], "iw_samples": EVAL_SAMPLES,
              "iwae_nll_amortized": amortized["iwae_nll"], "iwae_nll_autonormal": fitted["iwae_nll"]}
    atomic_write(run_dir / "autonormal.json", lambda p: p.write_text(json.dumps(result, indent=2) + "\n"))
    figure = plot_autonormal(source, rnp, images[:8], run_dir / "figures" / "autonormal.png")
    click.echo(f"{result['n_images']} images, likelihood {result['likelihood']} (nats per image): "
               f"-ELBO amortized {result['neg_elbo_amortized']:.1f} -> autonormal {result['neg_elbo_autonormal']:.1f}; "
               f"MSE {result['mse_amortized']:.4f} -> {result['mse_autonormal']:.4f}")
    click.echo(f"Written to {run_dir / 'autonormal.json'} and {figure}; the run loads with load_run('{run_dir}').")
    if len(losses) < config.epochs:
        sys.exit(130)
    return rnp


def plot_autonormal(source: RNP, fitted: RNP, x: torch.Tensor, path) -> pathlib.Path:
    from .figures import _grid, colour_parts
    rows = [("data", x[:, 0].cpu().numpy())]
    for label, rnp in (("amortized", source), ("autonormal", fitted)):
        rows.append((label, rnp.reconstruct(x)[:, 0].cpu().numpy()))
        if rnp.has_parts:
            rows.append((f"parts, {label}", colour_parts(rnp.parse(x).placed)))
    return _grid(rows, path, "the same images: amortized guide vs one Normal per image (decoder frozen)")
