"""Held-out numbers for a trained RNP: negative ELBO per image (nats, under the named likelihood,
without the part-level regulariser) and reconstruction MSE at the posterior mean."""
from __future__ import annotations

import torch
from pyro.infer import Trace_ELBO
from tqdm.auto import tqdm


@torch.no_grad()
def evaluate(rnp, images: torch.Tensor, batch_size: int = 250, device=None, progress: bool = False) -> dict:
    """images (N, 1, 28, 28) in [0, 1] -> {"neg_elbo", "mse", "n_images", "likelihood"}.

    The ELBO is a one-sample estimate per image (z from the guide), averaged over images.
    """
    device = device or next(rnp.parameters()).device
    was_training = rnp.training
    rnp.eval()
    elbo = Trace_ELBO()
    total_loss = total_se = 0.0
    n = images.shape[0]
    try:
        for start in tqdm(range(0, n, batch_size), desc="evaluate", leave=False, disable=not progress):
            x = images[start:start + batch_size].to(device)
            total_loss += elbo.loss(rnp.model, rnp.guide, x, part_term=False)
            total_se += (rnp.reconstruct(x) - x).pow(2).sum().item()
    finally:
        rnp.train(was_training)
    return {"neg_elbo": total_loss / n, "mse": total_se / (n * images[0].numel()), "n_images": n,
            "likelihood": rnp.likelihood.name}
