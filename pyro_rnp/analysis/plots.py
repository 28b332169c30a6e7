"""Plotting helpers, and the figures every model gets: reconstructions, samples, training curves,
and for models with parts or programs, parts in colour (blue, red, green, orange, as in the paper)
and parses at every level. Every PNG is written atomically."""
from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ..data.atomic import atomic_write  # noqa: E402
from ..model.registry import has, require  # noqa: E402

PART_COLOURS = [(0.12, 0.35, 1.0), (1.0, 0.15, 0.1), (0.1, 0.8, 0.2), (1.0, 0.6, 0.0)]


def part_colours(n: int) -> list[tuple[float, float, float]]:
    """The paper's four colours, then matplotlib's tab10 for programs with more steps."""
    extra = [tuple(c[:3]) for c in plt.get_cmap("tab10").colors]
    return (PART_COLOURS + extra * (1 + n // 10))[:n]


def colour_parts(placed: torch.Tensor) -> np.ndarray:
    """(B, T, 1, H, W) placed parts -> (B, H, W, 3) RGB, part t in colour t, clipped to [0, 1]."""
    placed = placed.detach().float().cpu().clamp(min=0)[:, :, 0]           # (B, T, H, W)
    colours = torch.tensor(part_colours(placed.shape[1]), dtype=placed.dtype)  # (T, 3)
    rgb = torch.einsum("bthw,tc->bhwc", placed, colours)
    return rgb.clamp(0, 1).float().numpy()


def _outline(ax, parts, image: int) -> None:
    """Outline each present piece's box of image ``image`` in the piece's colour."""
    boxes = parts.boxes[image].detach().float().cpu()
    colours = part_colours(boxes.shape[0])
    for t, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        if parts.present is None or bool(parts.present[image, t]):
            # imshow puts pixel i's centre at i: its edges are at i - 0.5
            ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, lw=0.8,
                                       edgecolor=colours[t]))


def save_figure(fig, path) -> pathlib.Path:
    """Write a matplotlib figure as PNG atomically (an interrupted run leaves the old one) and close it."""
    path = pathlib.Path(path)
    atomic_write(path, lambda p: fig.savefig(p, dpi=100, format="png"))
    plt.close(fig)
    return path


def image_grid(rows: list[tuple], path: pathlib.Path, title: str) -> pathlib.Path:
    """rows of (label, images (B, H, W[, 3])) or (label, images, Parts) -> one PNG, written atomically;
    with Parts, each piece's box (where it has one, and if it is present) is outlined in its colour."""
    n = max(len(row[1]) for row in rows)
    fig, axes = plt.subplots(len(rows), n, figsize=(1.1 * n, 1.2 * len(rows) + 0.4), squeeze=False)
    for r, (label, images, *parts) in enumerate(rows):
        for c in range(n):
            ax = axes[r, c]
            ax.set_xticks([]), ax.set_yticks([])
            if c < len(images):
                ax.imshow(np.clip(images[c], 0, 1), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
                if parts and parts[0].boxes is not None:
                    _outline(ax, parts[0], c)
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_reconstructions(model, x: torch.Tensor, path, title: str = "held-out reconstructions") -> pathlib.Path:
    """Data, reconstruction, and the parts in colour, for a few images x (B, 1, H, W).
    A model without parts (the vae baseline) gets the first two rows."""
    if not has(model, "parts"):
        rows = [("data", x[:, 0].float().cpu().numpy()),
                ("reconstruction", model.reconstruct(x)[:, 0].float().cpu().numpy())]
        return image_grid(rows, path, title)
    parts = model.parts(x)
    rows = [("data", x[:, 0].float().cpu().numpy()),
            ("reconstruction", parts.canvas[:, 0].float().cpu().numpy()),
            ("parts", colour_parts(parts.placed), parts)]
    return image_grid(rows, path, title)


def plot_samples(model, n: int, path, title: str = "samples from the prior") -> pathlib.Path:
    """n samples (the likelihood's mean image), with their top-level parts for models of programs."""
    if not has(model, "programs"):
        return image_grid([("sample", model.sample(n)[:, 0].float().cpu().numpy())], path, title)
    parts = model.parts_of(model.sample_programs(n))
    rows = [("sample", parts.canvas[:, 0].float().cpu().numpy()), ("parts", colour_parts(parts.placed))]
    return image_grid(rows, path, title)


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
    return save_figure(fig, path)


def plot_parse(rnp, x: torch.Tensor, path, title: str = "parses of held-out images") -> pathlib.Path:
    """The paper's Fig. 3, at every level: for each image, a row with the data, its reconstruction
    and its parts in colour; then a row per lower level with every program of that level in a box
    (framed in its own colour within its parent) showing its children in colour."""
    require(rnp, "programs", "the parse figure")
    tree = rnp.parse(x)
    levels = tree.levels()
    mean = rnp.likelihood.mean(tree.canvas).cpu()
    top = colour_parts(tree.placed)
    boxes = [[colour_parts(node.placed) for node in nodes] for nodes in levels[1:]]
    steps = tree.theta.shape[1]
    frame = part_colours(steps)
    columns = max(3, max((len(nodes) for nodes in levels[1:]), default=0))
    rows = x.shape[0] * len(levels)
    fig, axes = plt.subplots(rows, columns, figsize=(1.05 * columns, 1.1 * rows + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_frame_on(False)
    for i in range(x.shape[0]):
        r = i * len(levels)
        for c, (image, label) in enumerate([(x[i, 0].float().cpu().numpy(), "data"), (mean[i, 0].float().numpy(), "reconstruction"),
                                            (top[i], "parts")]):
            axes[r, c].imshow(np.clip(image, 0, 1), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            if i == 0:
                axes[r, c].set_title(label, fontsize=7)
        for k, level_boxes in enumerate(boxes, start=1):
            for j, box in enumerate(level_boxes):
                ax = axes[r + k, j]
                ax.imshow(box[i], interpolation="nearest")
                ax.set_frame_on(True)
                for spine in ax.spines.values():
                    spine.set_edgecolor(frame[j % steps])
                    spine.set_linewidth(2.5)
            axes[r + k, 0].set_ylabel(f"level {len(levels) - k}", fontsize=6)
    fig.suptitle(title + " (boxes: each program's own parts)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
