"""``python -m pyro_rnp.evaluate RUN_DIR [--iw-samples K]``: held-out -ELBO, IWAE bound and MSE.

The numbers are defined in pyro_rnp/analysis/evaluate.py; on Multi-MNIST also the count
accuracy (pyro_rnp/analysis/scenes.py), whose linear probe, for models without a count
variable, is fitted on the first PROBE_SCENES training scenes (PROBE_SCENES_ITERATIVE_GUIDE for a
guide that optimises each image's latent); on Multi-MNIST and MNIST, for
models with parts, the part purity.
"""
from __future__ import annotations

import json
import pathlib

import click
import pyro

from .analysis.evaluate import evaluate
from .analysis.scenes import count_accuracy, part_purity
from .cli import analysis_options, held_out, open_run, run, write_result
from .model.registry import has
from .training.step import mixed_precision

PROBE_SCENES = 5000
# for a guide that optimises each image's latent (the sparse AND-OR generator's: 60 Adam steps at the quick
# preset), fewer: 1,000 scenes take minutes where 5,000 would take most of an hour on a CPU
PROBE_SCENES_ITERATIVE_GUIDE = 1000


def scene_digits(config, data_dir, download: bool):
    """The digit labels (N, 2) of the held-out scenes that held_out gives, in the same order."""
    import torch
    from .data.multi_mnist import load_scenes
    _, counts, digits = load_scenes("test", data_dir, download).tensors
    keep = ~torch.isin(counts, torch.tensor(list(config.exclude_classes), dtype=counts.dtype))
    return digits[keep]


@click.command(name="pyro_rnp.evaluate", context_settings={"help_option_names": ["-h", "--help"]})
@analysis_options(limit_help="Use the first N held-out images [all].", seed_help="Seed for the guide's samples.")
@click.option("--iw-samples", type=click.IntRange(min=1), default=1, show_default=True,
              help="Importance samples K per image for the IWAE bound (K=1: the ELBO).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON line instead of a table.")
def main(run_dir, iw_samples, limit, device, amp, data_dir, no_download, seed, as_json):
    """Held-out -ELBO, IWAE bound and MSE of the run in RUN_DIR, overall and per class; also written
    to RUN_DIR/eval.json."""
    from . import data as datasets

    config, rnp, torch_device = open_run(run_dir, device, needs="guide", what="evaluate", amp=amp)
    images, labels = held_out(config, data_dir, not no_download, limit)
    pyro.set_rng_seed(seed)
    with mixed_precision(amp, torch_device):
        result = evaluate(rnp, images, labels, iw_samples, device=torch_device, progress=not as_json)
        if config.dataset == "multi-mnist":  # the label of a scene is its number of digits
            iterative_guide = getattr(rnp, "evaluation_batch", None) is not None
            probe_scenes = PROBE_SCENES_ITERATIVE_GUIDE if iterative_guide else PROBE_SCENES
            train = None if has(rnp, "count") else datasets.load_images(
                "multi-mnist", "train", data_dir, not no_download, probe_scenes).tensors
            result["count"] = count_accuracy(rnp, images, labels, train=train, seed=seed)
        if config.dataset in ("multi-mnist", "mnist") and has(rnp, "parts"):  # an MNIST image: one digit
            digits = (scene_digits(config, data_dir, not no_download)[:images.shape[0]]
                      if config.dataset == "multi-mnist" else labels.unsqueeze(1))
            result["part_purity"] = part_purity(rnp, images, digits, seed=seed)
    result.update(run_dir=str(run_dir), dataset=config.dataset, split="test", seed=seed, amp=amp)
    write_result(run_dir, "eval.json", result)
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
    if "count" in result:
        count = result["count"]
        click.echo(f"count accuracy {100 * count['accuracy']:.1f}% ({count['method']}); confusion, rows true "
                   f"0-2 digits, columns predicted: {count['confusion']}")
    if "part_purity" in result:
        purity = result["part_purity"]
        click.echo(f"part purity (NMI of {purity['identity']} with the digit): {purity['nmi']:.3f} over "
                   f"{purity['parts']} parts in {purity['images']} one-digit images")
    click.echo(f"Written to {pathlib.Path(run_dir) / 'eval.json'}")


if __name__ == "__main__":
    run(main)
