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


def scene_model_config(model: str, **overrides) -> RNPConfig:
    """A tiny AIR or DM-VAE on Multi-MNIST: the real architecture at small widths, Normal(0.3), no clamp, and
    a z_pres prior of 1/2 so that untrained models find objects."""
    values = dict(model=model, dataset="multi-mnist", max_parts=3, z_what_dim=8, air_lstm=32, air_hidden=32,
                  slots=5, slot_size=8, part_noise=4, likelihood_scale=0.3, grad_clip=0.0, z_pres_prior=0.5)
    values.update(overrides)
    return tiny_config(**values)


def train_and_check(model, step, x: torch.Tensor, steps: int) -> list[float]:
    """The losses of ``steps`` training steps on x; each must be applied, and after the first every
    parameter of ``model`` must hold a finite gradient."""
    pyro.set_rng_seed(0)
    losses = []
    for k in range(steps):
        loss, applied = step(x, k)
        assert bool(applied)
        losses.append(loss.item())
        if k == 0:
            for name, p in model.named_parameters():
                assert p.grad is not None and torch.isfinite(p.grad).all(), name
    return losses


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


@pytest.fixture(scope="session")
def mnist_images() -> torch.Tensor:
    """The first 256 MNIST training images, (256, 1, 28, 28) in [0, 1]."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not found")
    from pyro_rnp.data import load_images
    return load_images("mnist", "train", SHARED_DATA, download=False, limit=256).tensors[0]


@pytest.fixture(scope="session")
def multi_mnist_scenes():
    """A 64-scene Multi-MNIST build from MNIST's training digits (Pyro's generator): (images (64, 1, 50, 50),
    digit counts (64,), digit labels (64, 2) padded with -1)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not found")
    os.environ.setdefault("PYRO_RNP_CACHE", str(pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / "pyro_rnp_test_cache"))
    from pyro_rnp.data.multi_mnist import load_scenes
    return load_scenes("train", SHARED_DATA, scenes=64).tensors


@pytest.fixture(scope="session")
def scene_images(multi_mnist_scenes):
    """The images of multi_mnist_scenes, (64, 1, 50, 50) in [0, 1]."""
    return multi_mnist_scenes[0]
