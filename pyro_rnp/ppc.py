"""``python -m pyro_rnp.ppc RUN_DIR [--samples S]``: posterior and prior predictive checks.

What is checked, and how, is in pyro_rnp/analysis/ppc.py.
"""
from __future__ import annotations

import json
import pathlib

import click
import pyro

from .analysis.ppc import plot_ppc, posterior_predictive_check
from .cli import analysis_options, held_out, open_run, run, write_result
from .training.step import mixed_precision

@click.command(name="pyro_rnp.ppc", context_settings={"help_option_names": ["-h", "--help"]})
@analysis_options(limit_default=500)
@click.option("--samples", type=click.IntRange(min=2), default=20, show_default=True,
              help="Replicated images per held-out image.")
@click.option("--json", "as_json", is_flag=True, help="Print ppc.json as one line instead of a table.")
def main(run_dir, samples, limit, device, amp, data_dir, no_download, seed, as_json):
    """Posterior and prior predictive checks of the run in RUN_DIR: writes RUN_DIR/ppc.json and
    RUN_DIR/figures/ppc_*.png."""
    config, rnp, torch_device = open_run(run_dir, device, needs="guide", what="ppc", amp=amp)
    images = held_out(config, data_dir, not no_download, limit)[0]
    pyro.set_rng_seed(seed)
    with mixed_precision(amp, torch_device):
        result, arrays, keep = posterior_predictive_check(rnp, images, samples, progress=not as_json)
    result.update(run_dir=str(run_dir), dataset=config.dataset, seed=seed, amp=amp)
    write_result(run_dir, "ppc.json", result)
    paths = plot_ppc(arrays, keep, pathlib.Path(run_dir) / "figures", samples)
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"{config.dataset} test, {result['n_images']} images, {samples} replicates each, "
               f"likelihood {result['likelihood']}")
    click.echo(f"{'statistic':<16}{'mean p':>8}{'p<.05':>8}{'p>.95':>8}{'data':>9}{'replic.':>9}{'prior':>9}"
               f"{'in prior 95%':>14}")
    for name, s in result["statistics"].items():
        click.echo(f"{name:<16}{s['mean_p_value']:>8.3f}{s['fraction_p_below_0.05']:>8.2f}"
                   f"{s['fraction_p_above_0.95']:>8.2f}{s['data_mean']:>9.3f}{s['replicated_mean']:>9.3f}"
                   f"{s['prior_mean']:>9.3f}{s['fraction_data_inside_prior_95']:>14.2f}")
    click.echo(f"Written to {pathlib.Path(run_dir) / 'ppc.json'} and {', '.join(str(p) for p in paths)}")


if __name__ == "__main__":
    run(main)
