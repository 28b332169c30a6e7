"""What the commands share: one-line errors, the options every command on a run folder takes, and
opening a run folder with the checks a command needs."""
from __future__ import annotations

import logging
import os
import pathlib
import signal
import sys

import click
import torch
from tqdm.auto import tqdm

from .data import DataError, write_json
from .model.registry import model_entry, require
from .training.loop import TrainingError
from .training.runs import RunError

__all__ = ["ClassList", "StopRequest", "TrainingError", "analysis_options", "check_amp", "data_options",
           "fast_path_enabled", "held_out", "open_run", "resolve_device", "run", "write_result"]


def run(command: click.Command, args=None) -> None:
    """Invoke ``command``; usage errors and known failures print one line to stderr."""
    prog = f"python -m {command.name}"
    _say_data_notices()
    try:
        command.main(args=args, prog_name=prog, standalone_mode=False)
    except click.UsageError as e:
        click.echo(f"{prog}: error: {e.format_message()} (see --help)", err=True)
        sys.exit(2)
    except click.ClickException as e:
        click.echo(f"{prog}: error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo(f"{prog}: interrupted", err=True)
        sys.exit(130)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except (DataError, RunError, TrainingError) as e:
        click.echo(f"{prog}: error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo(f"{prog}: interrupted", err=True)
        sys.exit(130)


def _say_data_notices() -> None:
    """The data layer's one-line notices (which copy of a dataset is read) go to stderr."""
    logger = logging.getLogger("pyro_rnp.data")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def fast_path_enabled() -> bool:
    """Whether the commands run generated programs on the fast path (``PYRO_RNP_FAST=0``: the plain one)."""
    return os.environ.get("PYRO_RNP_FAST", "1") != "0"


def resolve_device(name: str) -> torch.device:
    """"auto" picks CUDA when available; "cuda" without a GPU is a usage error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available on this machine; use --device cpu or auto",
                                 param_hint="--device")
    return torch.device(name)


def check_amp(amp: str | None, device: torch.device) -> None:
    """Refuse ``--amp bf16`` in one line where it cannot run well: on a CPU without native bfloat16
    arithmetic (no avx512_bf16 or AMX), where every bfloat16 product would be emulated."""
    from .fast.onednn import cpu_computes_bf16
    if amp and device.type == "cpu" and not cpu_computes_bf16():
        raise click.BadParameter("this CPU does not compute bfloat16 natively (no avx512_bf16 or AMX): drop --amp "
                                 "to run in float32", param_hint="--amp")


def data_options(command):
    """--data-dir and --no-download, as every command that reads a dataset takes them."""
    options = [
        click.option("--data-dir", type=click.Path(file_okay=False, path_type=pathlib.Path), envvar="PYRO_RNP_DATA",
                     show_envvar=True, help="Folder with the datasets in torchvision's layout "
                     "[~/.cache/pyro_rnp/data]."),
        click.option("--no-download", is_flag=True, help="Never download; fail if the data is not in --data-dir "
                     "(or already in our cache)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def analysis_options(limit_default: int | None = None, limit_help: str = "Use the first N held-out images.",
                     seed_help: str = "Random seed.", seed_default: int = 0, limit_aliases: tuple[str, ...] = ()):
    """RUN_DIR, --limit, --device, --amp, --data-dir, --no-download and --seed: what every command on a trained
    run takes (evaluate, ppc, figures, transfer), defined once. ``limit_aliases``: older names of --limit."""
    def decorate(command):
        options = [
            click.argument("run_dir", type=click.Path(path_type=pathlib.Path)),
            click.option("--limit", *limit_aliases, "limit", type=click.IntRange(min=1), default=limit_default,
                         show_default=limit_default is not None, help=limit_help),
            click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True),
            click.option("--amp", type=click.Choice(["bf16"]), help="Run the model in bfloat16 under autocast (on "
                         "CUDA, or a CPU that computes it natively); float32 by default, whatever the run trained in."),
            click.option("--seed", type=int, default=seed_default, show_default=True, help=seed_help),
        ]
        for option in reversed(options):
            command = option(command)
        return data_options(command)
    return decorate


def open_run(run_dir, device: str, needs: str | None = None, what: str = "this command", amp: str | None = None):
    """(config, trained model in eval mode, torch device) of a run folder, with clear errors; a model
    without the capability ``needs`` ("guide", "parts", "programs") is refused in one line, and so is
    an ``amp`` this device cannot run (the command runs its work under ``mixed_precision(amp, device)``)."""
    from .training.runs import load_run, read_config
    torch_device = resolve_device(device)
    check_amp(amp, torch_device)
    config = read_config(run_dir)
    try:
        model_entry(config.model)
    except ValueError as e:
        raise RunError(f"{run_dir}: {e}") from None
    model = load_run(run_dir, device=torch_device, fast=fast_path_enabled())
    if needs is not None:
        try:
            require(model, needs, what)
        except ValueError as e:
            raise RunError(str(e)) from None
    return config, model, torch_device


def held_out(config, data_dir, download: bool, limit: int | None = None):
    """The held-out (images, labels) a command on a run reads: the first ``limit`` test images
    without the run's excluded classes; for a run whose guide was fitted to fixed images
    (autonormal), those images only; for a run on dynamically binarised images, their held-out draw."""
    from .data import binarize, load_images
    exclude = config.exclude_classes
    if config.guide == "autonormal":
        limit, exclude = min(limit or config.limit, config.limit), ()
    images, labels = load_images(config.dataset, "test", data_dir, download, limit, exclude).tensors
    if config.binarize == "dynamic":
        images = binarize(images, config.seed)
    return images, labels


def write_result(run_dir, name: str, result: dict) -> pathlib.Path:
    """A command's JSON result in the run folder, written atomically."""
    return write_json(pathlib.Path(run_dir) / name, result)


class ClassList(click.ParamType):
    """A comma-separated list of non-negative class labels, as a tuple of ints."""
    name = "LABELS"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            labels = tuple(sorted({int(v) for v in str(value).split(",") if v.strip()}))
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of class labels", param, ctx)
        if not labels or min(labels) < 0:
            self.fail(f"{value!r} is not a comma-separated list of class labels", param, ctx)
        return labels


class StopRequest:
    """First Ctrl-C: finish the current step, save, exit. Second: abort at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("Stopping after this step to save a checkpoint (Ctrl-C again to abort without saving)...")

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._previous)
