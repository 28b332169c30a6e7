"""The datasets pyro_rnp reads, by name, and their splits: the one place these names are written."""
from __future__ import annotations

DATASETS = ("fashion", "mnist", "omniglot", "multi-mnist")
IMAGE_SIZE = {"fashion": 28, "mnist": 28, "omniglot": 28, "multi-mnist": 50}  # side of each dataset's images
SCENE_CLASSES = ["0 digits", "1 digit", "2 digits"]  # multi-mnist's label: how many digits a scene holds
SPLITS = ("train", "test")
