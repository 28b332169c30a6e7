"""Multi-MNIST: 50x50 scenes of 0, 1 or 2 MNIST digits, the benchmark of AIR (Eslami et al., 2016).

The scenes are made by Pyro's own generator (``pyro.contrib.examples.multi_mnist.mk_dataset``,
which ships with pyro-ppl) from the MNIST files of the data root, never downloaded as
scenes and never written into the data root:

    train  60,000 scenes from MNIST's training digits, NumPy seeded with 681307, as Pyro's
           ``multi_mnist.load`` does (it has no held-out split)
    test   10,000 scenes from MNIST's test digits, seeded with TEST_SEED (our choice), so that
           held-out scenes hold digits no training scene has

Each split is built once into our cache folder, written atomically, and read from there
afterwards; the same seed gives the same scenes. The digit count and the labels of every
scene are kept. The global NumPy random state is restored after building.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .atomic import atomic_write
from .images import cache_dir, check_split, first, log, mnist_digits

CANVAS = 50
MAX_DIGITS = 2
SCENES = {"train": 60_000, "test": 10_000}
TRAIN_SEED = 681307   # Pyro's multi_mnist.load
TEST_SEED = 681308    # our choice: Pyro's generator has no held-out split


def load_scenes(split: str, data_dir=None, download: bool = False, limit: int | None = None,
                scenes: int | None = None) -> TensorDataset:
    """TensorDataset(images float32 (N, 1, 50, 50) in [0, 1], counts int64 (N,), labels int64 (N, 2)
    with -1 where a scene has fewer digits). ``scenes`` builds a split of another size (tests);
    ``limit`` keeps the first N scenes."""
    payload = scene_arrays(split, data_dir, download, scenes)
    images, counts, labels = first(limit, payload["images"], payload["counts"], payload["labels"])
    return TensorDataset(images.to(torch.float32).div_(255.0).unsqueeze(1), counts, labels)


def scene_arrays(split: str, data_dir=None, download: bool = False, scenes: int | None = None) -> dict:
    """The split as stored: {"images" uint8 (N, 50, 50), "counts" (N,), "labels" (N, 2)}, built on first use."""
    check_split(split)
    n = SCENES[split] if scenes is None else scenes
    seed = TRAIN_SEED if split == "train" else TEST_SEED
    path = cache_dir() / "multi_mnist" / f"{split}-{n}-seed{seed}-{CANVAS}px.pt"
    payload = None
    if path.is_file():
        try:
            payload = torch.load(path, weights_only=True)
        except Exception:  # corrupt or from an incompatible version: rebuild
            payload = None
    if payload is None:
        log.info(f"Multi-MNIST {split}: building {n} scenes from MNIST's {split} digits into {path}")
        payload = build_scenes(*mnist_digits(split, data_dir, download), n, seed)
        atomic_write(path, lambda tmp: torch.save(payload, tmp))
    return payload


def build_scenes(digits: torch.Tensor, labels: torch.Tensor, n: int, seed: int) -> dict:
    """n scenes from digits (M, 28, 28) uint8 with Pyro's generator under NumPy seed ``seed``:
    {"images" uint8 (n, 50, 50), "counts" (n,), "labels" (n, MAX_DIGITS) padded with -1}."""
    from pyro.contrib.examples.multi_mnist import mk_dataset

    state = np.random.get_state()
    np.random.seed(seed)
    try:
        x, y = mk_dataset(n, {"digits": digits.numpy(), "labels": labels}, MAX_DIGITS, CANVAS)
    finally:
        np.random.set_state(state)
    counts = torch.tensor([len(scene) for scene in y], dtype=torch.int64)
    padded = torch.full((n, MAX_DIGITS), -1, dtype=torch.int64)
    for i, scene in enumerate(y):
        padded[i, :len(scene)] = torch.tensor([int(label) for label in scene], dtype=torch.int64)
    return {"images": torch.from_numpy(x), "counts": counts, "labels": padded, "seed": seed}
