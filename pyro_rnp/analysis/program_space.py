"""Program space: the programs a trained RNP uses, gathered by level, embedded and clustered.

    tsne         (the paper's Fig. 4a) t-SNE of top-level and child programs, with a linear probe
    clusters     (Fig. 4b) k-means of the programs at each level, with what members draw
    interpolate  (Fig. 4c) straight lines between cluster centres in program space, decoded
    library      the learned primitive library: clusters of part-level and leaf-level programs, each
                 shown by its typical drawing and how often parses use it

Level numbering follows ProgramNode: the top level is ``depth``; level-1 programs place leaf
patches; the leaf programs themselves (level 0) are decoded by their parent's generated decoder,
so a leaf is shown by the patch it was decoded to.
"""
from __future__ import annotations

import math
import pathlib
from dataclasses import dataclass

import numpy as np
import torch

from .plots import plt, save_figure


@dataclass
class LevelPrograms:
    level: int
    vectors: torch.Tensor    # (M, z_dim)
    drawings: torch.Tensor   # (M, 28, 28): the canvas a program draws, or a leaf's decoded patch


def level_name(level: int, depth: int) -> str:
    if level == depth:
        return "top-level programs"
    return "leaf programs" if level == 0 else f"level-{level} part programs"


@torch.no_grad()
def gather_programs(rnp, x: torch.Tensor, batch_size: int = 64) -> list[LevelPrograms]:
    """Every program in the parses of images x, top level first, leaves (level 0) last."""
    found: dict[int, tuple[list, list]] = {}

    def add(level, z, drawing):
        vectors, drawings = found.setdefault(level, ([], []))
        vectors.append(z.reshape(-1, z.shape[-1]).cpu())
        drawings.append(rnp.likelihood.mean(drawing).reshape(-1, *drawing.shape[-2:]).cpu())

    for start in range(0, x.shape[0], batch_size):
        tree = rnp.parse(x[start:start + batch_size])
        for nodes in tree.levels():
            for node in nodes:
                add(node.level, node.z, node.canvas)
                if node.level == 1:
                    add(0, node.child_z, node.patches)
    return [LevelPrograms(level, torch.cat(v), torch.cat(d)) for level, (v, d) in sorted(found.items(), reverse=True)]


@dataclass
class Clustering:
    level: int
    centres: np.ndarray      # (k, z_dim), ordered by usage, most used first
    labels: np.ndarray       # (M,) cluster of each program
    usage: np.ndarray        # (k,) fraction of the level's programs in each cluster
    medoids: np.ndarray      # (k,) index of the member nearest each centre


def cluster(programs: LevelPrograms, k: int, seed: int = 0) -> Clustering:
    """k-means in program space; clusters renumbered by how many programs they hold."""
    from sklearn.cluster import KMeans
    v = programs.vectors.double().numpy()
    k = min(k, len(v))
    fit = KMeans(n_clusters=k, random_state=seed, n_init=4).fit(v)
    counts = np.bincount(fit.labels_, minlength=k)
    order = np.argsort(-counts, kind="stable")
    rank = np.empty(k, dtype=int)
    rank[order] = np.arange(k)
    centres = fit.cluster_centers_[order]
    labels = rank[fit.labels_]
    medoids = np.array([int(np.argmin(((v - c) ** 2).sum(1) + np.where(labels == j, 0, np.inf)))
                        for j, c in enumerate(centres)])
    return Clustering(programs.level, centres, labels, counts[order] / len(v), medoids)


def _image(ax, image, title=None):
    ax.imshow(np.clip(np.asarray(image), 0, 1), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([]), ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=6)


def plot_clusters(programs: list[LevelPrograms], clusterings: list[Clustering], depth: int, path,
                  members: int = 6, seed: int = 0):
    """Fig. 4b: for each level, a row per cluster: its share of the level, then members' drawings."""
    rng = np.random.default_rng(seed)
    rows = sum(len(c.centres) for c in clusterings)
    fig, axes = plt.subplots(rows, members, figsize=(0.9 * members + 1.2, 0.9 * rows + 0.6), squeeze=False)
    r = 0
    for group, clustering in zip(programs, clusterings):
        for j in range(len(clustering.centres)):
            idx = np.flatnonzero(clustering.labels == j)
            shown = [clustering.medoids[j], *rng.permutation(idx[idx != clustering.medoids[j]])[:members - 1]]
            for c in range(members):
                ax = axes[r, c]
                ax.set_xticks([]), ax.set_yticks([])
                ax.set_frame_on(False)
                if c < len(shown):
                    _image(ax, group.drawings[shown[c]])
            axes[r, 0].set_ylabel(f"{j + 1}: {100 * clustering.usage[j]:.0f}%", fontsize=6, rotation=0,
                                  ha="right", va="center")
            if j == 0:
                axes[r, 0].set_title(f"{level_name(group.level, depth)}: k-means clusters (share of level; "
                                     "nearest the centre first)", fontsize=7, loc="left")
            r += 1
    fig.tight_layout()
    return save_figure(fig, path)


