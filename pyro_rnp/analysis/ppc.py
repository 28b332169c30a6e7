"""Posterior and prior predictive checks (the command: ``python -m pyro_rnp.ppc RUN_DIR``).

For each held-out image x, S replicated images are drawn from p(x_rep | z) with
z ~ q(z | x) (``pyro.infer.Predictive`` with the run's guide). A discrepancy
statistic T is computed on x and on each replicate; its posterior predictive
p-value is P(T(x_rep) >= T(x)), ties counted half, so a model whose replicates
equal the data gets 0.5. p-values piling up near 0 or 1 say the model misses
that aspect of the data. The prior predictive check compares T on images drawn
with z from the prior against T on the data.
"""
from __future__ import annotations

import pathlib

import torch
from pyro.infer import Predictive
from tqdm.auto import tqdm

from ..model.registry import require
from .evaluate import MAX_PROGRAMS
from .plots import plt, save_figure


def statistics(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Discrepancy statistics of images (..., 1, H, W) -> {name: (...)}."""
    x = images[..., 0, :, :].float()
    h, w = x.shape[-2:]
    mass = x.clamp(min=0)
    total = mass.sum((-2, -1)).clamp(min=1e-8)
    ys = torch.linspace(0, 1, h, device=x.device).view(h, 1)
    xs = torch.linspace(0, 1, w, device=x.device).view(1, w)
    cx = (mass * xs).sum((-2, -1)) / total
    cy = (mass * ys).sum((-2, -1)) / total
    spread = (mass * ((xs - cx[..., None, None]) ** 2 + (ys - cy[..., None, None]) ** 2)).sum((-2, -1)) / total
    edges = (x[..., 1:, :] - x[..., :-1, :]).pow(2).sum((-2, -1)) + (x[..., :, 1:] - x[..., :, :-1]).pow(2).sum((-2, -1))
    return {"mean_intensity": x.mean((-2, -1)), "ink_fraction": (x > 0.5).float().mean((-2, -1)),
            "centroid_x": cx, "centroid_y": cy, "spread": spread, "edge_energy": edges}


def p_values(observed: torch.Tensor, replicated: torch.Tensor) -> torch.Tensor:
    """observed (B,), replicated (S, B) -> P(T_rep >= T_obs) per image, ties counted half."""
    greater = (replicated > observed).float().mean(0)
    ties = (replicated == observed).float().mean(0)
    return greater + 0.5 * ties


@torch.no_grad()
def posterior_replicates(rnp, x: torch.Tensor, samples: int) -> torch.Tensor:
    """(samples, B, 1, H, W) images from p(x_rep | z), z ~ q(z | x)."""
    def replicate(images):  # the guide reads the images; the model generates afresh
        return rnp.model(None, batch_size=images.shape[0])
    predictive = Predictive(replicate, guide=rnp.guide, num_samples=samples, return_sites=["x"],
                            parallel=getattr(rnp, "particle_plate", True))
    return predictive(x)["x"]


@torch.no_grad()
def prior_samples(rnp, n: int) -> torch.Tensor:
    parallel = getattr(rnp, "particle_plate", True)  # AIR and DM-VAE take no outer plate (registry.py)
    return Predictive(rnp.model, num_samples=1, return_sites=["x"], parallel=parallel)(None, batch_size=n)["x"][0]


@torch.no_grad()
def posterior_predictive_check(rnp, images: torch.Tensor, samples: int = 20, progress: bool = False) -> dict:
    """Per statistic: the p-value of every image and a summary; plus the prior predictive check."""
    require(rnp, "guide", "a posterior predictive check")
    rnp.eval()
    device = next(rnp.parameters()).device
    per_batch = max(1, MAX_PROGRAMS // samples)
    pvals, observed_stats, replicated_stats = {}, {}, {}
    keep = None
    for start in tqdm(range(0, images.shape[0], per_batch), desc=f"ppc (S={samples})", unit="batch",
                      leave=False, disable=not progress):
        x = images[start:start + per_batch].to(device)
        reps = posterior_replicates(rnp, x, samples)
        if keep is None:
            keep = (x[:4].cpu(), reps[:3, :4].cpu())
        t_obs, t_rep = statistics(x), statistics(reps)
        for name in t_obs:
            pvals.setdefault(name, []).append(p_values(t_obs[name], t_rep[name]).cpu())
            observed_stats.setdefault(name, []).append(t_obs[name].cpu())
            replicated_stats.setdefault(name, []).append(t_rep[name].flatten().cpu())
    prior = statistics(prior_samples(rnp, min(images.shape[0], MAX_PROGRAMS)).cpu())
    result = {"samples": samples, "n_images": images.shape[0], "likelihood": rnp.likelihood.name, "statistics": {}}
    arrays = {}
    for name in pvals:
        p, obs, rep = torch.cat(pvals[name]), torch.cat(observed_stats[name]), torch.cat(replicated_stats[name])
        lo, hi = torch.quantile(prior[name], torch.tensor([0.025, 0.975]))
        result["statistics"][name] = {
            "mean_p_value": p.mean().item(), "fraction_p_below_0.05": (p < 0.05).float().mean().item(),
            "fraction_p_above_0.95": (p > 0.95).float().mean().item(),
            "data_mean": obs.mean().item(), "replicated_mean": rep.mean().item(),
            "prior_mean": prior[name].mean().item(),
            "fraction_data_inside_prior_95": ((obs >= lo) & (obs <= hi)).float().mean().item(),
        }
        arrays[name] = (p, obs, rep, prior[name])
    return result, arrays, keep


def plot_ppc(arrays, keep, folder: pathlib.Path, samples: int) -> list[pathlib.Path]:
    folder.mkdir(parents=True, exist_ok=True)
    x, reps = keep
    fig, axes = plt.subplots(x.shape[0], 1 + reps.shape[0], figsize=(1.3 * (1 + reps.shape[0]), 1.3 * x.shape[0]),
                             squeeze=False)
    for i in range(x.shape[0]):
        for j in range(1 + reps.shape[0]):
            image = x[i, 0] if j == 0 else reps[j - 1, i, 0]
            axes[i, j].imshow(image.clamp(0, 1), cmap="gray", vmin=0, vmax=1)
            axes[i, j].set_xticks([]), axes[i, j].set_yticks([])
            if i == 0:
                axes[i, j].set_title("observed" if j == 0 else f"replicate {j}", fontsize=8)
    fig.tight_layout()
    replicates_path = save_figure(fig, folder / "ppc_replicates.png")

    fig, axes = plt.subplots(2, len(arrays), figsize=(2.6 * len(arrays), 5), squeeze=False)
    for k, (name, (p, obs, rep, prior)) in enumerate(arrays.items()):
        ax = axes[0, k]
        ax.hist(rep.numpy(), bins=40, density=True, alpha=0.5, label=f"replicated (S={samples})")
        ax.hist(prior.numpy(), bins=40, density=True, alpha=0.4, label="prior predictive")
        ax.hist(obs.numpy(), bins=40, density=True, histtype="step", color="k", label="observed")
        ax.set_title(name, fontsize=9)
        if k == 0:
            ax.legend(fontsize=6)
        axes[1, k].hist(p.numpy(), bins=20, range=(0, 1), color="gray")
        axes[1, k].set_xlabel("posterior predictive p-value", fontsize=8)
    fig.tight_layout()
    stats_path = save_figure(fig, folder / "ppc_statistics.png")
    return [replicates_path, stats_path]
