"""Held-out numbers for a trained RNP: ``python -m pyro_rnp.evaluate RUN_DIR [--iw-samples K]``.

All in nats per image under the run's likelihood, without the part-level
regulariser (it is a penalty, not part of the probabilistic model):
  neg_elbo   -E_q[log p(x, z) - log q(z | x)], estimated with K samples from the guide;
  iwae_nll   -log (1/K) sum_k p(x, z_k) / q(z_k | x), the importance-weighted bound on
             -log p(x) from the same K samples (equal to neg_elbo at K = 1, never above it);
  mse        squared error per pixel of the reconstruction at the posterior mean.
"""
from __future__ import annotations

import json
import math
import pathlib

import click
import pyro
import pyro.poutine as poutine
import torch
from tqdm.auto import tqdm

from .cli import held_out, open_run, run, run_folder_options

MAX_PROGRAMS = 256  # images x particles run at once: about 0.3 GB at paper sizes


@torch.no_grad()
def log_weights(rnp, x: torch.Tensor, particles: int) -> torch.Tensor:
    """log p(x, z_k) - log q(z_k | x) for z_k ~ q(z | x): (particles, B), all particles in one pass."""
    with pyro.plate("particles", particles, dim=-2):
        guide_trace = poutine.trace(rnp.guide).get_trace(x)
        model_trace = poutine.trace(poutine.replay(rnp.model, trace=guide_trace)).get_trace(x, part_term=False)
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    log_p = sum(site["log_prob"] for site in model_trace.nodes.values() if site["type"] == "sample")
    log_q = sum(site["log_prob"] for site in guide_trace.nodes.values() if site["type"] == "sample")
    return (log_p - log_q).expand(particles, x.shape[0])


@torch.no_grad()
def evaluate(rnp, images: torch.Tensor, labels: torch.Tensor | None = None, iw_samples: int = 1,
             batch_size: int | None = None, device=None, progress: bool = False) -> dict:
    """images (N, 1, 28, 28) in [0, 1] -> {"neg_elbo", "iwae_nll", "iw_samples", "mse", "likelihood",
    "n_images"} and, with labels, "per_class": {label: the same three numbers and "n_images"}."""
    device = device or next(rnp.parameters()).device
    was_training = rnp.training
    rnp.eval()
    n = images.shape[0]
    per_batch = batch_size or max(1, MAX_PROGRAMS // min(iw_samples, MAX_PROGRAMS))
    chunk = max(1, MAX_PROGRAMS // per_batch)  # particles per pass
    elbo, iwae, se = (torch.empty(n, dtype=torch.float64) for _ in range(3))
    try:
        for start in tqdm(range(0, n, per_batch), desc=f"evaluate (K={iw_samples})", unit="batch", leave=False,
                          disable=not progress):
            x = images[start:start + per_batch].to(device)
            lw = torch.cat([log_weights(rnp, x, min(chunk, iw_samples - k))
                            for k in range(0, iw_samples, chunk)]).double()
            end = start + x.shape[0]
            elbo[start:end] = lw.mean(0).cpu()
            iwae[start:end] = (torch.logsumexp(lw, 0) - math.log(iw_samples)).cpu()
            se[start:end] = (rnp.reconstruct(x) - x).pow(2).flatten(1).mean(1).double().cpu()
    finally:
        rnp.train(was_training)
    result = _summary(elbo, iwae, se)
    result.update(iw_samples=iw_samples, likelihood=rnp.likelihood.name)
    if labels is not None:
        labels = labels[:n].cpu()
        result["per_class"] = {int(c): _summary(elbo[labels == c], iwae[labels == c], se[labels == c])
                               for c in labels.unique()}
    return result


def _summary(elbo, iwae, se) -> dict:
    return {"neg_elbo": -elbo.mean().item(), "iwae_nll": -iwae.mean().item(), "mse": se.mean().item(),
            "n_images": int(elbo.numel())}


@click.command(name="pyro_rnp.evaluate", context_settings={"help_option_names": ["-h", "--help"]})
@run_folder_options
@click.option("--iw-samples", type=click.IntRange(min=1), default=1, show_default=True,
              help="Importance samples K per image for the IWAE bound (K=1: the ELBO).")
@click.option("--limit", type=click.IntRange(min=1), help="Use the first N held-out images [all].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the guide's samples.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON line instead of a table.")
def main(run_dir, iw_samples, limit, device, data_dir, no_download, seed, as_json):
    """Held-out -ELBO, IWAE bound and MSE of the run in RUN_DIR, overall and per class; also written
    to RUN_DIR/eval.json."""
    from . import data as datasets

    config, rnp, torch_device = open_run(run_dir, device)
    images, labels = held_out(config, data_dir, not no_download, limit)
    pyro.set_rng_seed(seed)
    result = evaluate(rnp, images, labels, iw_samples, device=torch_device, progress=not as_json)
    result.update(run_dir=str(run_dir), dataset=config.dataset, split="test", seed=seed)
    (pathlib.Path(run_dir) / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    if as_json:
        click.echo(json.dumps(result))
        return
    names = datasets.class_names(config.dataset, "test", data_dir) if config.dataset != "omniglot" else None
    click.echo(f"{config.dataset} test, {result['n_images']} images, likelihood {result['likelihood']}, "
               f"K={iw_samples} (nats per image)")
    click.echo(f"{'class':<14}{'n':>6}{'-ELBO':>10}{'IWAE NLL':>10}{'MSE':>9}")
    rows = [(names[c] if names else str(c), r) for c, r in result.get("per_class", {}).items()]
    if names:
        for label, r in rows:
            click.echo(f"{label[:13]:<14}{r['n_images']:>6}{r['neg_elbo']:>10.1f}{r['iwae_nll']:>10.1f}"
                       f"{r['mse']:>9.4f}")
    click.echo(f"{'all':<14}{result['n_images']:>6}{result['neg_elbo']:>10.1f}{result['iwae_nll']:>10.1f}"
               f"{result['mse']:>9.4f}")
    click.echo(f"Written to {pathlib.Path(run_dir) / 'eval.json'}")


if __name__ == "__main__":
    run(main)
