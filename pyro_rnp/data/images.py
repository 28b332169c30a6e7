"""Image datasets (Fashion-MNIST, MNIST, Omniglot) as 28x28 tensors in [0, 1].

The data folder is treated as read-only (it may be shared): anything we extract
or convert goes to ``cache_dir()``, written to a temp file and renamed so that
concurrent runs never see half-written files.

MNIST and Fashion-MNIST are read by torchvision once per split; what it read is kept
in our cache, keyed on the raw files (path, size, modification time), and later loads
read that instead, without importing torchvision (about 1.5 s of every command's start).
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import pathlib
import shutil

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .atomic import atomic_write as _atomic_write
from .catalog import DATASETS, SCENE_CLASSES, SPLITS

log = logging.getLogger("pyro_rnp.data")
_announced: set = set()


def _say_which_copy(what: str, data_dir: pathlib.Path, copy: pathlib.Path) -> None:
    """One line, once per process, when the data comes from our cache rather than the data folder."""
    if (what, str(copy)) not in _announced:
        _announced.add((what, str(copy)))
        log.info(f"{what}: not in {data_dir}; using the verified copy in {copy}")


_TV_CLASSES = {"fashion": "FashionMNIST", "mnist": "MNIST"}
# the raw files of both, as torchvision names them (a test holds this to torchvision's resources)
_TV_RAW_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte")
_OMNIGLOT_FOLDERS = {"train": "images_background", "test": "images_evaluation"}
_OMNIGLOT_SIZE = 28
_FIX_HINT = (
    "Fix: pass --data-dir DIR or set PYRO_RNP_DATA to a folder holding {layout}, "
    "or allow downloading (drop --no-download) when online."
)


class DataError(Exception):
    """A user-facing problem with the data (missing files, unknown name); str(e) is the whole message to print."""


def _xdg_cache() -> pathlib.Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    return pathlib.Path(xdg) if xdg else pathlib.Path.home() / ".cache"


def default_data_dir() -> pathlib.Path:
    """$PYRO_RNP_DATA if set, else a per-user cache folder: $XDG_CACHE_HOME/pyro_rnp/data or ~/.cache/pyro_rnp/data."""
    env = os.environ.get("PYRO_RNP_DATA")
    if env:
        return pathlib.Path(env).expanduser()
    return _xdg_cache() / "pyro_rnp" / "data"


def cache_dir() -> pathlib.Path:
    """Where we write extracted/converted data: $PYRO_RNP_CACHE if set, else $XDG_CACHE_HOME/pyro_rnp or ~/.cache/pyro_rnp."""
    env = os.environ.get("PYRO_RNP_CACHE")
    if env:
        return pathlib.Path(env).expanduser()
    return _xdg_cache() / "pyro_rnp"


def _check_name(name: str) -> str:
    if name not in DATASETS:
        raise DataError(f"Unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}.")
    return name


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise DataError(f"Unknown split {split!r}; choose one of: {', '.join(SPLITS)}.")
    return split


def _resolve_data_dir(data_dir) -> pathlib.Path:
    return default_data_dir() if data_dir is None else pathlib.Path(data_dir).expanduser()


def _short_error(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _missing_message(what: str, searched: pathlib.Path, expected, layout: str, download_error=None) -> str:
    lines = [f"{what} not found: searched {searched} for {', '.join(expected)}."]
    if download_error is not None:
        lines.append(f"Download failed: {_short_error(download_error)}")
    lines.append(_FIX_HINT.format(layout=layout))
    return "\n".join(lines)


# --------------------------------------------------------------------------- MNIST / FashionMNIST


def _tv_class(name: str):
    import torchvision  # imported when data is read: importing pyro_rnp.data stays cheap
    return getattr(torchvision.datasets, _TV_CLASSES[name])


def _extract_gz_to_cache(cls, src_raw: pathlib.Path) -> pathlib.Path:
    """Extract md5-verified gz files into our cache, since torchvision would extract next to them."""
    from torchvision.datasets.utils import check_integrity

    root = cache_dir() / "torchvision"
    dest_raw = root / cls.__name__ / "raw"
    for gz_name, md5 in cls.resources:
        dest = dest_raw / os.path.splitext(gz_name)[0]
        if dest.is_file():
            continue
        src = src_raw / gz_name
        if not check_integrity(str(src), md5):
            raise DataError(
                f"{src} is corrupt (md5 differs from torchvision's {md5}). "
                "Replace it with the original file, or remove it and allow downloading."
            )

        def write(tmp, src=src):
            with gzip.open(src, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)

        _atomic_write(dest, write)
    return root


def _raw_files(name: str, data_dir: pathlib.Path) -> tuple[str, list[pathlib.Path]] | None:
    """The raw files torchvision will read, in the first form found: ("in place", data_dir's
    uncompressed files), ("gz", data_dir's gz files, which we extract) or ("extracted", our copy);
    None when no form is complete."""
    folder = _TV_CLASSES[name]
    forms = [("in place", [data_dir / folder / "raw" / n for n in _TV_RAW_NAMES]),
             ("gz", [data_dir / folder / "raw" / (n + ".gz") for n in _TV_RAW_NAMES]),
             ("extracted", [cache_dir() / "torchvision" / folder / "raw" / n for n in _TV_RAW_NAMES])]
    return next(((form, files) for form, files in forms if all(f.is_file() for f in files)), None)


def _torchvision_root(name: str, data_dir: pathlib.Path, download: bool) -> pathlib.Path:
    """A root that torchvision can read with download=False, without writing into data_dir."""
    cls = _tv_class(name)
    src_raw = data_dir / cls.__name__ / "raw"
    cache_root = cache_dir() / "torchvision"
    form, _ = _raw_files(name, data_dir) or (None, None)
    if form == "in place":
        return data_dir
    if form == "gz":
        return _extract_gz_to_cache(cls, src_raw)
    if form == "extracted":
        _say_which_copy(cls.__name__, data_dir, cache_root / cls.__name__)
        return cache_root
    error = None
    if download:
        try:
            cls(root=str(cache_root), train=True, download=True)
            return cache_root
        except Exception as exc:  # offline, mirror down, md5 mismatch...
            error = exc
    raise DataError(
        _missing_message(
            f"{cls.__name__} data",
            src_raw,
            _TV_RAW_NAMES,
            f"{cls.__name__}/raw/ (those files, or the same names with .gz)",
            error,
        )
    )


def _tensor_cache(name: str, split: str, data_dir: pathlib.Path) -> pathlib.Path | None:
    """Where what torchvision read of ``split`` is kept, keyed on the raw files it reads
    (``_raw_files``); None when none are on disk yet."""
    found = _raw_files(name, data_dir)
    if found is None:
        return None
    digest = hashlib.sha1()
    for f in found[1]:
        stat = f.stat()
        digest.update(f"{f.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return cache_dir() / "tensors" / f"{_TV_CLASSES[name]}-{split}-{digest.hexdigest()[:12]}.pt"


def _read_tensor_cache(path: pathlib.Path | None) -> dict | None:
    if path is None or not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception:  # corrupt, or written by an incompatible version: read the raw files again
        return None


def _torchvision_split(name: str, split: str, data_dir: pathlib.Path, download: bool) -> dict:
    """{"data": uint8 (N, 28, 28), "targets": int64 (N,), "classes": [str]}, as torchvision reads them."""
    saved = _read_tensor_cache(_tensor_cache(name, split, data_dir))
    if saved is not None:
        return saved
    cls = _tv_class(name)
    root = _torchvision_root(name, data_dir, download)
    try:
        ds = cls(root=str(root), train=(split == "train"), download=False)
    except RuntimeError as exc:  # unreadable or truncated files
        raise DataError(f"Could not read {cls.__name__} from {root}: {_short_error(exc)}") from exc
    payload = {"data": ds.data, "targets": ds.targets.long(), "classes": list(ds.classes)}
    cache = _tensor_cache(name, split, data_dir)  # the files exist now (extracted or downloaded)
    if cache is not None:
        _atomic_write(cache, lambda tmp: torch.save(payload, tmp))
    return payload


def _load_torchvision(name, split, data_dir, download):
    saved = _torchvision_split(name, split, data_dir, download)
    return saved["data"], saved["targets"]


# --------------------------------------------------------------------------- Omniglot


def _omniglot_characters(folder: pathlib.Path) -> list[str]:
    return sorted(
        f"{a.name}/{c.name}"
        for a in folder.iterdir()
        if a.is_dir()
        for c in a.iterdir()
        if c.is_dir()
    )


def _omniglot_folder(split: str, data_dir: pathlib.Path, download: bool) -> pathlib.Path:
    sub = pathlib.Path("omniglot-py") / _OMNIGLOT_FOLDERS[split]
    searched = data_dir / sub
    if searched.is_dir():
        return searched
    cache_root = cache_dir() / "torchvision"
    if (cache_root / sub).is_dir():
        _say_which_copy(f"Omniglot {split}", data_dir, cache_root / sub)
        return cache_root / sub
    error = None
    if download:
        try:
            import torchvision
            torchvision.datasets.Omniglot(root=str(cache_root), background=(split == "train"), download=True)
            if (cache_root / sub).is_dir():
                return cache_root / sub
            error = RuntimeError(f"download did not produce {cache_root / sub}")
        except Exception as exc:
            error = exc
    raise DataError(
        _missing_message(
            "Omniglot data",
            data_dir,
            [f"{sub}/<alphabet>/<character>/*.png"],
            "omniglot-py/images_background/ and omniglot-py/images_evaluation/",
            error,
        )
    )


def _convert_omniglot(folder: pathlib.Path, files: list[str], desc: str) -> torch.Tensor:
    from PIL import Image
    from tqdm import tqdm

    size = (_OMNIGLOT_SIZE, _OMNIGLOT_SIZE)
    out = np.empty((len(files), *size), dtype=np.uint8)
    for i, rel in enumerate(tqdm(files, desc=desc, unit="img", disable=None, leave=False)):
        with Image.open(folder / rel) as img:
            # PIL's BILINEAR widens its filter when shrinking, i.e. it antialiases.
            out[i] = np.asarray(img.convert("L").resize(size, Image.BILINEAR))
    return torch.from_numpy(255 - out).unsqueeze(1)  # strokes white on black, like MNIST


def _load_omniglot(split, data_dir, download):
    folder = _omniglot_folder(split, data_dir, download)
    characters = _omniglot_characters(folder)
    files, labels = [], []
    for label, char in enumerate(characters):
        pngs = sorted(p.name for p in (folder / char).iterdir() if p.suffix.lower() == ".png")
        files += [f"{char}/{p}" for p in pngs]
        labels += [label] * len(pngs)
    if not files:
        raise DataError(
            _missing_message(
                "Omniglot images", folder, ["<alphabet>/<character>/*.png"], "omniglot-py/images_*/..."
            )
        )
    # Key on the folder and its file list so another data_dir never reuses a wrong cache.
    digest = hashlib.sha1(str(folder.resolve()).encode())
    digest.update("\n".join(files).encode())
    cache = cache_dir() / "omniglot" / f"{split}-{_OMNIGLOT_SIZE}-{digest.hexdigest()[:12]}.pt"
    if cache.is_file():
        try:
            saved = torch.load(cache, weights_only=True)
            return saved["images"], saved["labels"]
        except Exception:  # corrupt or from an incompatible version: rebuild
            pass
    images = _convert_omniglot(folder, files, f"omniglot {split}: converting PNGs")
    labels = torch.tensor(labels, dtype=torch.int64)
    payload = {"images": images, "labels": labels, "characters": characters}
    _atomic_write(cache, lambda tmp: torch.save(payload, tmp))
    return images, labels


# --------------------------------------------------------------------------- public API


def load_images(
    name: str,
    split: str,
    data_dir=None,
    download: bool = False,
    limit: int | None = None,
    exclude_classes=(),
) -> TensorDataset:
    """Returns TensorDataset(images, labels): images float32 (N, 1, 28, 28) in [0, 1]
    (strokes white on black, as MNIST), labels int64 (N,).

    For multi-mnist the images are (N, 1, 50, 50) scenes and the label is the number of
    digits in each (multi_mnist.py; ``load_scenes`` also gives the digits' labels).

    For omniglot, train = images_background and test = images_evaluation, and the
    label is the character's index within that split (sorted alphabet/character).
    exclude_classes is applied before limit (keep the first `limit` images).
    Raises DataError for an unknown name or split, and for missing data.
    """
    _check_name(name)
    check_split(split)
    data_dir = _resolve_data_dir(data_dir)
    if name == "multi-mnist":
        from .multi_mnist import scene_arrays
        scenes = scene_arrays(split, data_dir, download)
        images, labels = scenes["images"].unsqueeze(1), scenes["counts"]
    elif name == "omniglot":
        images, labels = _load_omniglot(split, data_dir, download)
    else:
        images, labels = _load_torchvision(name, split, data_dir, download)
        images = images.unsqueeze(1)
    excluded = list(exclude_classes)
    if excluded:
        keep = ~torch.isin(labels, torch.tensor(excluded, dtype=labels.dtype))
        images, labels = images[keep], labels[keep]
    images, labels = first(limit, images, labels)
    # Convert after filtering: uint8 is 4x smaller to index.
    return TensorDataset(images.to(torch.float32).div_(255.0), labels.to(torch.int64))


def binarize(images: torch.Tensor, seed: int, epoch: int | None = None) -> torch.Tensor:
    """Dynamic binarisation: images (N, ...) of grey levels in [0, 1] -> each pixel 1 with probability
    its grey level, else 0, in the images' dtype and device.

    The draw is a function of (seed, epoch) alone, a fresh one for every training epoch; ``epoch``
    None is the held-out images' draw, one fixed set for every command on a run. It is drawn on
    the CPU in image order, so the first M images of a longer tensor are binarised as those M alone
    (a held-out ``--limit`` changes which images, never how they were binarised)."""
    stream = [seed, 1] if epoch is None else [seed, 0, epoch]
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence(stream).generate_state(1)[0]))
    draws = torch.rand(images.shape, generator=generator)
    return (draws < images.detach().cpu().float()).to(device=images.device, dtype=images.dtype)


def first(limit: int | None, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The first ``limit`` rows of each tensor (all of them for None)."""
    if limit is None:
        return tensors
    if limit < 0:
        raise DataError(f"limit must be >= 0, got {limit}.")
    return tuple(t[:limit] for t in tensors)


def mnist_digits(split: str, data_dir=None, download: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST's ``split`` as torchvision holds it: digits uint8 (N, 28, 28) and labels int64 (N,)."""
    check_split(split)
    return _load_torchvision("mnist", split, _resolve_data_dir(data_dir), download)


def class_names(name: str, split: str = "test", data_dir=None) -> list[str]:
    """Names indexed by label: torchvision's class names, or "Alphabet/characterNN" for omniglot's split."""
    _check_name(name)
    check_split(split)
    if name == "multi-mnist":
        return list(SCENE_CLASSES)
    if name != "omniglot":
        saved = _read_tensor_cache(_tensor_cache(name, split, _resolve_data_dir(data_dir)))
        return list(saved["classes"] if saved is not None else _tv_class(name).classes)
    return _omniglot_characters(_omniglot_folder(split, _resolve_data_dir(data_dir), download=False))