@torch.no_grad()
def plot_interpolation(rnp, clusterings: list[Clustering], path, steps: int = 8, pairs: int = 3):
    """Fig. 4c: programs on the line between the centres of the most used clusters, run at their level."""
    drawable = [c for c in clusterings if c.level >= 1]
    rows = [(c, a, a + 1) for c in drawable for a in range(min(pairs, len(c.centres) - 1))]
    if not rows:
        raise ValueError("too few clusters to interpolate between; parse more images or raise --clusters")
    fig, axes = plt.subplots(len(rows), steps, figsize=(0.9 * steps + 1.2, 0.95 * len(rows) + 0.5), squeeze=False)
    alphas = torch.linspace(0, 1, steps, dtype=torch.float64)
    device = next(rnp.parameters()).device
    for r, (clustering, a, b) in enumerate(rows):
        start, end = (torch.from_numpy(clustering.centres[i]) for i in (a, b))
        z = ((1 - alphas[:, None]) * start + alphas[:, None] * end).float().to(device)
        drawn = rnp.likelihood.mean(rnp.executor.draw(z, clustering.level))[:, 0].cpu()
        for c in range(steps):
            _image(axes[r, c], drawn[c], f"{alphas[c]:.2f}" if r == 0 else None)
        axes[r, 0].set_ylabel(f"{level_name(clustering.level, rnp.config.depth).split()[0]}\n{a + 1} -> {b + 1}",
                              fontsize=6, rotation=0, ha="right", va="center")
    fig.suptitle("linear interpolation between k-means centres in program space", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_library(programs: list[LevelPrograms], clusterings: list[Clustering], depth: int, path):
    """The primitive library of part-level and leaf programs: each cluster's medoid drawing, most used first,
    titled with its share of all programs at that level."""
    shown = [(p, c) for p, c in zip(programs, clusterings) if p.level < depth]
    columns = max(len(c.centres) for _, c in shown)
    columns_per_row = min(columns, 12)
    lines = [math.ceil(len(c.centres) / columns_per_row) for _, c in shown]
    fig, axes = plt.subplots(sum(lines), columns_per_row, figsize=(0.85 * columns_per_row + 0.4, 1.05 * sum(lines) + 0.5),
                             squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_frame_on(False)
    r = 0
    for (group, clustering), n_lines in zip(shown, lines):
        for j, medoid in enumerate(clustering.medoids):
            ax = axes[r + j // columns_per_row, j % columns_per_row]
            _image(ax, group.drawings[medoid], f"{100 * clustering.usage[j]:.1f}%")
        axes[r, 0].set_ylabel(level_name(group.level, depth).replace(" programs", ""), fontsize=7)
        r += n_lines
    fig.suptitle("learned primitive library: a typical drawing per cluster and its share of uses", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def library_summary(clusterings: list[Clustering], depth: int) -> dict:
    """Per level: cluster shares and the effective number of primitives, exp(entropy of the shares)."""
    out = {}
    for c in clusterings:
        usage = c.usage[c.usage > 0]
        out[level_name(c.level, depth)] = {
            "level": c.level, "clusters": int(len(c.usage)), "usage": [round(float(u), 4) for u in c.usage],
            "effective_primitives": float(np.exp(-(usage * np.log(usage)).sum()))}
    return out


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
    v, y = vectors.float().numpy(), levels.numpy()
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
        inset.imshow(canvases[nearest].clamp(0, 1).float().numpy(), cmap="gray", vmin=0, vmax=1)
        inset.set_xticks([]), inset.set_yticks([])
        inset.set_title(f"{k + 1}: level {int(y[nearest])}", fontsize=7)
    path = save_figure(fig, path)
    summary = {"probe_accuracy": accuracy, "probe": "logistic regression, 70/30 split, held-out accuracy",
               "n_vectors": int(len(v)), **{f"n_level_{int(k)}": int((y == k).sum()) for k in np.unique(y)}}
    return path, summary
