"""Benchmark full training steps of the paper-size model: ``python -m pyro_rnp.bench``.

Times our SVI step (Trace_ELBO forward, backward, gradient clamp, Adam) on random
images against the straightforward port in ``../shared/bench/reference_rnp.py``
(same sizes and batch) when it is found. Each runs in a worker process of its own,
set up and warmed up once (five steps), that times ``--steps`` steps whenever it
is asked; the two are asked in turn, round after round (ours first in odd rounds,
the port first in even ones), so that the two timings of a round are seconds apart
and only one process runs at a time. This project's shared machine swings by a
quarter in speed over minutes, so a round's ratio compares like with like.
Reported: the median images/s of each, and the median of the rounds' ratios.

Each worker applies the process-wide training settings first, as fit does
(pyro_rnp/fast/process.py). Profile the step (what to look at before optimising):
    python -m pyro_rnp.bench --profile [--variants bf16]
In float32 the head's products run in oneDNN on CPU through a private op (see
pyro_rnp/fast/onednn.py; the result's ``head_products`` says which path ran); to time
the step with torch.mm instead, or the plain program path (pyro_rnp/model/hypernet.py):
    PYRO_RNP_ONEDNN=0 python -m pyro_rnp.bench
    PYRO_RNP_FAST=0 python -m pyro_rnp.bench
On a CPU that computes bfloat16 natively (avx512_bf16 or AMX), the bf16 variant is
``fit --amp bf16``: CPU autocast, the head's products and the generated layers'
weight gradients in bfloat16 through torch.mm and torch.bmm, the generated layers
themselves in float32 (pyro_rnp/fast/programs.py):
    python -m pyro_rnp.bench --variants fp32,bf16

What was measured on this project's 2-core AMD EPYC (avx512_bf16), torch 2.14.1, batch 64:
- fp32 and bf16 against the port, in one run of ``--variants fp32,bf16 --rounds 4``
  (the README has the current table): the bf16 step takes about 0.85 of the fp32 step.
- Where the bf16 step's time goes (``--profile --variants bf16``): the head's products
  (h @ head, its two gradients) run near this CPU's bfloat16 peak; the generated
  layers' batched matrix-vector products read each program's weights from memory
  and are bound by its bandwidth. In bfloat16 torch.bmm with one row per matrix
  measured 0.9-2x the time of float32 on weights laid out as the step has them
  (5 batches of 64 programs: 1.65 against 1.90 ms for 64->784 layers, 3.0 against
  1.55 ms for 784->64, 7.5 against 1.8 ms for their input gradients), which is why
  those layers stay in float32.
- Generated layers in bfloat16 as well (tried 2026-12-03, not kept): each layer's weights
  generated contiguous over the programs, forward by torch.bmm, input gradients by one
  grouped 1x1 convolution over the weights as they lie (no transposed copy; torch.bmm in
  bfloat16 copies a transposed operand first, 5.7 ms a call for 784-wide layers). In-process
  A/B against the bf16 step, 8 rounds of 3 steps, 2 threads, nothing else running: 0.90x
  (268 against 296 images/s). oneDNN's grouped convolution took 1.2-1.3 ms a call on those
  weights. Per call on 8 cycling weight sets (beyond the 32 MB L3), 2 threads, float32 then
  bfloat16 at their best: 784->64 forward 0.66 / 0.44 ms, its input gradient 0.60 / 0.29-0.51
  (W @ g, by torch.bmm and torch.matmul, the same product); 64->784 forward 0.36 / 0.39,
  input gradient 0.50 / 0.33: at most about 14 ms of a 216 ms step, where the 3x target
  needs about 58 ms.
- What bounds the bf16 step (2026-12-03): its cost at batch 2, where the products are tiny, is
  about 90 ms in both variants (``--variants fp32,bf16 --batch-size 2``: 22.1 images/s each, the
  port 14.9): Python, the dispatcher and autograd over about 7,000 operations a step, and Adam, the
  gradient clamp and the head's products over the head's 8.5 million numbers. 3x the port at batch
  64 is about 173 ms a step, which leaves about 83 ms for the work that grows with the batch. A
  profile of the bf16 step at both sizes (self time per step, torch.profiler, which adds its own
  cost per operation; wall 76 and 287 ms, the machine busy): head products 14 -> 57 ms (16.4 GFLOP
  a step at batch 64, near this CPU's bfloat16 peak), 784-wide generated layers 2 -> 51, the other
  generated layers 6 -> 37, the encoder's convolutions 2 -> 15, head conversions 5 -> 9, grid
  sampling 0.5 -> 7, optimizer 5 -> 5.5, everything else 48 -> 121 ms. The first two alone grow by
  about 90 ms; the best bfloat16 layer kernels measured (below) would take at most 14 ms off. So 3x
  needs the step's fixed cost cut by more than half as well, that is the program executor's
  operations run outside Python and autograd, not a faster kernel. torch.compile (default mode,
  dynamic=False) of the plain executor (PlainPrograms) is not that: the executor's forward and
  backward alone at batch 64, float32, took 225 s to compile and then 770-980 ms a call, against
  1350-1710 ms eager on the plain path and 240-275 ms on the fast path inside a training pass.
- torch's CPU ELU (F.elu) measured about 20x the time of torch.exp on (64, 64)
  tensors (84 against 3.7 us, one thread); an exp-based ELU in the generated
  layers did not change the step's time measurably, so F.elu stays. Again on 2026-12-03 (2
  threads): F.elu 49 us, torch.exp 5, torch.expm1 27 (which F.elu's time follows); F.elu replaced
  everywhere (trunk too) by where(x > 0, x, exp(x) - 1), in-process A/B, 8 rounds of 3 bf16
  steps: 0.99x.
"""
from __future__ import annotations

