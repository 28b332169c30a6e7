"""``python -m pyro_rnp.export RUN_DIR``: the run's weights alone, in half precision, for sharing.

Writes RUN_DIR/weights.pt (``save_weights``: every floating tensor in float16, the config, no
optimizer or RNG state), about a quarter of checkpoint.pt's size (which also holds Adam's two
moments); ``--compress`` gzips it, about 8% smaller again. ``load_run`` and every command on a
run read a folder that holds only weights.pt; ``fit --resume`` refuses it in one line. Unless
``--no-check``, it scores the first ``--limit`` (200) held-out images with both weights, the same
seed for both, and reports the difference in held-out -ELBO, so a user sees what the halving cost
before deleting anything. export.json names the weights by their file name in the run folder, so
the folder can be moved or committed.
"""
from __future__ import annotations

import json
import pathlib

import click
import pyro
import torch

from .cli import analysis_options, fast_path_enabled, held_out, open_run, run, write_result
from .training.runs import CHECKPOINT, WEIGHTS, load_run, read_metrics, save_weights

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def neg_elbo(model, images: torch.Tensor, seed: int, device) -> float:
    from .analysis.evaluate import evaluate
    pyro.set_rng_seed(seed)
    return evaluate(model, images, device=device, progress=True)["neg_elbo"]


@click.command(name="pyro_rnp.export", context_settings={"help_option_names": ["-h", "--help"]})
@analysis_options(limit_default=200, limit_help="Held-out images on which the two precisions are compared "
                  "(the -ELBO of each, one sample per image, the same seed).", seed_help="Seed of the comparison.")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="float16", show_default=True,
              help="The weights' precision (float16 keeps 3 more mantissa bits than bfloat16).")
@click.option("--compress", is_flag=True, help="Gzip the weights file (about 8% smaller in float16; load_run reads "
              "either form).")
@click.option("--no-check", is_flag=True, help="Write the weights without comparing the two precisions.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON line.")
def main(run_dir, limit, device, amp, data_dir, no_download, seed, dtype, compress, no_check, as_json):
    """Write RUN_DIR/weights.pt: the trained run's weights in half precision, which load_run and the
    commands read without checkpoint.pt (and fit --resume refuses)."""
    run_dir = pathlib.Path(run_dir)
    config, model, torch_device = open_run(run_dir, device, what="export")
    if not (run_dir / CHECKPOINT).is_file():
        raise click.UsageError(f"{run_dir} has no {CHECKPOINT} to export from (only its {WEIGHTS})")
    metrics = read_metrics(run_dir)
    path = save_weights(run_dir, model, DTYPES[dtype], compress=compress,
                        epoch=metrics[-1]["epoch"] if metrics else 0)
    result = {"weights": path.name, "dtype": dtype, "compressed": compress, "megabytes": path.stat().st_size / 2 ** 20,
              "checkpoint_megabytes": (run_dir / CHECKPOINT).stat().st_size / 2 ** 20}
    if not no_check and hasattr(model, "guide"):
        images = held_out(config, data_dir, not no_download, limit)[0]
        full = neg_elbo(model, images, seed, torch_device)
        halved = load_run(run_dir, device=torch_device, fast=fast_path_enabled(), weights_only=True)
        result.update(check_images=int(images.shape[0]), neg_elbo_float32=full,
                      neg_elbo_weights=neg_elbo(halved, images, seed, torch_device))
        result["difference_nats"] = result["neg_elbo_weights"] - full
    write_result(run_dir, "export.json", result)
    if as_json:
        click.echo(json.dumps(result))
        return
    form = f"{dtype}, gzipped" if compress else dtype
    click.echo(f"Wrote {path} ({result['megabytes']:.1f} MB in {form}; {CHECKPOINT} is "
               f"{result['checkpoint_megabytes']:.1f} MB).")
    if "difference_nats" in result:
        click.echo(f"Held-out -ELBO on {result['check_images']} images: {result['neg_elbo_float32']:.3f} nats with "
                   f"the float32 weights, {result['neg_elbo_weights']:.3f} with {WEIGHTS} "
                   f"({result['difference_nats']:+.3f}).")


if __name__ == "__main__":
    run(main)
