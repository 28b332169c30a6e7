"""Shared fixtures: tiny but genuine models, and a few hundred real images from ../shared/data."""
from __future__ import annotations

import os
import pathlib

import pyro
import pytest
import torch

from pyro_rnp import RNPConfig

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def tiny_config(**overrides) -> RNPConfig:
    """The real architecture at small widths: runs a training step in milliseconds."""
    values = dict(z_dim=8, hidden=16, embed=8, action_hidden=8, steps=3, depth=2, encoder_blocks=1,
                  encoder_hidden=16, batch_size=16, lr=1e-3, lr_warmup_steps=0)
    values.update(overrides)
    return RNPConfig(**values)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path_factory):
    """Fresh Pyro state, an isolated cache, and the shared data as the default data root."""
    pyro.clear_param_store()
    pyro.enable_validation(True)
    monkeypatch.setenv("PYRO_RNP_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("PYRO_RNP_DATA", str(SHARED_DATA))
    torch.manual_seed(0)
    yield
    pyro.enable_validation(False)


@pytest.fixture(scope="session")
def fashion_images() -> torch.Tensor:
    """The first 256 Fashion-MNIST training images, (256, 1, 28, 28) in [0, 1]."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not found")
    os.environ.setdefault("PYRO_RNP_CACHE", str(pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / "pyro_rnp_test_cache"))
    from pyro_rnp.data import load_images
    return load_images("fashion", "train", SHARED_DATA, download=False, limit=256).tensors[0]
