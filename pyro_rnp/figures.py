"""``python -m pyro_rnp.figures RUN_DIR [--which parse,samples]``: the paper's figures for a run.

    parse        (Fig. 3) parses at every level, each part in its own colour
    samples      samples from the prior (with their parts, for models of programs)
    tsne         (Fig. 4a) t-SNE of program vectors, with a linear probe of their level
    clusters     (Fig. 4b) k-means clusters of programs at each level
    interpolate  (Fig. 4c) straight lines between cluster centres, decoded
    library      the learned primitive library and how often parses use each primitive
    memory       DM-VAE's memory: what each slot draws, and how often it is read
    basis        the sparse AND-OR generator's dictionary: what one active unit of each layer draws
    primitives   every model: its primitives and their template-matching (interpretability) score
                 against the first TEMPLATE_IMAGES training images (pyro_rnp/analysis/interpretability.py)
"""
from __future__ import annotations

import json
import pathlib

import click
import torch

from .analysis import program_space
from .analysis.interpretability import DRAWN_FROM, plot_basis, plot_primitives
from .analysis.plots import plot_parse, plot_samples
from .analysis.scenes import plot_memory
from .cli import analysis_options, held_out, open_run, run, write_result
from .model.registry import has
from .training.step import mixed_precision

FIGURES = ("parse", "samples", "tsne", "clusters", "interpolate", "library", "memory", "basis", "primitives")
NEEDS = {"parse": "programs", "tsne": "programs", "clusters": "programs", "interpolate": "programs",
         "library": "programs", "memory": "memory", "basis": "basis"}  # what a model must have for each figure
TEMPLATE_IMAGES = 100  # training images the primitives are matched against


@click.command(name="pyro_rnp.figures", context_settings={"help_option_names": ["-h", "--help"]})
@analysis_options(limit_default=300, limit_aliases=("--program-images", "--tsne-images"),
                  limit_help="Held-out images whose programs go into tsne, clusters, interpolate and program_space.",
                  seed_help="Seed for prior samples, t-SNE, probe, k-means.")
@click.option("--which", help=f"Comma-separated figures to draw, from: {', '.join(FIGURES)} "
              "[every one the run's model has].")
@click.option("--n", "n_images", type=click.IntRange(min=1, max=64), default=6, show_default=True,
              help="Images per figure.")
@click.option("--clusters", type=click.IntRange(min=2), default=8, show_default=True,
              help="k-means clusters per level for clusters, interpolate and program_space.")
def main(run_dir, which, n_images, device, amp, data_dir, no_download, limit, clusters, seed):
    """Draw the paper's figures for the run in RUN_DIR into RUN_DIR/figures/<name>.png."""
    tsne_images = limit
    names = [w.strip() for w in (which or ",".join(FIGURES)).split(",") if w.strip()]
    unknown = [w for w in names if w not in FIGURES]
    if unknown or not names:
        raise click.BadParameter(f"unknown figure {', '.join(unknown) or repr(which)}; choose from "
                                 f"{', '.join(FIGURES)}", param_hint="--which")
    config, rnp, torch_device = open_run(run_dir, device, amp=amp)
    lacking = [name for name in names if name in NEEDS and not has(rnp, NEEDS[name])]
    if lacking and which is None:  # by default, every figure the model has
        names = [name for name in names if name not in lacking]
    elif lacking:
        what = {"programs": "program trees", "memory": "memory of slots", "basis": "generator dictionary"}
        missing = sorted({what[NEEDS[name]] for name in lacking})
        raise click.BadParameter(f"the run's model ({config.model}) has no {' or '.join(missing)}, so it has no "
                                 f"{', '.join(lacking)} figure; it has: "
                                 f"{', '.join(n for n in FIGURES if n not in NEEDS or has(rnp, NEEDS[n]))}",
                                 param_hint="--which")
    with mixed_precision(amp, torch_device):
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
        if "memory" in names:
            x = held_out(config, data_dir, not no_download, tsne_images)[0].to(torch_device)
            path, summaries["memory"] = plot_memory(rnp, x, folder / "memory.png")
            written.append(path)
        if "basis" in names or "primitives" in names:  # the same images, so the generator infers them once
            drawn = held_out(config, data_dir, not no_download, DRAWN_FROM)[0].to(torch_device)
        if "basis" in names:
            torch.manual_seed(seed)  # each figure from the seed, whichever others are drawn with it
            path, summaries["basis"] = plot_basis(rnp, drawn, folder / "basis.png")
            written.append(path)
        if "primitives" in names:
            from . import data as datasets
            train = datasets.load_images(config.dataset, "train", data_dir, not no_download, TEMPLATE_IMAGES,
                                         config.exclude_classes).tensors[0]
            torch.manual_seed(seed)
            path, scores = plot_primitives(rnp, drawn, train, folder / "primitives.png")
            summaries["interpretability"] = {"method": "mean best normalised cross-correlation (skimage "
                                             "match_template) of each primitive's ink crop in each of the first "
                                             f"{TEMPLATE_IMAGES} training images; primitives drawn from the first "
                                             f"{DRAWN_FROM} held-out images", **scores}
            written.append(path)
            for kind, score in scores.items():
                if not score["primitives"]:
                    click.echo(f"interpretability of {kind}: none drawn visibly enough to score (each is dropped "
                               "below 0.05 of the pixel range or 5 pixels wide); train longer")
                    continue
                click.echo(f"interpretability of {kind}: {score['score']:.3f} ({score['primitives']} primitives, "
                           f"{score['images']} training images)")
        if "tsne" in names:
            x = held_out(config, data_dir, not no_download, tsne_images)[0].to(torch_device)
            path, summaries["tsne"] = program_space.plot_tsne(rnp, x, folder / "tsne.png", seed)
            written.append(path)
            click.echo(f"linear probe, top-level vs child programs: {100 * summaries['tsne']['probe_accuracy']:.1f}% "
                       f"held-out accuracy ({summaries['tsne']['n_vectors']} vectors)")
        space = [name for name in ("clusters", "interpolate", "library") if name in names]
        if space:
            x = held_out(config, data_dir, not no_download, tsne_images)[0].to(torch_device)
            programs = program_space.gather_programs(rnp, x)
            clusterings = [program_space.cluster(group, clusters, seed) for group in programs]
            depth = config.depth
            if "clusters" in names:
                written.append(program_space.plot_clusters(programs, clusterings, depth, folder / "clusters.png",
                                                           seed=seed))
            if "interpolate" in names:
                written.append(program_space.plot_interpolation(rnp, clusterings, folder / "interpolate.png"))
            if "library" in names:
                written.append(program_space.plot_library(programs, clusterings, depth, folder / "library.png"))
                summaries["library"] = {"n_images": int(x.shape[0]), "clusters_per_level": clusters,
                                        "levels": program_space.library_summary(clusterings, depth)}
                for level, s in summaries["library"]["levels"].items():
                    click.echo(f"{level}: {s['clusters']} clusters, effective number of primitives "
                               f"{s['effective_primitives']:.1f}")
    if summaries:
        record_path = pathlib.Path(run_dir) / "figures.json"
        record = json.loads(record_path.read_text()) if record_path.exists() else {}
        record.update(summaries)
        write_result(run_dir, "figures.json", record)
    for path in written:
        click.echo(f"wrote {path}")


if __name__ == "__main__":
    run(main)
