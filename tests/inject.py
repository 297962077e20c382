"""`python tests/inject.py SITE N ARGS...`: `run_study.py ARGS` in a process whose disk is
"full" at one write site from that site's (N+1)th call on: the site raises the exception it
raises on a real full disk (torch hides ENOSPC in a RuntimeError; SQLite says "database or
disk is full"; the rest raise OSError errno 28), and every later call of it fails too, as on
a disk that stays full. Used by tests/test_envfaults.py.

Sites: journal (Optuna's journal file), mlflow (the MLflow SQLite store), checkpoint (a best-
weights file), resume (a resume state), artifact (MLflow's artifact store), report.
"""

from __future__ import annotations

import errno
import sqlite3
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _enospc(path) -> OSError:
    return OSError(errno.ENOSPC, "No space left on device", str(path))


def arm(site: str, after: int) -> None:
    calls = {"n": 0}

    def full() -> bool:
        calls["n"] += 1
        return calls["n"] > after

    if site == "journal":
        from harness.study import storage

        append = storage._JournalFile.append_logs

        def append_logs(self, logs):
            if full():
                raise _enospc(self._file_path)
            return append(self, logs)

        storage._JournalFile.append_logs = append_logs
    elif site in ("mlflow", "artifact"):
        import sqlalchemy
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        name = "log_batch" if site == "mlflow" else "log_artifact"
        original = getattr(MlflowClient, name)

        def failing(self, run_id, *args, **kwargs):
            if not full():
                return original(self, run_id, *args, **kwargs)
            if site == "artifact":
                raise _enospc(f"mlartifacts/{run_id}/artifacts/checkpoints/x.pt")
            cause = sqlite3.OperationalError("database or disk is full")
            try:
                raise sqlalchemy.exc.OperationalError("INSERT INTO metrics", {}, cause)
            except sqlalchemy.exc.OperationalError as err:
                raise MlflowException(f"(sqlite3.OperationalError) {cause}") from err

        setattr(MlflowClient, name, failing)
    elif site in ("checkpoint", "resume"):
        import torch

        from harness.infra import envfaults

        save = torch.save
        free = envfaults.free_bytes
        marker = "-best.pt" if site == "checkpoint" else "/resume/"

        def torch_save(obj, f, *args, **kwargs):
            name = str(getattr(f, "name", f))
            if marker in name and full():
                envfaults.free_bytes = lambda _folder: 4096  # what is left on that disk
                raise RuntimeError(
                    "[enforce fail at inline_container.cc:672] . unexpected pos 4480 vs 4374"
                )
            return save(obj, f, *args, **kwargs)

        torch.save = torch_save
        envfaults.free_bytes = free
    elif site == "report":
        from harness.reports import plots

        def savefig(fig, path):
            if full():
                raise _enospc(path)
            return save_fig(fig, path)

        save_fig = plots._save
        plots._save = savefig
    elif site != "none":
        raise SystemExit(f"unknown site {site}")


if __name__ == "__main__":
    arm(sys.argv[1], int(sys.argv[2]))
    from harness.cli import main

    sys.exit(main(sys.argv[3:]))
