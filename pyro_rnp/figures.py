"""Figures a person looks at: reconstructions and samples with each top-level part in its own
colour (blue, red, green, orange, as in the paper), and training curves."""
from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .files import atomic_write  # noqa: E402

PART_COLOURS = [(0.12, 0.35, 1.0), (1.0, 0.15, 0.1), (0.1, 0.8, 0.2), (1.0, 0.6, 0.0)]


def part_colours(n: int) -> list[tuple[float, float, float]]:
    """The paper's four colours, then matplotlib's tab10 for programs with more steps."""
    extra = [tuple(c[:3]) for c in plt.get_cmap("tab10").colors]
    return (PART_COLOURS + extra * (1 + n // 10))[:n]


def colour_parts(placed: torch.Tensor) -> np.ndarray:
    """(B, T, 1, H, W) placed parts -> (B, H, W, 3) RGB, part t in colour t, clipped to [0, 1]."""
    placed = placed.detach().float().cpu().clamp(min=0)[:, :, 0]           # (B, T, H, W)
    colours = torch.tensor(part_colours(placed.shape[1]))                  # (T, 3)
    rgb = torch.einsum("bthw,tc->bhwc", placed, colours)
    return rgb.clamp(0, 1).numpy()


def _grid(rows: list[tuple[str, np.ndarray]], path: pathlib.Path, title: str) -> pathlib.Path:
    """rows of (label, images (B, H, W[, 3])) -> one PNG, written atomically."""
    n = max(len(images) for _, images in rows)
    fig, axes = plt.subplots(len(rows), n, figsize=(1.1 * n, 1.2 * len(rows) + 0.4), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c in range(n):
            ax = axes[r, c]
            ax.set_xticks([]), ax.set_yticks([])
            if c < len(images):
                ax.imshow(np.clip(images[c], 0, 1), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = pathlib.Path(path)
    atomic_write(path, lambda p: fig.savefig(p, dpi=100, format="png"))
    plt.close(fig)
    return path


def plot_reconstructions(rnp, x: torch.Tensor, path, title: str = "held-out reconstructions") -> pathlib.Path:
    """Data, reconstruction, and the top-level parts in colour, for a few images x (B, 1, 28, 28)."""
    tree = rnp.parse(x)
    mean = rnp.likelihood.mean(tree.canvas)
    rows = [("data", x[:, 0].cpu().numpy()), ("reconstruction", mean[:, 0].cpu().numpy()),
            ("parts", colour_parts(tree.placed))]
    return _grid(rows, path, title)


def plot_samples(rnp, n: int, path, title: str = "samples, z ~ prior") -> pathlib.Path:
    tree = rnp.sample(n)
    mean = rnp.likelihood.mean(tree.canvas)
    rows = [("sample", mean[:, 0].cpu().numpy()), ("parts", colour_parts(tree.placed))]
    return _grid(rows, path, title)


def plot_curves(metrics: list[dict], path) -> pathlib.Path:
    """Training loss and held-out negative ELBO per image, and held-out MSE, over epochs."""
    epochs = [m["epoch"] for m in metrics]
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3))
    a.plot(epochs, [m["train_loss"] for m in metrics], "o-", label="train loss (with part term)")
    a.plot(epochs, [m["test_neg_elbo"] for m in metrics], "s-", label="held-out -ELBO")
    a.set_xlabel("epoch"), a.set_ylabel("nats per image"), a.legend(fontsize=7)
    b.plot(epochs, [m["test_mse"] for m in metrics], "o-")
    b.set_xlabel("epoch"), b.set_ylabel("held-out MSE")
    if metrics:
        fig.suptitle(f"likelihood: {metrics[-1].get('likelihood', '?')}", fontsize=9)
    fig.tight_layout()
    path = pathlib.Path(path)
    atomic_write(path, lambda p: fig.savefig(p, dpi=100, format="png"))
    plt.close(fig)
    return path