import json
import pathlib
import statistics
import subprocess
import sys
import tempfile

import click
import torch

from .cli import fast_path_enabled, run
from .fast.onednn import cpu_computes_bf16, onednn_available
from .training.step import AMP_DTYPES

DEFAULT_REFERENCE = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "bench" / "reference_rnp.py"
WARMUP_STEPS = 5  # for the buffers that the CPU path recycles to settle (and torch.compile to compile)

VARIANTS = {"fp32": (None, False), "bf16": ("bf16", False), "compile": (None, True), "bf16+compile": ("bf16", True)}

# Worker processes: a setup that defines ``step`` (one training step), then one shared loop. The
# port's setup imports nothing but torch and the port, as the port's own script does.
_OURS = """
import sys, torch
from pyro_rnp.bench import our_step
variant, batch_size, device, warmup = sys.argv[1], int(sys.argv[2]), torch.device(sys.argv[3]), int(sys.argv[4])
step = our_step(batch_size, device, variant)
"""
_PORT = """
import importlib.util, sys, torch
path, batch_size, device, warmup = sys.argv[1], int(sys.argv[2]), torch.device(sys.argv[3]), int(sys.argv[4])
spec = importlib.util.spec_from_file_location("reference_rnp", path)
reference = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reference)
torch.manual_seed(0)
step = reference.make_step(batch_size, device)
"""
_SERVE = """
import json, time
sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
for _ in range(warmup):
    step()
sync()
print("ready", flush=True)
for line in sys.stdin:  # a number of steps to time; the answer is one JSON line
    start = time.perf_counter()
    for _ in range(int(line)):
        step()
    sync()
    print(json.dumps({"images_per_s": batch_size * int(line) / (time.perf_counter() - start)}), flush=True)
"""


def our_step(batch_size: int, device: torch.device, variant: str = "fp32", seed: int = 0):
    """One training step of the paper-size RNP on random images, as a function of no arguments; the
    process is prepared for training as fit prepares it."""
    from .fast import prepare_process_for_training
    from .model import RNP, RNPConfig
    from .training import TrainStep, make_optimizer
    from .training.run import compile_model

    amp, compiled = VARIANTS[variant]
    torch.manual_seed(seed)
    rnp = RNP(RNPConfig()).to(device)
    if compiled:
        compile_model(rnp)
    train_step = TrainStep(rnp, make_optimizer(rnp, 4e-5), amp=amp, fast=fast_path_enabled())
    prepare_process_for_training(cpu=device.type == "cpu")
    x = torch.rand(batch_size, 1, 28, 28, device=device)
    return lambda: train_step(x)


def head_products(device: torch.device, amp: str | None) -> str:
    """How a variant's hypernetwork head products run here (what the bench reports)."""
    if device.type == "cuda":
        return f"torch.mm ({amp or 'float32'}, CUDA)"
    if amp:
        return f"torch.mm in {AMP_DTYPES[amp]} (public op)"
    if not fast_path_enabled():
        return "torch.mm in float32 (plain program path)"
    return ("oneDNN float32 matmul (private op torch.ops.mkldnn._linear_pointwise)" if onednn_available()
            else "torch.mm in float32 (public op)")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Worker:
    """A benchmark worker process, kept warm between rounds."""

    def __init__(self, name: str, setup: str, args: list):
        self.name, self.rates = name, []
        self.errors = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty worker never blocks on it
        self.process = subprocess.Popen([sys.executable, "-c", setup + _SERVE, *map(str, args)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self.errors, text=True, bufsize=1)
        line = self._answer()
        if line != "ready":
            self._fail(line)

    def _answer(self) -> str:
        line = self.process.stdout.readline().strip()
        if not line:
            self._fail(line)
        return line

    def _fail(self, line: str):
        self.process.kill()
        self.process.wait()
        self.errors.seek(0)
        error = self.errors.read().strip()[-2000:]
        raise click.ClickException(f"the {self.name} benchmark worker failed:\n{error or line}")

    def time(self, steps: int) -> float:
        self.process.stdin.write(f"{steps}\n")
        self.process.stdin.flush()
        self.rates.append(json.loads(self._answer())["images_per_s"])
        return self.rates[-1]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=60)
        self.errors.close()


