"""The datasets pyro_rnp reads, by name, and their splits: the one place these names are written."""
from __future__ import annotations

DATASETS = ("fashion", "mnist", "omniglot")
SPLITS = ("train", "test")
