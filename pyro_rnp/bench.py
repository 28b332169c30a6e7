"""Benchmark full training steps of the paper-size model: ``python -m pyro_rnp.bench``.

Times our SVI step (Trace_ELBO forward, backward, gradient clamp, Adam) on random
images after a warm-up, in fresh processes, alternating with the straightforward
port in ``../shared/bench/reference_rnp.py`` (same sizes and batch) when it is
found, and reports the median images/s of each and their ratio.

Profile the step (what to look at before optimising):
    python -m pyro_rnp.bench --profile
The head's products run in oneDNN on CPU (see pyro_rnp/cpu.py); to time the
step with torch.mm instead:
    PYRO_RNP_ONEDNN=0 python -m pyro_rnp.bench
"""
from __future__ import annotations

import json
import pathlib
import statistics
import subprocess
import sys
import time

import click
import torch

from .cli import run

DEFAULT_REFERENCE = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "bench" / "reference_rnp.py"


VARIANTS = {"fp32": (None, False), "bf16": ("bf16", False), "compile": (None, True), "bf16+compile": ("bf16", True)}


def time_steps(batch_size: int, steps: int, device: torch.device, seed: int = 0, variant: str = "fp32") -> float:
    """Images/s of ``steps`` training steps of the paper-size RNP after warm-up steps: five, for
    the buffers that the CPU path recycles to settle (and torch.compile to compile)."""
    from .config import RNPConfig
    from .fit import compile_model
    from .model import RNP
    from .training import TrainStep, make_optimizer

    amp, compiled = VARIANTS[variant]
    torch.manual_seed(seed)
    rnp = RNP(RNPConfig()).to(device)
    if compiled:
        compile_model(rnp)
    step = TrainStep(rnp, make_optimizer(rnp, 4e-5), amp=amp)
    x = torch.rand(batch_size, 1, 28, 28, device=device)
    for _ in range(5):
        step(x)
    _sync(device)
    start = time.perf_counter()
    for i in range(steps):
        step(x, i)
    _sync(device)
    return batch_size * steps / (time.perf_counter() - start)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _subprocess_rate(cmd: list[str]) -> float:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise click.ClickException(f"benchmark process failed: {' '.join(cmd)}\n{out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["images_per_s"]


def profile(batch_size: int, device: torch.device) -> str:
    from torch.profiler import ProfilerActivity, profile as torch_profile
    from .config import RNPConfig
    from .model import RNP
    from .training import TrainStep, make_optimizer

    rnp = RNP(RNPConfig()).to(device)
    step = TrainStep(rnp, make_optimizer(rnp, 4e-5))
    x = torch.rand(batch_size, 1, 28, 28, device=device)
    step(x), step(x)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities, record_shapes=True) as prof:
        for _ in range(3):
            step(x)
        _sync(device)
    return prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=30)


@click.command(name="pyro_rnp.bench", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--batch-size", type=click.IntRange(min=2), default=64, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=16, show_default=True, help="Timed steps per round.")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True,
              help="Alternating rounds of ours and the reference; medians are reported.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--reference", type=click.Path(dir_okay=False, path_type=pathlib.Path), default=DEFAULT_REFERENCE,
              show_default=True, help="The straightforward port to compare with; 'none' to skip.")
@click.option("--variants", default="fp32", show_default=True,
              help=f"Comma-separated versions of our step to time, each in every round: {', '.join(VARIANTS)} "
                   "(bf16 needs CUDA).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON line.")
@click.option("--profile", "do_profile", is_flag=True, help="Print a torch.profiler table of 3 steps instead.")
@click.option("--worker", is_flag=True, hidden=True)
def main(batch_size, steps, rounds, device, reference, variants, as_json, do_profile, worker):
    """Images/s of full training steps of the paper-size RNP, against the straightforward port."""
    if device == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available on this machine", param_hint="--device")
    names = [v.strip() for v in variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise click.BadParameter(f"unknown variant {', '.join(unknown) or repr(variants)}; choose from "
                                 f"{', '.join(VARIANTS)}", param_hint="--variants")
    if device == "cpu" and any(VARIANTS[v][0] for v in names):
        raise click.BadParameter("bf16 autocast is for CUDA devices", param_hint="--variants")
    dev = torch.device(device)
    if do_profile:
        click.echo(profile(batch_size, dev))
        return
    if worker:
        click.echo(json.dumps({"images_per_s": time_steps(batch_size, steps, dev, variant=names[0])}))
        return
    use_reference = str(reference) != "none"
    if use_reference and not reference.is_file():
        raise click.BadParameter(f"{reference} not found; pass --reference PATH or --reference none",
                                 param_hint="--reference")
    per_variant, theirs = {v: [] for v in names}, []
    common = ["--batch-size", str(batch_size), "--steps", str(steps), "--device", device]
    for r in range(rounds):
        for v in names:
            per_variant[v].append(_subprocess_rate([sys.executable, "-m", "pyro_rnp.bench", "--worker",
                                                    "--variants", v, *common]))
        if use_reference:
            theirs.append(_subprocess_rate([sys.executable, str(reference), "--json", *common]))
        if not as_json:
            line = f"round {r + 1}/{rounds}: " + ", ".join(f"pyro_rnp {v} {per_variant[v][-1]:.1f}" for v in names)
            click.echo(line + (f", reference {theirs[-1]:.1f}" if use_reference else "") + " images/s", err=True)
    ours = per_variant[names[0]]
    result = {"images_per_s": statistics.median(ours), "batch_size": batch_size, "steps": steps, "rounds": rounds,
              "device": device, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "runs": ours, "variants": {v: statistics.median(r) for v, r in per_variant.items()},
              "variant_runs": per_variant}
    if use_reference:
        result.update(reference_images_per_s=statistics.median(theirs), reference_runs=theirs,
                      ratio=statistics.median(ours) / statistics.median(theirs))
    if device == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
    if as_json:
        click.echo(json.dumps(result))
    else:
        for v, rate in result["variants"].items():
            click.echo(f"pyro_rnp {v}: {rate:.1f} images/s (median of {rounds}, batch {batch_size}, "
                       f"{device}, {result['threads']} threads)")
        if use_reference:
            click.echo(f"reference port: {result['reference_images_per_s']:.1f} images/s; ratio "
                       + ", ".join(f"{v} {rate / result['reference_images_per_s']:.2f}x"
                                   for v, rate in result["variants"].items()))


if __name__ == "__main__":
    run(main)