def profile(batch_size: int, device: torch.device, variant: str = "fp32") -> str:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    step = our_step(batch_size, device, variant)
    for _ in range(WARMUP_STEPS):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities, record_shapes=True) as prof:
        for _ in range(3):
            step()
        _sync(device)
    return prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=30)


@click.command(name="pyro_rnp.bench", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--batch-size", type=click.IntRange(min=2), default=64, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=8, show_default=True,
              help="Timed steps per round and program.")
@click.option("--rounds", type=click.IntRange(min=1), default=10, show_default=True,
              help="Rounds, each timing ours and the reference in turn; medians are reported.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--reference", type=click.Path(dir_okay=False, path_type=pathlib.Path), default=DEFAULT_REFERENCE,
              show_default=True, help="The straightforward port to compare with; 'none' to skip.")
@click.option("--variants", default="fp32", show_default=True,
              help=f"Comma-separated versions of our step to time, each in every round: {', '.join(VARIANTS)} "
                   "(bf16 needs CUDA or a CPU that computes bfloat16 natively).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON line.")
@click.option("--profile", "do_profile", is_flag=True,
              help="Print a torch.profiler table of 3 steps of the first variant instead.")
def main(batch_size, steps, rounds, device, reference, variants, as_json, do_profile):
    """Images/s of full training steps of the paper-size RNP, against the straightforward port."""
    if device == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available on this machine", param_hint="--device")
    names = [v.strip() for v in variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise click.BadParameter(f"unknown variant {', '.join(unknown) or repr(variants)}; choose from "
                                 f"{', '.join(VARIANTS)}", param_hint="--variants")
    if device == "cpu" and any(VARIANTS[v][0] for v in names) and not cpu_computes_bf16():
        raise click.BadParameter("this CPU does not compute bfloat16 natively (no avx512_bf16 or AMX); time fp32",
                                 param_hint="--variants")
    dev = torch.device(device)
    if do_profile:
        click.echo(profile(batch_size, dev, names[0]))
        return
    use_reference = str(reference) != "none"
    if use_reference and not reference.is_file():
        raise click.BadParameter(f"{reference} not found; pass --reference PATH or --reference none",
                                 param_hint="--reference")
    ours, started, port = {}, [], None
    try:
        if use_reference:  # first: a port that does not run fails in seconds
            port = Worker("reference", _PORT, [reference, batch_size, device, WARMUP_STEPS])
            started.append(port)
        for v in names:
            ours[v] = Worker(f"pyro_rnp {v}", _OURS, [v, batch_size, device, WARMUP_STEPS])
            started.append(ours[v])
        workers = [*ours.values()] + ([port] if port else [])
        for r in range(rounds):
            for w in (workers if r % 2 == 0 else workers[::-1]):
                w.time(steps)
            if not as_json:
                click.echo(f"round {r + 1}/{rounds}: " + ", ".join(f"{w.name} {w.rates[-1]:.1f}" for w in workers)
                           + " images/s", err=True)
    finally:
        for w in started:
            w.close()
    first = ours[names[0]].rates
    result = {"images_per_s": statistics.median(first), "batch_size": batch_size, "steps": steps, "rounds": rounds,
              "warmup_steps": WARMUP_STEPS, "device": device, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "runs": first,
              "variants": {v: statistics.median(w.rates) for v, w in ours.items()},
              "head_products": {v: head_products(dev, VARIANTS[v][0]) for v in names},
              "variant_runs": {v: w.rates for v, w in ours.items()}}
    if use_reference:
        theirs = port.rates
        result.update(reference_images_per_s=statistics.median(theirs), reference_runs=theirs,
                      ratio=statistics.median(a / b for a, b in zip(first, theirs)),
                      ratio_of_medians=statistics.median(first) / statistics.median(theirs),
                      variant_ratios={v: statistics.median(a / b for a, b in zip(w.rates, theirs))
                                      for v, w in ours.items()})
    if device == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
    if as_json:
        click.echo(json.dumps(result))
    else:
        for v, rate in result["variants"].items():
            click.echo(f"pyro_rnp {v}: {rate:.1f} images/s (median of {rounds} rounds of {steps} steps, batch "
                       f"{batch_size}, {device}, {result['threads']} threads, torch {torch.__version__}; head's "
                       f"products: {result['head_products'][v]})")
        if use_reference:
            click.echo(f"reference port: {result['reference_images_per_s']:.1f} images/s; median ratio over rounds: "
                       + ", ".join(f"{v} {ratio:.2f}x" for v, ratio in result["variant_ratios"].items()))


if __name__ == "__main__":
    run(main)
