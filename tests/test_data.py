import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from pyro_rnp import data
from pyro_rnp.data import DATASETS, DataError, cache_dir, class_names, default_data_dir, load_images

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RAW_NAMES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]

needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared data not found at {SHARED_DATA}")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("PYRO_RNP_CACHE", str(cache))
    monkeypatch.delenv("PYRO_RNP_DATA", raising=False)
    return cache


def snapshot(root: Path):
    """Every path under root with its mtime (directories too, so created-then-deleted files show)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            out[p] = os.lstat(p).st_mtime_ns
    out[str(root)] = os.lstat(root).st_mtime_ns
    return out


# ----------------------------------------------------------------------------- MNIST / FashionMNIST


@needs_shared
@pytest.mark.parametrize("name, cls, first_label", [("fashion", "FashionMNIST", 9), ("mnist", "MNIST", 5)])
def test_full_torchvision_datasets(name, cls, first_label, isolated_cache):
    before = snapshot(SHARED_DATA)
    for split, n in [("train", 60000), ("test", 10000)]:
        x, y = load_images(name, split, SHARED_DATA).tensors
        assert x.shape == (n, 1, 28, 28) and x.dtype == torch.float32
        assert y.shape == (n,) and y.dtype == torch.int64
        assert x.min() == 0.0 and x.max() == 1.0
        assert 0.05 < x.mean() < 0.5  # mostly black background
        assert set(y.unique().tolist()) == set(range(10))
        if split == "train":
            assert y[0] == first_label
            assert torch.bincount(y).min() > 5000
    assert snapshot(SHARED_DATA) == before, "something was written under the shared data dir"
    # The gz files were extracted into our cache instead.
    raw = isolated_cache / "torchvision" / cls / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(RAW_NAMES)
    # Second load reuses the extraction.
    mtimes = {p: p.stat().st_mtime_ns for p in raw.iterdir()}
    x2, y2 = load_images(name, "test", SHARED_DATA).tensors
    assert x2.shape == (10000, 1, 28, 28)
    assert {p: p.stat().st_mtime_ns for p in raw.iterdir()} == mtimes


@needs_shared
def test_uncompressed_files_are_read_in_place(tmp_path, monkeypatch, isolated_cache):
    load_images("mnist", "test", SHARED_DATA)  # extract once into the first cache
    data_dir = tmp_path / "uncompressed"
    (data_dir / "MNIST" / "raw").mkdir(parents=True)
    for n in RAW_NAMES:
        (data_dir / "MNIST" / "raw" / n).symlink_to(isolated_cache / "torchvision" / "MNIST" / "raw" / n)
    before = snapshot(data_dir)
    fresh_cache = tmp_path / "fresh_cache"
    monkeypatch.setenv("PYRO_RNP_CACHE", str(fresh_cache))
    x, y = load_images("mnist", "train", data_dir, limit=3).tensors
    assert x.shape == (3, 1, 28, 28) and y.tolist() == [5, 0, 4]
    assert not (fresh_cache / "torchvision").exists(), "uncompressed files were copied into the cache"
    assert snapshot(data_dir) == before


def test_our_raw_file_names_are_torchvisions():
    for cls in (torchvision.datasets.MNIST, torchvision.datasets.FashionMNIST):
        assert sorted(data.images._TV_RAW_NAMES) == sorted(os.path.splitext(gz)[0] for gz, _ in cls.resources)


LOAD_WITHOUT_TORCHVISION = """
import sys
from pyro_rnp.data import class_names, load_images
x, y = load_images("fashion", "test", sys.argv[1]).tensors
names = class_names("fashion", "test", sys.argv[1])
assert "torchvision" not in sys.modules, "torchvision was imported"
print(x.shape[0], float(x.sum()), int(y.sum()), names[9])
"""


@needs_shared
def test_a_second_load_reads_our_cache_without_importing_torchvision(tmp_path, isolated_cache):
    """What torchvision read is kept in our cache, keyed on the raw files: the next process reads it
    without importing torchvision (that import is about 1.5 s of every command's start), gets the same
    numbers, and a raw file that changes is read again."""
    x, y = load_images("fashion", "test", SHARED_DATA).tensors
    cached = list((isolated_cache / "tensors").iterdir())
    assert len(cached) == 1 and cached[0].name.startswith("FashionMNIST-test-")
    run = [sys.executable, "-c", LOAD_WITHOUT_TORCHVISION, str(SHARED_DATA)]
    out = subprocess.run(run, capture_output=True, text=True, env=dict(os.environ), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(x.shape[0]), str(float(x.sum())), str(int(y.sum())), "Ankle", "boot"]
    assert class_names("fashion", "test", SHARED_DATA) == torchvision.datasets.FashionMNIST.classes

    # links to the same files share the entry; a file written anew (same bytes, new time) is read again
    copy = tmp_path / "copy" / "FashionMNIST" / "raw"
    copy.mkdir(parents=True)
    for f in (SHARED_DATA / "FashionMNIST" / "raw").iterdir():
        (copy / f.name).symlink_to(f)
    load_images("fashion", "test", copy.parents[1])
    assert len(list((isolated_cache / "tensors").iterdir())) == 1
    target = copy / "t10k-images-idx3-ubyte.gz"
    target.unlink()
    shutil.copy(SHARED_DATA / "FashionMNIST" / "raw" / target.name, target)
    x2, _ = load_images("fashion", "test", copy.parents[1]).tensors
    assert len(list((isolated_cache / "tensors").iterdir())) == 2
    assert torch.equal(x2, x)

    # a corrupt cache file is read past: the raw files are read again
    cached[0].write_bytes(b"not a tensor file")
    x3, _ = load_images("fashion", "test", SHARED_DATA).tensors
    assert torch.equal(x3, x)


@needs_shared
def test_limit_and_exclude_classes():
    full_x, full_y = load_images("mnist", "test", SHARED_DATA).tensors
    x, y = load_images("mnist", "test", SHARED_DATA, limit=500, exclude_classes=[7]).tensors
    assert len(x) == len(y) == 500
    assert 7 not in y.tolist()
    keep = full_y != 7
    assert torch.equal(y, full_y[keep][:500])
    assert torch.equal(x, full_x[keep][:500])
    x, y = load_images("fashion", "test", SHARED_DATA, exclude_classes=(0, 9)).tensors
    assert len(y) == 8000 and set(y.tolist()) == set(range(1, 9))
    assert len(load_images("fashion", "test", SHARED_DATA, limit=0)) == 0


@needs_shared
def test_data_dir_defaults_to_env(monkeypatch):
    monkeypatch.setenv("PYRO_RNP_DATA", str(SHARED_DATA))
    x, y = load_images("fashion", "train", limit=2).tensors
    assert x.shape == (2, 1, 28, 28) and y[0] == 9


def test_missing_torchvision_data(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as err:
        load_images("mnist", "train", empty, download=False)
    msg = str(err.value)
    assert str(empty / "MNIST" / "raw") in msg
    for n in RAW_NAMES:
        assert n in msg
    assert "--data-dir" in msg and "PYRO_RNP_DATA" in msg and "--no-download" in msg
    assert "Download failed" not in msg
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_failed_download_is_reported(tmp_path, monkeypatch):
    def offline(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: no network here")

    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "download", offline)
    with pytest.raises(DataError) as err:
        load_images("fashion", "test", tmp_path, download=True)
    msg = str(err.value)
    assert "Download failed: RuntimeError: Error downloading" in msg and "no network here" in msg
    assert str(tmp_path / "FashionMNIST" / "raw") in msg and "--data-dir" in msg


def test_corrupt_gz_is_rejected(tmp_path, isolated_cache):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for n in RAW_NAMES:
        (raw / (n + ".gz")).write_bytes(b"not really gzip")
    with pytest.raises(DataError, match="corrupt"):
        load_images("mnist", "test", tmp_path)
    assert not list((isolated_cache / "torchvision").rglob("*ubyte"))


def test_unknown_name_and_split():
    with pytest.raises(DataError) as err:
        load_images("cifar", "train")
    for name in DATASETS:
        assert name in str(err.value)
    assert "cifar" in str(err.value)
    with pytest.raises(DataError, match="train"):
        load_images("mnist", "validation")
    with pytest.raises(DataError, match="omniglot"):
        class_names("nope")


def test_class_names_torchvision():
    assert class_names("fashion")[9] == "Ankle boot"
    assert class_names("fashion")[0] == "T-shirt/top"
    assert len(class_names("mnist")) == 10


# ----------------------------------------------------------------------------- Omniglot


def make_tiny_omniglot(root: Path, chars_per_alphabet=2, images_per_char=3, alphabets=("Greek", "Latin")):
    """Copy a few real PNGs into root/omniglot-py/images_background/<alphabet>/<character>/."""
    src = SHARED_DATA / "omniglot-py" / "images_background"
    for alphabet in alphabets:
        for char in sorted(os.listdir(src / alphabet))[:chars_per_alphabet]:
            dest = root / "omniglot-py" / "images_background" / alphabet / char
            dest.mkdir(parents=True)
            for png in sorted(os.listdir(src / alphabet / char))[:images_per_char]:
                shutil.copy(src / alphabet / char / png, dest / png)
    return root


@needs_shared
def test_omniglot_tiny_copy_and_cache(tmp_path, monkeypatch, isolated_cache):
    root = make_tiny_omniglot(tmp_path / "omni")
    x, y = load_images("omniglot", "train", root).tensors
    assert x.shape == (12, 1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert x.mean() < 0.3  # black background ...
    assert (x.amax(dim=(1, 2, 3)) > 0.5).all()  # ... with white strokes
    assert x[:, :, 0, 0].max() < 0.1  # corners are background
    assert class_names("omniglot", "train", root) == [
        "Greek/character01",
        "Greek/character02",
        "Latin/character01",
        "Latin/character02",
    ]
    cached = list((isolated_cache / "omniglot").glob("train-28-*.pt"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns

    # Second call must come from the cache, without opening any PNG.
    import PIL.Image

    def no_open(*args, **kwargs):
        raise AssertionError("PNG opened although a cache exists")

    monkeypatch.setattr(PIL.Image, "open", no_open)
    x2, y2 = load_images("omniglot", "train", root, limit=5, exclude_classes=[0]).tensors
    assert torch.equal(x2, x[3:8]) and y2.tolist() == [1, 1, 1, 2, 2]
    assert cached[0].stat().st_mtime_ns == mtime
    monkeypatch.undo()

    # A different data_dir must not reuse that cache.
    monkeypatch.setenv("PYRO_RNP_CACHE", str(isolated_cache))
    other = make_tiny_omniglot(tmp_path / "other", chars_per_alphabet=1, images_per_char=2, alphabets=("Korean",))
    x3, y3 = load_images("omniglot", "train", other).tensors
    assert x3.shape == (2, 1, 28, 28) and y3.tolist() == [0, 0]
    assert len(list((isolated_cache / "omniglot").glob("train-28-*.pt"))) == 2


@needs_shared
def test_omniglot_matches_antialiased_resize(tmp_path):
    from PIL import Image

    root = make_tiny_omniglot(tmp_path / "omni", chars_per_alphabet=1, images_per_char=1, alphabets=("Greek",))
    x, _ = load_images("omniglot", "train", root).tensors
    png = next((root / "omniglot-py" / "images_background").rglob("*.png"))
    with Image.open(png) as img:
        big = 1.0 - torch.from_numpy(np.asarray(img.convert("L"), dtype=np.float32)).view(1, 1, 105, 105) / 255
    ref = torch.nn.functional.interpolate(big, size=(28, 28), mode="bilinear", antialias=True)
    assert (x[0] - ref[0]).abs().max() < 0.02


def test_missing_omniglot(tmp_path, monkeypatch):
    with pytest.raises(DataError) as err:
        load_images("omniglot", "test", tmp_path)
    msg = str(err.value)
    assert str(tmp_path) in msg and "omniglot-py/images_evaluation" in msg
    assert "--data-dir" in msg and "PYRO_RNP_DATA" in msg

    def offline(self):
        raise RuntimeError("no network here")

    monkeypatch.setattr(torchvision.datasets.Omniglot, "download", offline)
    with pytest.raises(DataError) as err:
        load_images("omniglot", "train", tmp_path, download=True)
    msg = str(err.value)
    assert "omniglot-py/images_background" in msg and "Download failed: RuntimeError: no network here" in msg
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


# ----------------------------------------------------------------------------- folders


def test_default_data_dir_and_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PYRO_RNP_DATA", str(tmp_path / "d"))
    assert default_data_dir() == tmp_path / "d"
    monkeypatch.delenv("PYRO_RNP_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_data_dir() == tmp_path / "xdg" / "pyro_rnp" / "data"
    monkeypatch.delenv("PYRO_RNP_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "pyro_rnp"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_data_dir() == tmp_path / "home" / ".cache" / "pyro_rnp" / "data"
    assert cache_dir() == tmp_path / "home" / ".cache" / "pyro_rnp"
    monkeypatch.setenv("PYRO_RNP_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"


def test_atomic_write_leaves_no_temp_on_failure(tmp_path):
    dest = tmp_path / "x" / "f.pt"

    def boom(tmp):
        Path(tmp).write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        data.atomic_write(dest, boom)
    assert list(dest.parent.iterdir()) == []
    data.atomic_write(dest, lambda tmp: Path(tmp).write_bytes(b"ok"))
    assert dest.read_bytes() == b"ok" and [p.name for p in dest.parent.iterdir()] == ["f.pt"]


def test_multi_mnist_scenes_are_built_once_the_same_way_and_keep_counts_and_labels(tmp_path, monkeypatch):
    """Scenes of 0-2 digits from the data root's MNIST files, built into our cache (not the data root), the
    same for the same seed, with the global NumPy state left as it was."""
    import numpy as np

    from pyro_rnp.data.multi_mnist import TEST_SEED, TRAIN_SEED, load_scenes
    monkeypatch.setenv("PYRO_RNP_CACHE", str(tmp_path / "cache"))
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    train = load_scenes("train", SHARED_DATA, scenes=60)
    assert np.array_equal(np.random.get_state()[1], before)
    images, counts, labels = train.tensors
    assert images.shape == (60, 1, 50, 50) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1 and set(counts.tolist()) <= {0, 1, 2}
    assert torch.equal((labels >= 0).sum(1), counts) and labels.max() <= 9
    assert ((images.flatten(1).sum(1) > 0) == (counts > 0)).all()  # an empty scene is black, a digit is not
    built = list((tmp_path / "cache" / "multi_mnist").glob("*.pt"))
    assert [p.name for p in built] == [f"train-60-seed{TRAIN_SEED}-50px.pt"]
    # read back from the cache (the data root is not needed any more), and the same again when rebuilt
    again = load_scenes("train", tmp_path / "no-data", download=False, scenes=60, limit=10)
    assert torch.equal(again.tensors[0], images[:10])
    built[0].unlink()
    assert torch.equal(load_scenes("train", SHARED_DATA, scenes=60).tensors[0], images)
    test = load_scenes("test", SHARED_DATA, scenes=60)
    assert not torch.equal(test.tensors[0], images)
    assert (tmp_path / "cache" / "multi_mnist" / f"test-60-seed{TEST_SEED}-50px.pt").is_file()
