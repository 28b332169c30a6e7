"""How well a model counts the objects in a scene (Multi-MNIST: 0, 1 or 2 digits).

count accuracy  the share of held-out scenes whose count the model gets right, with the
                confusion matrix (rows: true count, columns: predicted). A model with a count
                variable (capability "count": AIR's z_pres) is read directly; a model without
                one is given a linear probe: multinomial logistic regression from its guide's
                point estimate of z (``encode``) to the count, fitted on training scenes, and
                reported as a probe, since the probe, not the model, does the counting.
part purity     how well a model's parts say which digit they draw: the normalised mutual
                information (NMI, 0 to 1) between each part's identity and the digit, over the
                parts found in held-out scenes of exactly one digit (whose parts can only belong
                to that digit; Pyro's generator does not record where each digit of a two-digit
                scene is). A part's identity is DM-VAE's address, a k-means cluster (k = 10) of
                AIR's z_what, or a k-means cluster of the RNP's top-level part programs.
"""
from __future__ import annotations

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import normalized_mutual_info_score

from ..model.registry import has

BATCH = 256


def confusion(predicted: torch.Tensor, true: torch.Tensor, classes: int) -> dict:
    """{"accuracy", "confusion" (classes x classes, rows true, columns predicted), "n_images"} of integer
    predictions against integer truths, both (N,); a prediction outside [0, classes) counts as wrong
    (and in no column)."""
    predicted, true = predicted.long().cpu(), true.long().cpu()
    matrix = torch.zeros(classes, classes, dtype=torch.int64)
    inside = (predicted >= 0) & (predicted < classes)
    matrix.index_put_((true[inside], predicted[inside]), torch.ones(int(inside.sum()), dtype=torch.int64),
                      accumulate=True)
    return {"accuracy": (predicted == true).double().mean().item() if true.numel() else float("nan"),
            "confusion": matrix.tolist(), "n_images": int(true.numel())}


@torch.no_grad()
def _in_batches(function, images: torch.Tensor, device) -> torch.Tensor:
    return torch.cat([function(images[k:k + BATCH].to(device)).cpu() for k in range(0, images.shape[0], BATCH)])


