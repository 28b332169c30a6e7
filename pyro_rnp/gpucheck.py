"""Check the CUDA path on a GPU in a few minutes: ``python -m pyro_rnp.gpucheck [--data-dir DIR]``.

No GPU has been available to this project's CI, so what can only be seen on one is
checked here, for the first GPU that comes along:

1. training steps of the paper-size RNP in float32, under bfloat16 autocast, and with
   ``--compile``, each inside ``torch.cuda.set_sync_debug_mode("error")``: any host wait
   inside the step raises (the Bernoulli likelihood and the low-rank guide under bf16 too);
2. a tiny run, interrupted by its epoch count and resumed with ``--resume`` on CUDA (the
   checkpoint's RNG states are loaded to the GPU by map_location and must be restored);
3. with two GPUs or more, the same tiny run on two processes with nccl under torchrun.

It prints one line per check and exits non-zero if any failed.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile
import time
import traceback

import click
import torch

from .cli import data_options, run


def _steps(variant: str, likelihood: str = "normal", guide: str = "resnet", steps: int = 3) -> str:
    """A few training steps with every host wait inside the step made an error."""
    from .fast import prepare_process_for_training
    from .model import RNP, RNPConfig
    from .training import TrainStep, make_optimizer
    from .training.run import compile_model

    torch.manual_seed(0)
    model = RNP(RNPConfig(likelihood=likelihood, guide=guide)).cuda()
    if variant == "compile":
        compile_model(model)
    step = TrainStep(model, make_optimizer(model, 4e-5), amp="bf16" if variant == "bf16" else None)
    prepare_process_for_training(cpu=False)
    x = torch.rand(64, 1, 28, 28, device="cuda")
    step(x, 0)  # the first step may compile and allocate; it is not checked
    torch.cuda.synchronize()
    started = time.perf_counter()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for k in range(1, steps + 1):
            loss, applied = step(x, k)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    rate = steps * 64 / (time.perf_counter() - started)
    if not (bool(applied) and torch.isfinite(loss)):
        raise AssertionError(f"the step was not applied or its loss is not finite ({loss.item()})")
    return f"{rate:.0f} images/s, loss {loss.item() / 64:.1f} per image"


def _fit(*args: str, torchrun: int = 0) -> None:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
                if torchrun else [sys.executable])
    out = subprocess.run([*launcher, "-m", "pyro_rnp.fit", *args], capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise AssertionError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}")


TINY = ["--dataset", "mnist", "--preset", "quick", "--limit", "512", "--eval-limit", "64", "--device", "cuda",
        "--quiet"]


def _resume(data: list[str], folder: pathlib.Path) -> str:
    run_dir = folder / "resume"
    _fit(*TINY, *data, "--epochs", "1", "--run-dir", str(run_dir))
    _fit("--resume", str(run_dir), "--epochs", "2", "--device", "cuda", "--quiet", *data)
    from .training.runs import read_metrics
    epochs = [m["epoch"] for m in read_metrics(run_dir)]
    if epochs != [1, 2]:
        raise AssertionError(f"metrics after the resume have epochs {epochs}, not [1, 2]")
    return "trained 1 epoch, resumed to 2"


def _two_processes(data: list[str], folder: pathlib.Path) -> str:
    if torch.cuda.device_count() < 2:
        return "skipped: needs two GPUs"
    _fit(*TINY, *data, "--epochs", "1", "--run-dir", str(folder / "ddp"), torchrun=2)
    return "two processes, nccl: trained 1 epoch"


@click.command(name="pyro_rnp.gpucheck", context_settings={"help_option_names": ["-h", "--help"]})
@data_options
def main(data_dir, no_download):
    """Check the CUDA path on this machine's GPU: sync-free steps (fp32, bf16, compile), a resume on
    CUDA, and a two-process nccl run (with two GPUs)."""
    if not torch.cuda.is_available():
        raise click.ClickException("no CUDA device here; run this on a machine with a GPU")
    checks = [("step fp32", lambda: _steps("fp32")), ("step bf16", lambda: _steps("bf16")),
              ("step compile", lambda: _steps("compile")),
              ("step bf16, bernoulli likelihood", lambda: _steps("bf16", likelihood="bernoulli")),
              ("step bf16, low-rank guide", lambda: _steps("bf16", guide="resnet-lowrank"))]
    failed = 0
    data = (["--data-dir", str(data_dir)] if data_dir else []) + (["--no-download"] if no_download else [])
    with tempfile.TemporaryDirectory() as folder:
        checks += [("resume on cuda", lambda: _resume(data, pathlib.Path(folder))),
                   ("torchrun, nccl", lambda: _two_processes(data, pathlib.Path(folder)))]
        click.echo(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, {torch.cuda.device_count()} GPU(s)")
        for name, check in checks:
            try:
                click.echo(f"ok    {name}: {check()}")
            except Exception as e:  # report every check, then fail
                failed += 1
                where = traceback.extract_tb(e.__traceback__)[-1]
                click.echo(f"FAIL  {name}: {type(e).__name__}: {str(e).splitlines()[0][:300]} "
                           f"({os.path.basename(where.filename)}:{where.lineno})")
    if failed:
        raise click.ClickException(f"{failed} of {len(checks)} checks failed")


if __name__ == "__main__":
    run(main)
