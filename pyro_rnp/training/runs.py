"""Run folders: everything a training run writes, and reading it back.

    runs/<dataset>-<timestamp>/
        config.json      the RNPConfig and how the run was started
        metrics.jsonl    one JSON object per epoch
        checkpoint.pt    model, optimizer and RNG state, epoch and step (written atomically)
        figures/         PNGs, refreshed during training
"""
from __future__ import annotations

import datetime
import gzip
import io
import json
import pathlib
import platform
import random

import numpy as np
import torch

from ..data.atomic import atomic_write, write_json
from ..model.config import RNPConfig

CHECKPOINT = "checkpoint.pt"
WEIGHTS = "weights.pt"              # the weights alone, in half precision: what a committed reference run ships
CONFIG = "config.json"
METRICS = "metrics.jsonl"
FORMAT = 1


class RunError(Exception):
    """A user-facing problem with a run folder or checkpoint; str(e) says what to do."""


def new_run_dir(dataset: str, root: str | pathlib.Path = "runs") -> pathlib.Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = pathlib.Path(root) / f"{dataset}-{stamp}"
    suffix = 1
    while path.exists():
        suffix += 1
        path = pathlib.Path(root) / f"{dataset}-{stamp}-{suffix}"
    return path


def versions() -> dict:
    import importlib.metadata

    import pyro
    try:
        ours = importlib.metadata.version("pyro_rnp")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        ours = "unknown"
    return {"pyro_rnp": ours, "torch": torch.__version__, "pyro": pyro.__version__,
            "python": platform.python_version()}


def write_config(run_dir: pathlib.Path, config: RNPConfig, **extra) -> None:
    write_json(run_dir / CONFIG, {"config": config.to_dict(), "versions": versions(), **extra})


def read_config(run_dir: pathlib.Path) -> RNPConfig:
    run_dir = pathlib.Path(run_dir)
    path = run_dir / CONFIG
    if not run_dir.is_dir():
        raise RunError(f"{run_dir} is not a folder. Pass a run folder written by `python -m pyro_rnp.fit`.")
    if not path.is_file():
        raise RunError(f"{run_dir} is not a pyro_rnp run folder: it has no {CONFIG}. "
                       "Pass a folder written by `python -m pyro_rnp.fit` (under runs/ by default).")
    try:
        return RNPConfig.from_dict(json.loads(path.read_text())["config"])
    except (ValueError, KeyError, TypeError) as e:
        raise RunError(f"{path} is not a valid pyro_rnp config ({e}). Was it edited by hand?") from None


def append_metrics(run_dir: pathlib.Path, record: dict) -> None:
    with open(run_dir / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(run_dir: pathlib.Path) -> list[dict]:
    path = pathlib.Path(run_dir) / METRICS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _rng_state() -> dict:
    """The RNG states of this process: CPU, NumPy, Python, and the current CUDA device's (only that one:
    a run resumed with another number of visible GPUs must still restore it)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore ``_rng_state()``'s states, wherever ``torch.load``'s map_location put the tensors (torch
    takes RNG states only as CPU byte tensors)."""
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # checkpoints that saved every visible device's state
            cuda = cuda[torch.cuda.current_device()] if torch.cuda.current_device() < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda.cpu())