@torch.no_grad()
def count_accuracy(model, images: torch.Tensor, counts: torch.Tensor, classes: int = 3,
                   train: tuple[torch.Tensor, torch.Tensor] | None = None, seed: int = 0) -> dict:
    """Count accuracy of ``model`` on held-out scenes ``images`` (N, 1, H, W) with true ``counts`` (N,):
    {"accuracy", "confusion", "n_images", "method"}. Models without the "count" capability need
    ``train`` = (training images, their counts) for the probe (method "linear probe on z")."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        if has(model, "count"):
            result = confusion(_in_batches(model.count, images, device), counts, classes)
            result["method"] = "the model's own count"
            return result
        if train is None:
            raise ValueError("this model has no count variable: pass training scenes for the linear probe")
        features = _in_batches(model.encode, train[0], device).double().numpy()
        probe = LogisticRegression(max_iter=2000, random_state=seed).fit(features, train[1].numpy())
        held_out = _in_batches(model.encode, images, device).double().numpy()
        predicted = torch.from_numpy(np.asarray(probe.predict(held_out)))
        result = confusion(predicted, counts, classes)
        result.update(method="linear probe on z", probe_training_images=int(train[0].shape[0]))
        return result
    finally:
        model.train(was_training)


@torch.no_grad()
def plot_memory(model, x: torch.Tensor, path, samples: int = 6):
    """DM-VAE's memory: a row per slot with ``samples`` parts it draws (noise from p(eps | slot)), and
    how often the guide addresses it on images x (the share of present parts). Returns (path,
    {"usage": share per slot, "parts": parts counted, "n_images"})."""
    import matplotlib.pyplot as plt

    from .plots import save_figure

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        drawings = model.slot_drawings(samples)[:, :, 0].float().cpu().numpy()     # (K, samples, W, W)
        addresses = _in_batches(model.address, x, device)
    finally:
        model.train(was_training)
    used = addresses[addresses >= 0]
    slots = drawings.shape[0]
    usage = torch.bincount(used, minlength=slots).double() / max(1, used.numel())
    fig, axes = plt.subplots(slots, samples + 1, figsize=(1.0 * (samples + 2), 0.95 * slots + 0.5), squeeze=False,
                             gridspec_kw={"width_ratios": [1] * samples + [2]})
    for k in range(slots):
        for s in range(samples):
            ax = axes[k, s]
            ax.imshow(np.clip(drawings[k, s], 0, 1), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
        axes[k, 0].set_ylabel(f"slot {k + 1}", fontsize=7)
        bar = axes[k, samples]
        bar.barh([0], [usage[k].item()], color="tab:blue")
        bar.set_xlim(0, max(0.05, usage.max().item())), bar.set_yticks([])
        bar.tick_params(labelsize=6)
        if k < slots - 1:
            bar.set_xticks([])
    axes[-1, samples].set_xlabel("share of parts", fontsize=7)
    fig.suptitle(f"memory: what each slot draws, and how often it is read ({used.numel()} parts in "
                 f"{x.shape[0]} held-out images)", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path), {"usage": usage.tolist(), "parts": int(used.numel()), "n_images": int(x.shape[0])}


@torch.no_grad()
def part_identities(model, x: torch.Tensor) -> tuple[str, torch.Tensor, torch.Tensor]:
    """(kind, identity or code of each part, image index of each part) for the parts a model finds in
    images x: kind "address" (integer identities) or "code" (vectors to cluster). Raises ValueError
    for a model without parts."""
    if has(model, "memory"):
        addresses = model.address(x)                                   # (N, T), -1: absent
        images = torch.arange(x.shape[0]).unsqueeze(1).expand_as(addresses)
        present = addresses >= 0
        return "address", addresses[present].cpu(), images[present].cpu()
    if hasattr(model, "infer_modes"):                                 # AIR: z_what of present objects
        latents = model.infer_modes(x)
        present = latents.z_pres.bool()
        images = torch.arange(x.shape[0]).unsqueeze(1).expand_as(present)
        return "code", latents.z_what[present].cpu(), images[present.cpu()].cpu()
    if has(model, "programs"):                                        # RNP: the top-level part programs
        codes = model.parse(x).child_z                                 # (N, T, z_dim)
        images = torch.arange(x.shape[0]).unsqueeze(1).expand(codes.shape[:2])
        return "code", codes.flatten(0, 1).cpu(), images.flatten().cpu()
    raise ValueError(f"the {model.config.model} model has no parts")


def part_purity(model, images: torch.Tensor, digits: torch.Tensor, clusters: int = 10, seed: int = 0) -> dict:
    """NMI between part identity and digit over the parts found in one-digit scenes: images (N, 1, H, W),
    digits (N, 2) (the scene's digit labels, -1 padded). {"nmi", "parts", "images", "identity"}."""
    one = (digits >= 0).sum(1) == 1
    x, label = images[one], digits[one, 0]
    if x.shape[0] == 0:
        raise ValueError("part purity needs one-digit scenes")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        found = [part_identities(model, x[k:k + BATCH].to(device)) for k in range(0, x.shape[0], BATCH)]
    finally:
        model.train(was_training)
    kind = found[0][0]
    identity = torch.cat([f[1] for f in found])
    image = torch.cat([f[2] + k * BATCH for f, k in zip(found, range(len(found)))])
    if identity.shape[0] < 2:
        return {"nmi": float("nan"), "parts": int(identity.shape[0]), "images": int(x.shape[0]), "identity": kind}
    if kind == "code":
        k = min(clusters, identity.shape[0])
        identity = torch.from_numpy(KMeans(k, n_init=4, random_state=seed).fit_predict(identity.double().numpy()))
        kind = f"k-means cluster (k={k})"
    nmi = normalized_mutual_info_score(label[image].numpy(), identity.numpy())
    return {"nmi": float(nmi), "parts": int(identity.shape[0]), "images": int(x.shape[0]), "identity": kind}
