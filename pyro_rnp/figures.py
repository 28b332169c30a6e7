"""Figures a person looks at: parses, reconstructions and samples with each part in its own colour
(blue, red, green, orange, as in the paper), and training curves.

    python -m pyro_rnp.figures RUN_DIR [--which parse,samples]
"""
from __future__ import annotations

import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import click  # noqa: E402

from .cli import held_out, open_run, run, run_folder_options  # noqa: E402
from .files import atomic_write  # noqa: E402

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
    return rgb.clamp(0, 1).numpy()


def save_figure(fig, path) -> pathlib.Path:
    """Write a matplotlib figure as PNG atomically (an interrupted run leaves the old one) and close it."""
    path = pathlib.Path(path)
    atomic_write(path, lambda p: fig.savefig(p, dpi=100, format="png"))
    plt.close(fig)
    return path


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
    return save_figure(fig, path)


def plot_reconstructions(rnp, x: torch.Tensor, path, title: str = "held-out reconstructions") -> pathlib.Path:
    """Data, reconstruction, and the top-level parts in colour, for a few images x (B, 1, 28, 28).
    A decoder without parts (the mlp baseline) gets the first two rows."""
    if not rnp.has_parts:
        rows = [("data", x[:, 0].cpu().numpy()), ("reconstruction", rnp.reconstruct(x)[:, 0].cpu().numpy())]
        return _grid(rows, path, title)
    tree = rnp.parse(x)
    mean = rnp.likelihood.mean(tree.canvas)
    rows = [("data", x[:, 0].cpu().numpy()), ("reconstruction", mean[:, 0].cpu().numpy()),
            ("parts", colour_parts(tree.placed))]
    return _grid(rows, path, title)


def plot_samples(rnp, n: int, path, title: str = "samples, z ~ prior") -> pathlib.Path:
    if not rnp.has_parts:
        with torch.no_grad():
            mean = rnp.likelihood.mean(rnp.decode(rnp.sample_z(n), record=False).canvas)
        return _grid([("sample", mean[:, 0].cpu().numpy())], path, title)
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
    return save_figure(fig, path)


