"""Datasets as image tensors, and writing files atomically: what every layer above reads and writes.

    catalog.py  the dataset names and splits
    images.py   Fashion-MNIST, MNIST and Omniglot as (N, 1, 28, 28) tensors in [0, 1]
    multi_mnist.py  50x50 scenes of 0-2 MNIST digits (AIR's benchmark), built into our cache
    atomic.py   files written so that an interruption never leaves half of one
"""
from .atomic import atomic_write, write_json
from .catalog import DATASETS, SPLITS
from .images import DataError, binarize, cache_dir, class_names, default_data_dir, load_images

__all__ = ["DATASETS", "SPLITS", "DataError", "atomic_write", "binarize", "cache_dir", "class_names", "default_data_dir",
           "load_images", "write_json"]
