"""Writing files so that an interruption never leaves a half-written one behind."""
from __future__ import annotations

import os
import pathlib
import uuid


def atomic_write(dest: pathlib.Path, write) -> None:
    """Call write(tmp_path), then rename over dest so readers never see a partial file."""
    dest = pathlib.Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # a unique name in the same folder, so that os.replace is atomic
    tmp = dest.parent / f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        write(tmp)
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_json(dest: pathlib.Path, record) -> pathlib.Path:
    """Write ``record`` as indented JSON to ``dest``, atomically; returns ``dest``."""
    import json
    dest = pathlib.Path(dest)
    atomic_write(dest, lambda p: p.write_text(json.dumps(record, indent=2) + "\n"))
    return dest