def save_checkpoint(run_dir: pathlib.Path, rnp, optimizer, *, epoch: int, step: int, batch_in_epoch: int,
                    wall_time_s: float, **extra) -> pathlib.Path:
    """Atomically write the full training state. Refuses non-finite weights, so a good checkpoint
    is never replaced by a diverged one."""
    state = rnp.state_dict()
    bad = [name for name, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise RunError(f"not saving a checkpoint: non-finite values in {', '.join(bad[:3])}"
                       f"{' ...' if len(bad) > 3 else ''}. The last good checkpoint is kept in {run_dir}.")
    payload = {
        "format": FORMAT, "config": rnp.config.to_dict(), "model": state,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "rng": _rng_state(), "epoch": epoch, "step": step, "batch_in_epoch": batch_in_epoch,
        "wall_time_s": wall_time_s, "versions": versions(), **extra,
    }
    path = pathlib.Path(run_dir) / CHECKPOINT
    atomic_write(path, lambda p: torch.save(payload, p))
    return path


def save_weights(run_dir: pathlib.Path, rnp, dtype: torch.dtype = torch.float16, compress: bool = False,
                 **extra) -> pathlib.Path:
    """Atomically write ``WEIGHTS``: the model's state with every floating tensor in ``dtype`` (half the
    bytes of float32, for sharing a trained run), its config, no optimizer or RNG state. Refuses a
    state that ``dtype`` cannot hold (a finite value that overflows it).

    With ``compress`` the torch file is gzip-compressed (level 9, no timestamp, so the same weights
    give the same bytes): float16 weights shrink by about 8%, which can bring a larger model under a
    size limit. ``load_checkpoint`` reads either form; ``torch.load`` needs ``gzip -dc`` first."""
    full = {name: t.detach().cpu() for name, t in rnp.state_dict().items()}
    state = {name: t.to(dtype) if t.is_floating_point() else t for name, t in full.items()}
    bad = [name for name, t in state.items()
           if t.is_floating_point() and not torch.equal(torch.isfinite(t), torch.isfinite(full[name]))]
    if bad:
        raise RunError(f"not writing {WEIGHTS}: {', '.join(bad[:3])} overflow {dtype} (keep {CHECKPOINT} instead)")
    payload = {"format": FORMAT, "config": rnp.config.to_dict(), "model": state, "optimizer": None,
               "weights_only": str(dtype).removeprefix("torch."), "versions": versions(), **extra}
    path = pathlib.Path(run_dir) / WEIGHTS
    if compress:
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        packed = gzip.compress(buffer.getbuffer(), compresslevel=9, mtime=0)
        atomic_write(path, lambda p: p.write_bytes(packed))
    else:
        atomic_write(path, lambda p: torch.save(payload, p))
    return path


def check_resumable(run_dir: pathlib.Path) -> None:
    """Refuse, in one line, to resume a folder that holds only shared weights (no optimizer state)."""
    run_dir = pathlib.Path(run_dir)
    if not (run_dir / CHECKPOINT).is_file() and (run_dir / WEIGHTS).is_file():
        raise RunError(f"{run_dir} holds only its weights in half precision ({WEIGHTS}), without the "
                       "optimizer's state: it can be evaluated and drawn but not resumed; start a new run.")


def load_checkpoint(run_dir: pathlib.Path, map_location="cpu", resume: bool = False,
                    weights_only: bool = False) -> dict:
    """The checkpoint of a run folder, checked against the folder's config: ``CHECKPOINT``, or where
    the folder holds only ``WEIGHTS`` (a shared run), or with ``weights_only``, those weights, which
    cannot be resumed."""
    run_dir = pathlib.Path(run_dir)
    config = read_config(run_dir)
    path = run_dir / CHECKPOINT
    if resume:
        check_resumable(run_dir)
    if weights_only or (not path.is_file() and (run_dir / WEIGHTS).is_file()):
        path = run_dir / WEIGHTS
    if not path.is_file():
        raise RunError(f"{run_dir} has no {CHECKPOINT} yet: the run stopped before its first save. "
                       "Start it again, or resume a run that has one.")
    try:
        payload = torch.load(_torch_file(path), map_location=map_location, weights_only=False)
    except Exception as e:  # truncated, overwritten or not a torch file at all
        raise RunError(f"{path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:120]}). "
                       "It is corrupt or truncated; start a new run or restore the file.") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or "model" not in payload:
        raise RunError(f"{path} is not a pyro_rnp checkpoint (format {FORMAT}).")
    saved = RNPConfig.from_dict(payload["config"])
    diff = [f"{k}: checkpoint {getattr(saved, k)!r} vs config.json {getattr(config, k)!r}"
            for k in RNPConfig.ARCHITECTURE if getattr(saved, k) != getattr(config, k)]
    if diff:
        raise RunError(f"{path} does not match {run_dir / CONFIG} ({'; '.join(diff)}). "
                       "The folder mixes two runs; start a new run.")
    return payload


def _torch_file(path: pathlib.Path):
    """``path``, or its contents decompressed where it is gzip-compressed (``save_weights(compress=True)``)."""
    with open(path, "rb") as f:
        if f.read(2) != b"\x1f\x8b":  # gzip's magic number; torch files start with zip's "PK"
            return path
    return io.BytesIO(gzip.decompress(path.read_bytes()))


def load_state(rnp, payload: dict, path="checkpoint") -> None:
    """Load a checkpoint's model state into rnp (half-precision weights are widened to the model's dtype)."""
    try:
        rnp.load_state_dict(payload["model"])
    except RuntimeError as e:
        raise RunError(f"{path} does not fit the model built from its config: "
                       f"{str(e).splitlines()[0][:200]}") from None


def load_run(run_dir, device="cpu", fast: bool = True, weights_only: bool = False):
    """The trained model of a run folder (whichever model it trained), in eval mode, on ``device``;
    with ``fast`` its generated programs run on the fast path (``pyro_rnp.fast.accelerate``). It reads
    ``CHECKPOINT``, or ``WEIGHTS`` where that is all the folder holds or ``weights_only`` asks."""
    from .. import fast as fast_path
    from ..model.registry import build_model
    run_dir = pathlib.Path(run_dir)
    payload = load_checkpoint(run_dir, map_location=device, weights_only=weights_only)
    try:
        model = build_model(RNPConfig.from_dict(payload["config"]))
    except ValueError as e:  # a model or component this install does not have
        raise RunError(f"{run_dir} cannot be rebuilt: {e}") from None
    load_state(model, payload, run_dir / (WEIGHTS if payload.get("weights_only") else CHECKPOINT))
    if fast:
        fast_path.accelerate(model)
    return model.to(device).eval()
