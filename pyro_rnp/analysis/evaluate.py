"""Held-out numbers for a trained model with a guide (the command: ``python -m pyro_rnp.evaluate``).

All in nats per image under the run's likelihood, without the part-level
regulariser (it is a penalty, not part of the probabilistic model):
  neg_elbo   -E_q[log p(x, z) - log q(z | x)], estimated with K samples from the guide;
  iwae_nll   -log (1/K) sum_k p(x, z_k) / q(z_k | x), the importance-weighted bound on
             -log p(x) from the same K samples (equal to neg_elbo at K = 1, never above it);
  mse        squared error per pixel of the reconstruction at the posterior mean.
"""
from __future__ import annotations

import math

import pyro
import pyro.poutine as poutine
import torch
from tqdm.auto import tqdm

from ..model.registry import require

MAX_PROGRAMS = 256  # images x samples run at once (evaluation and predictive checks): about 0.3 GB at paper sizes


@torch.no_grad()
def log_weights(rnp, x: torch.Tensor, particles: int) -> torch.Tensor:
    """log p(x, z_k) - log q(z_k | x) for z_k ~ q(z | x): (particles, B), all particles in one pass: as an
    outer plate, or, for a model whose ``particle_plate`` is False (AIR), on the batch repeated."""
    n = x.shape[0]
    if getattr(rnp, "particle_plate", True):
        with pyro.plate("particles", particles, dim=-2):
            guide_trace = poutine.trace(rnp.guide).get_trace(x)
            model_trace = poutine.trace(poutine.replay(rnp.model, trace=guide_trace)).get_trace(x, part_term=False)
    else:
        x = x.repeat(particles, *([1] * (x.dim() - 1)))  # particle k is rows k * n ... (k + 1) * n - 1
        guide_trace = poutine.trace(rnp.guide).get_trace(x)
        model_trace = poutine.trace(poutine.replay(rnp.model, trace=guide_trace)).get_trace(x, part_term=False)
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    log_p = sum(site["log_prob"] for site in model_trace.nodes.values() if site["type"] == "sample")
    log_q = sum(site["log_prob"] for site in guide_trace.nodes.values() if site["type"] == "sample")
    return (log_p - log_q).reshape(-1, n).expand(particles, n)


@torch.no_grad()
def evaluate(rnp, images: torch.Tensor, labels: torch.Tensor | None = None, iw_samples: int = 1,
             batch_size: int | None = None, device=None, progress: bool = False) -> dict:
    """images (N, 1, 28, 28) in [0, 1] -> {"neg_elbo", "iwae_nll", "iw_samples", "mse", "likelihood",
    "n_images"} and, with labels, "per_class": {label: the same three numbers and "n_images"}."""
    require(rnp, "guide", "evaluation")
    device = device or next(rnp.parameters()).device
    was_training = rnp.training
    rnp.eval()
    n = images.shape[0]
    # a model whose guide infers each image by an inner loop (the sparse AND-OR generator's Langevin)
    # names its own batch: its inference is the cost, not the importance samples
    per_batch = batch_size or getattr(rnp, "evaluation_batch", None) or max(1, MAX_PROGRAMS // min(iw_samples,
                                                                                                  MAX_PROGRAMS))
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
