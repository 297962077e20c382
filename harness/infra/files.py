"""Small file helpers shared by the core and the study: atomic writes.

Knows neither Optuna nor MLflow, and imports nothing of the harness.
"""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write(path: str | Path, write) -> Path:
    """`write(file)` into a temporary file beside `path`, fsync, then rename over `path` and
    fsync the folder (the rename itself is durable). Any failure, a signal's exception
    (KeyboardInterrupt, a SIGTERM handler's) included, removes the temporary file and leaves the
    previous `path` as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
