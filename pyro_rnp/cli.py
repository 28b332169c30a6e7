"""Running click commands the way users expect: one-line errors, no tracebacks, honest exit codes."""
from __future__ import annotations

import pathlib
import sys

import click
import torch

from .data import DataError
from .runs import RunError


class TrainingError(Exception):
    """Training cannot go on (for example it diverged); str(e) says what happened and what to do."""


def run(command: click.Command, args=None) -> None:
    """Invoke ``command``; usage errors and known failures print one line to stderr."""
    prog = f"python -m {command.name}"
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


def resolve_device(name: str) -> torch.device:
    """"auto" picks CUDA when available; "cuda" without a GPU is a usage error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available on this machine; use --device cpu or auto",
                                 param_hint="--device")
    return torch.device(name)


def run_folder_options(command):
    """RUN_DIR, --device, --data-dir and --no-download: what every command on a trained run takes."""
    options = [
        click.argument("run_dir", type=click.Path(path_type=pathlib.Path)),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True),
        click.option("--data-dir", type=click.Path(file_okay=False, path_type=pathlib.Path), envvar="PYRO_RNP_DATA",
                     show_envvar=True, help="Folder with the datasets in torchvision's layout."),
        click.option("--no-download", is_flag=True, help="Never download; fail if the data is not in --data-dir."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def open_run(run_dir, device: str):
    """(config, trained RNP in eval mode, torch device) of a run folder, with clear errors."""
    from .runs import load_run, read_config
    torch_device = resolve_device(device)
    config = read_config(run_dir)
    return config, load_run(run_dir, device=torch_device), torch_device


def held_out(config, data_dir, download: bool, limit: int | None = None):
    """The held-out (images, labels) a command on a run reads: the first ``limit`` test images
    without the run's excluded classes; for a run whose guide was fitted to fixed images
    (autonormal), those images only."""
    from . import data as datasets
    exclude = config.exclude_classes
    if config.guide == "autonormal":
        limit, exclude = min(limit or config.limit, config.limit), ()
    return datasets.load_images(config.dataset, "test", data_dir, download, limit, exclude).tensors