def plot_parse(rnp, x: torch.Tensor, path, title: str = "parses of held-out images") -> pathlib.Path:
    """The paper's Fig. 3, at every level: for each image, a row with the data, its reconstruction
    and its parts in colour; then a row per lower level with every program of that level in a box
    (framed in its own colour within its parent) showing its children in colour."""
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
        for c, (image, label) in enumerate([(x[i, 0].cpu().numpy(), "data"), (mean[i, 0].numpy(), "reconstruction"),
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


@torch.no_grad()
def program_vectors(rnp, x: torch.Tensor, batch_size: int = 64):
    """Top-level programs z (posterior means) and their child programs z_t, with what each draws:
    (vectors (M, z_dim), level of each (M,), canvases (M, 28, 28))."""
    vectors, levels, canvases = [], [], []
    for start in range(0, x.shape[0], batch_size):
        tree = rnp.parse(x[start:start + batch_size])
        for nodes in tree.levels()[:2]:
            for node in nodes:
                vectors.append(node.z.cpu())
                levels.append(torch.full((node.z.shape[0],), node.level))
                canvases.append(rnp.likelihood.mean(node.canvas)[:, 0].cpu())
    return torch.cat(vectors), torch.cat(levels), torch.cat(canvases)


def plot_tsne(rnp, x: torch.Tensor, path, seed: int = 0, clusters: int = 8) -> tuple[pathlib.Path, dict]:
    """The paper's Fig. 4a: t-SNE of top-level and child program vectors, coloured by level, with the
    program nearest each k-means centre of the embedding drawn beside it; and the held-out accuracy
    of a linear probe that tells the two levels apart (the claim the figure makes)."""
    from sklearn.cluster import KMeans
    from sklearn.linear_model import LogisticRegression
    from sklearn.manifold import TSNE
    from sklearn.model_selection import train_test_split

    vectors, levels, canvases = program_vectors(rnp, x)
    v, y = vectors.numpy(), levels.numpy()
    train_v, test_v, train_y, test_y = train_test_split(v, y, test_size=0.3, random_state=seed, stratify=y)
    probe = LogisticRegression(max_iter=2000).fit(train_v, train_y)
    accuracy = float(probe.score(test_v, test_y))
    embedding = TSNE(n_components=2, random_state=seed, init="pca",
                     perplexity=min(30.0, (len(v) - 1) / 3)).fit_transform(v)
    kmeans = KMeans(n_clusters=min(clusters, len(v)), random_state=seed, n_init=4).fit(embedding)
    fig = plt.figure(figsize=(10, 5))
    ax = fig.add_axes([0.05, 0.1, 0.55, 0.8])
    names = {int(level): ("top-level programs" if level == rnp.config.depth else f"level-{int(level)} programs")
             for level in np.unique(y)}
    for level, colour in zip(sorted(names, reverse=True), ["tab:purple", "tab:orange", "tab:cyan"]):
        mask = y == level
        ax.scatter(embedding[mask, 0], embedding[mask, 1], s=4, alpha=0.6, color=colour, label=names[level])
    ax.legend(fontsize=8, markerscale=3)
    ax.set_title(f"t-SNE of program vectors; linear probe tells levels apart with "
                 f"{100 * accuracy:.1f}% held-out accuracy", fontsize=9)
    ax.set_xticks([]), ax.set_yticks([])
    for k, centre in enumerate(kmeans.cluster_centers_):
        nearest = int(np.argmin(((embedding - centre) ** 2).sum(1)))
        ax.annotate(str(k + 1), centre, fontsize=9, weight="bold")
        inset = fig.add_axes([0.63 + 0.09 * (k % 4), 0.55 - 0.42 * (k // 4), 0.08, 0.35])
        inset.imshow(canvases[nearest].clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
        inset.set_xticks([]), inset.set_yticks([])
        inset.set_title(f"{k + 1}: level {int(y[nearest])}", fontsize=7)
    path = save_figure(fig, path)
    summary = {"probe_accuracy": accuracy, "probe": "logistic regression, 70/30 split, held-out accuracy",
               "n_vectors": int(len(v)), **{f"n_level_{int(k)}": int((y == k).sum()) for k in np.unique(y)}}
    return path, summary


FIGURES = ("parse", "samples", "tsne", "clusters", "interpolate", "library")


@click.command(name="pyro_rnp.figures", context_settings={"help_option_names": ["-h", "--help"]})
@run_folder_options
@click.option("--which", default=",".join(FIGURES), show_default=True,
              help=f"Comma-separated figures to draw, from: {', '.join(FIGURES)}.")
@click.option("--n", "n_images", type=click.IntRange(min=1, max=64), default=6, show_default=True,
              help="Images per figure.")
@click.option("--program-images", "--tsne-images", "tsne_images", type=click.IntRange(min=10), default=300,
              show_default=True, help="Held-out images whose programs go into tsne, clusters, interpolate and library.")
@click.option("--clusters", type=click.IntRange(min=2), default=8, show_default=True,
              help="k-means clusters per level for clusters, interpolate and library.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for prior samples, t-SNE, probe, k-means.")
def main(run_dir, which, n_images, device, data_dir, no_download, tsne_images, clusters, seed):
    """Draw the paper's figures for the run in RUN_DIR into RUN_DIR/figures/<name>.png."""

    names = [w.strip() for w in which.split(",") if w.strip()]
    unknown = [w for w in names if w not in FIGURES]
    if unknown or not names:
        raise click.BadParameter(f"unknown figure {', '.join(unknown) or repr(which)}; choose from "
                                 f"{', '.join(FIGURES)}", param_hint="--which")
    config, rnp, torch_device = open_run(run_dir, device)
    needs_parts = [name for name in names if name != "samples"]
    if needs_parts and not rnp.has_parts:
        raise click.BadParameter(f"the run's {config.decoder} decoder draws no parts, so it has no "
                                 f"{', '.join(needs_parts)} figure; only samples", param_hint="--which")
    folder = pathlib.Path(run_dir) / "figures"
    folder.mkdir(exist_ok=True)
    written = []
    if "parse" in names:
        x = held_out(config, data_dir, not no_download, n_images)[0].to(torch_device)
        written.append(plot_parse(rnp, x, folder / "parse.png"))
    if "samples" in names:
        torch.manual_seed(seed)
        written.append(plot_samples(rnp, n_images, folder / "samples.png"))
    summaries = {}
    if "tsne" in names:
        x = held_out(config, data_dir, not no_download, tsne_images)[0].to(torch_device)
        path, summaries["tsne"] = plot_tsne(rnp, x, folder / "tsne.png", seed)
        written.append(path)
        click.echo(f"linear probe, top-level vs child programs: {100 * summaries['tsne']['probe_accuracy']:.1f}% "
                   f"held-out accuracy ({summaries['tsne']['n_vectors']} vectors)")
    space = [name for name in ("clusters", "interpolate", "library") if name in names]
    if space:
        from . import library
        x = held_out(config, data_dir, not no_download, tsne_images)[0].to(torch_device)
        programs = library.gather_programs(rnp, x)
        clusterings = [library.cluster(group, clusters, seed) for group in programs]
        depth = config.depth
        if "clusters" in names:
            written.append(library.plot_clusters(programs, clusterings, depth, folder / "clusters.png", seed=seed))
        if "interpolate" in names:
            written.append(library.plot_interpolation(rnp, clusterings, folder / "interpolate.png"))
        if "library" in names:
            written.append(library.plot_library(programs, clusterings, depth, folder / "library.png"))
            summaries["library"] = {"n_images": int(x.shape[0]), "clusters_per_level": clusters,
                                    "levels": library.library_summary(clusterings, depth)}
            for level, s in summaries["library"]["levels"].items():
                click.echo(f"{level}: {s['clusters']} clusters, effective number of primitives "
                           f"{s['effective_primitives']:.1f}")
    if summaries:
        record_path = pathlib.Path(run_dir) / "figures.json"
        record = json.loads(record_path.read_text()) if record_path.exists() else {}
        record.update(summaries)
        atomic_write(record_path, lambda p: p.write_text(json.dumps(record, indent=2) + "\n"))
    for path in written:
        click.echo(f"wrote {path}")


if __name__ == "__main__":
    run(main)
