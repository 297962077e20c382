"""The libraries' own log lines and warnings (MLflow, its SQL stores, Optuna, deprecations) go
to a file in the results folder, not the terminal: the terminal shows what the harness says.

`to_file(path)` is called once at the start of a command (not `check`). The file is opened at
the first line logged, its folder made then; on a full disk a line that cannot be written is
lost, never a traceback on the terminal.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

# loggers whose own handlers print to the terminal: cleared, their lines reach the file
LIBRARIES = ("mlflow", "alembic", "sqlalchemy", "optuna", "py.warnings")


class QuietFileHandler(logging.FileHandler):
    """A file handler that never raises and never prints: a line it cannot write is lost."""

    def __init__(self, path: Path):
        super().__init__(path, mode="a", encoding="utf-8", delay=True)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if self.stream is None:
                Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
            super().emit(record)
        except Exception:  # a full disk, a folder gone: the line is lost
            pass

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        pass

    def flush(self) -> None:
        with contextlib.suppress(Exception):
            super().flush()


def to_file(path: Path) -> None:
    """Every library's log lines and Python's warnings to `path` (appended), none on the
    terminal. Again in the same process: the earlier file is replaced."""
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")  # its stderr handler, at import
    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, QuietFileHandler)]:
        root.removeHandler(h)
        h.close()
    handler = QuietFileHandler(Path(path))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    for name in LIBRARIES:
        logger = logging.getLogger(name)
        for h in list(logger.handlers):  # a library's own terminal handler
            logger.removeHandler(h)
        logger.propagate = True
    logging.captureWarnings(True)
