"""Transfer to unseen classes (the paper's Fig. 6): ``python -m pyro_rnp.transfer RUN_DIR --classes 7``.

The run must have been trained without those classes (``fit --exclude-classes 7``).
Every decoder parameter (hypernetwork, program executor, prior) stays frozen; only
the guide's encoder is adapted, with the same SVI objective, on the unseen
classes' training images. If the learned programs are general, the unseen class
is explained once the encoder learns to find its programs.
"""
from __future__ import annotations

import json
import pathlib

import click
import torch
from tqdm.auto import tqdm

from .cli import open_run, run, run_folder_options
from .evaluate import evaluate
from .files import atomic_write
from .training import TrainStep


def freeze_decoder(rnp) -> list[torch.nn.Parameter]:
    """Freeze everything but the encoder; returns the encoder's parameters."""
    for p in rnp.parameters():
        p.requires_grad_(False)
    encoder = list(rnp.encoder.parameters())
    for p in encoder:
        p.requires_grad_(True)
    return encoder


def adapt_encoder(rnp, images: torch.Tensor, epochs: int, lr: float, batch_size: int = 64, grad_clip: float = 0.2,
                  seed: int = 0, progress: bool = False) -> list[float]:
    """SVI steps on the encoder alone; returns the mean loss per image of each epoch."""
    optimizer = torch.optim.Adam(freeze_decoder(rnp), lr=lr)
    step = TrainStep(rnp, optimizer, grad_clip, frozen=(rnp.executor, rnp.prior))
    device = next(rnp.parameters()).device
    batch_size = min(batch_size, images.shape[0])
    losses = []
    for epoch in range(epochs):
        order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed + epoch))
        total, seen = 0.0, 0
        bar = tqdm(range(images.shape[0] // batch_size), desc=f"adapt encoder {epoch + 1}/{epochs}", unit="batch",
                   leave=False, disable=not progress)
        for b in bar:
            x = images[order[b * batch_size:(b + 1) * batch_size]].to(device)
            loss, applied = step(x)
            if applied:
                total, seen = total + loss.item(), seen + x.shape[0]
            bar.set_postfix(loss=f"{total / max(seen, 1):.1f}")
        losses.append(total / max(seen, 1))
    rnp.eval()
    return losses


def plot_transfer(rnp, x: torch.Tensor, before: dict, path) -> pathlib.Path:
    """Unseen images: the data, then reconstruction and parts before and after adaptation."""
    from .figures import _grid, colour_parts
    tree = rnp.parse(x)
    rows = [("data", x[:, 0].cpu().numpy()),
            ("before", before["mean"]), ("parts before", before["parts"]),
            ("after", rnp.likelihood.mean(tree.canvas)[:, 0].cpu().numpy()), ("parts after", colour_parts(tree.placed))]
    return _grid(rows, path, "unseen class, encoder adapted with the decoder frozen")


@click.command(name="pyro_rnp.transfer", context_settings={"help_option_names": ["-h", "--help"]})
@run_folder_options
@click.option("--classes", required=True, help="Comma-separated unseen labels, e.g. 7.")
@click.option("--epochs", type=click.IntRange(min=1), default=3, show_default=True,
              help="Passes over the unseen classes' training images.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Adam learning rate [the run's lr].")
@click.option("--limit", type=click.IntRange(min=1), help="Use the first N training images of the unseen classes.")
@click.option("--eval-limit", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Held-out images evaluated for each of seen and unseen.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def main(run_dir, classes, epochs, lr, limit, eval_limit, device, data_dir, no_download, seed, quiet):
    """Adapt only the encoder of the run in RUN_DIR to classes it never saw; write RUN_DIR/transfer.json
    and RUN_DIR/figures/transfer.png."""
    from . import data as datasets
    from .fit import ClassList

    unseen = ClassList().convert(classes, None, None)
    config, rnp, torch_device = open_run(run_dir, device)
    missing = sorted(set(unseen) - set(config.exclude_classes))
    if missing:
        raise click.BadParameter(
            f"the run was trained on class {', '.join(map(str, missing))} (it excluded "
            f"{list(config.exclude_classes) or 'nothing'}); train with fit --exclude-classes "
            f"{','.join(map(str, unseen))} first", param_hint="--classes")
    if config.dataset == "omniglot":
        raise click.BadParameter("transfer runs on mnist and fashion runs (Omniglot's test set has other classes)",
                                 param_hint="RUN_DIR")
    not_unseen = tuple(c for c in range(len(datasets.class_names(config.dataset))) if c not in unseen)

    def load(split, exclude, n):
        return datasets.load_images(config.dataset, split, data_dir, not no_download, n, exclude).tensors[0]

    train_unseen = load("train", not_unseen, limit)
    test_unseen = load("test", not_unseen, eval_limit)
    test_seen = load("test", tuple(unseen), eval_limit)
    if train_unseen.shape[0] < 2:
        raise click.BadParameter(f"no training images of class {classes}", param_hint="--classes")
    torch.manual_seed(seed)
    before_unseen = evaluate(rnp, test_unseen)
    seen = evaluate(rnp, test_seen)
    shown = test_unseen[:8].to(torch_device)
    from .figures import colour_parts
    tree = rnp.parse(shown)
    before = {"mean": rnp.likelihood.mean(tree.canvas)[:, 0].cpu().numpy(), "parts": colour_parts(tree.placed)}
    losses = adapt_encoder(rnp, train_unseen, epochs, lr or config.lr, config.batch_size, config.grad_clip, seed,
                           progress=not quiet)
    after_unseen = evaluate(rnp, test_unseen)
    result = {"classes": list(unseen), "epochs": epochs, "lr": lr or config.lr, "train_images": train_unseen.shape[0],
              "likelihood": seen["likelihood"], "seen_mse": seen["mse"], "seen_neg_elbo": seen["neg_elbo"],
              "unseen_mse_before": before_unseen["mse"], "unseen_neg_elbo_before": before_unseen["neg_elbo"],
              "unseen_mse_after": after_unseen["mse"], "unseen_neg_elbo_after": after_unseen["neg_elbo"],
              "n_seen": seen["n_images"], "n_unseen": after_unseen["n_images"], "adaptation_loss": losses}
    atomic_write(pathlib.Path(run_dir) / "transfer.json", lambda p: p.write_text(json.dumps(result, indent=2) + "\n"))
    figure = plot_transfer(rnp, shown, before, pathlib.Path(run_dir) / "figures" / "transfer.png")
    click.echo(f"{config.dataset}, unseen classes {list(unseen)}, likelihood {result['likelihood']} "
               f"(MSE; -ELBO in nats per image)")
    click.echo(f"  seen classes:          MSE {seen['mse']:.4f}  -ELBO {seen['neg_elbo']:.1f}")
    click.echo(f"  unseen, before:        MSE {before_unseen['mse']:.4f}  -ELBO {before_unseen['neg_elbo']:.1f}")
    click.echo(f"  unseen, encoder adapted: MSE {after_unseen['mse']:.4f}  -ELBO {after_unseen['neg_elbo']:.1f}")
    click.echo(f"Written to {pathlib.Path(run_dir) / 'transfer.json'} and {figure}")


if __name__ == "__main__":
    run(main)
