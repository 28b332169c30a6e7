"""``python -m pyro_rnp.transfer RUN_DIR --classes 7``: adapt only the encoder to classes the run never saw.

What is frozen, what is trained and why: pyro_rnp/analysis/transfer.py.
"""
from __future__ import annotations

import pathlib

import click
import torch

from .analysis.evaluate import evaluate
from .analysis.transfer import adapt_encoder, plot_transfer, snapshot
from .cli import ClassList, analysis_options, fast_path_enabled, open_run, run, write_result
from .fast import prepare_process_for_training
from .training.step import mixed_precision

@click.command(name="pyro_rnp.transfer", context_settings={"help_option_names": ["-h", "--help"]})
@analysis_options(limit_default=1000, limit_aliases=("--eval-limit",),
                  limit_help="Held-out images evaluated for each of seen and unseen classes.")
@click.option("--classes", required=True, help="Comma-separated unseen labels, e.g. 7.")
@click.option("--epochs", type=click.IntRange(min=1), default=3, show_default=True,
              help="Passes over the unseen classes' training images.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Adam learning rate [the run's lr].")
@click.option("--train-limit", type=click.IntRange(min=1),
              help="Use the first N training images of the unseen classes [all].")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def main(run_dir, classes, epochs, lr, train_limit, limit, device, amp, data_dir, no_download, seed, quiet):
    """Adapt only the encoder of the run in RUN_DIR to classes it never saw; write RUN_DIR/transfer.json
    and RUN_DIR/figures/transfer.png."""
    from . import data as datasets

    unseen = ClassList().convert(classes, None, None)
    config, rnp, torch_device = open_run(run_dir, device, needs="guide", what="transfer", amp=amp)
    if not hasattr(rnp, "encoder"):
        raise click.BadParameter(f"transfer adapts the encoder of an rnp or vae run; the {config.model} model's guide "
                                 "is not one encoder", param_hint="RUN_DIR")
    missing = sorted(set(unseen) - set(config.exclude_classes))
    if missing:
        raise click.BadParameter(
            f"the run was trained on class {', '.join(map(str, missing))} (it excluded "
            f"{list(config.exclude_classes) or 'nothing'}); train with fit --exclude-classes "
            f"{','.join(map(str, unseen))} first", param_hint="--classes")
    if config.dataset in ("omniglot", "multi-mnist"):
        raise click.BadParameter("transfer runs on mnist and fashion runs (Omniglot's test set has other classes; "
                                 "Multi-MNIST's classes are digit counts)",
                                 param_hint="RUN_DIR")
    not_unseen = tuple(c for c in range(len(datasets.class_names(config.dataset))) if c not in unseen)

    def load(split, exclude, n):
        return datasets.load_images(config.dataset, split, data_dir, not no_download, n, exclude).tensors[0]

    train_unseen = load("train", not_unseen, train_limit)
    test_unseen = load("test", not_unseen, limit)
    test_seen = load("test", tuple(unseen), limit)
    if train_unseen.shape[0] < 2:
        raise click.BadParameter(f"no training images of class {classes}", param_hint="--classes")
    torch.manual_seed(seed)
    with mixed_precision(amp, torch_device):
        before_unseen = evaluate(rnp, test_unseen)
        seen = evaluate(rnp, test_seen)
        shown = test_unseen[:8].to(torch_device)
        before = snapshot(rnp, shown)
    prepare_process_for_training(cpu=torch_device.type == "cpu")
    losses = adapt_encoder(rnp, train_unseen, epochs, lr or config.lr, config.batch_size, config.grad_clip, seed,
                           progress=not quiet, fast=fast_path_enabled(), amp=amp)
    with mixed_precision(amp, torch_device):
        after_unseen = evaluate(rnp, test_unseen)
    result = {"classes": list(unseen), "epochs": epochs, "lr": lr or config.lr, "train_images": train_unseen.shape[0],
              "amp": amp,
              "likelihood": seen["likelihood"], "seen_mse": seen["mse"], "seen_neg_elbo": seen["neg_elbo"],
              "unseen_mse_before": before_unseen["mse"], "unseen_neg_elbo_before": before_unseen["neg_elbo"],
              "unseen_mse_after": after_unseen["mse"], "unseen_neg_elbo_after": after_unseen["neg_elbo"],
              "n_seen": seen["n_images"], "n_unseen": after_unseen["n_images"], "adaptation_loss": losses}
    write_result(run_dir, "transfer.json", result)
    with mixed_precision(amp, torch_device):
        figure = plot_transfer(rnp, shown, before, pathlib.Path(run_dir) / "figures" / "transfer.png")
    click.echo(f"{config.dataset}, unseen classes {list(unseen)}, likelihood {result['likelihood']} "
               f"(MSE; -ELBO in nats per image)")
    click.echo(f"  seen classes:          MSE {seen['mse']:.4f}  -ELBO {seen['neg_elbo']:.1f}")
    click.echo(f"  unseen, before:        MSE {before_unseen['mse']:.4f}  -ELBO {before_unseen['neg_elbo']:.1f}")
    click.echo(f"  unseen, encoder adapted: MSE {after_unseen['mse']:.4f}  -ELBO {after_unseen['neg_elbo']:.1f}")
    click.echo(f"Written to {pathlib.Path(run_dir) / 'transfer.json'} and {figure}")


if __name__ == "__main__":
    run(main)
