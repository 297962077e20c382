"""Optuna's storages, as the study opens them: a journal file (safe for several local
processes) or an RDB URL, each call retried while the store is away (`harness.infra.envfaults`), the
RDB's connections checked before use and renewed, and a journal whose appends leave no
partial record on a full disk. Used by `harness.study.search`.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import optuna
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.storages.journal._file import get_lock_file

from harness.config.spec import SpecError
from harness.infra import envfaults
from harness.study.recovery import requeue
from harness.tracking import store as tracking

# Every call of the storage is retried while the store is away (envfaults.retrying); the
# private ones are those Optuna's cache in front of an RDB storage calls.
_STORAGE_CALLS = (
    *(n for n in dir(optuna.storages.BaseStorage) if not n.startswith("_")),
    "_create_new_trial",
    "_get_best_trial_id",
    "_get_stale_trial_ids",
    "_get_trials",
    "_set_trial_param",
)


def _finished_already(err: Exception) -> bool:
    """A retried `tell` whose first attempt had been committed before its connection dropped."""
    return isinstance(err, optuna.exceptions.UpdateFinishedTrialError | RuntimeError) and (
        "already finished" in str(err) or "has already" in str(err)
    )


def _quiet_heartbeat(beat):
    """A heartbeat that a store outage skips (the next one, 30 s later, tries again) instead of
    ending Optuna's heartbeat thread with a traceback."""

    def record(*args, **kwargs):
        with contextlib.suppress(Exception):
            beat(*args, **kwargs)

    return record


class _JournalFile(JournalFileBackend):
    """Optuna's journal file, whose append on a full disk leaves no partial record behind: a
    later append would glue its record to it, and the journal would no longer load."""

    def __init__(self, path: str):
        super().__init__(path)
        with get_lock_file(self._lock), open(path, "rb+") as f:  # a crash's partial record
            f.seek(0, os.SEEK_END)
            end = f.tell()
            if end:
                f.seek(max(0, end - 1))
                if f.read(1) != b"\n":
                    f.seek(0)
                    data = f.read()
                    f.truncate(data.rfind(b"\n") + 1)

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        data = ("\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n").encode()
        with get_lock_file(self._lock):
            fd = os.open(self._file_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                start = os.lseek(fd, 0, os.SEEK_END)
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                    os.fsync(fd)
                except OSError:
                    os.ftruncate(fd, start)
                    raise
            finally:
                os.close(fd)


HEARTBEAT_GRACE = 120.0  # seconds without a heartbeat before a trial's node is taken for dead


def open_storage(url: str, grace: float | None = None) -> optuna.storages.BaseStorage:
    """`*.journal`: an Optuna journal file (safe for several local processes); else an RDB URL.
    Either way every call is retried while the store is away, for --retry-window. `grace`
    (--heartbeat-grace, default `HEARTBEAT_GRACE`): an RDB storage's heartbeat grace."""
    if "://" in url:
        # Optuna's own heartbeat (every 30 s, or a quarter of a shorter grace): a trial whose
        # process stops beating for `grace` seconds is failed by the next process that starts
        # a trial (or `reconcile`), and re-queued like the harness's own.
        # pool_pre_ping: a connection dropped while a long trial trained (a database restart,
        # a pooler's or a network's idle timeout) is replaced, not handed to the next call;
        # pool_recycle renews connections before common idle timeouts (5 min and up).
        store = f"the Optuna storage {tracking.redact(url)}"
        grace = HEARTBEAT_GRACE if grace is None else grace
        storage = envfaults.retrying(optuna.storages.RDBStorage, store)(
            url,
            engine_kwargs={"pool_pre_ping": True, "pool_recycle": 240},
            heartbeat_interval=max(1, min(30, int(grace / 4))),
            grace_period=max(1, int(grace)),
            heartbeat_stale_trial_callback=requeue,
        )
        storage.record_heartbeat = _quiet_heartbeat(storage.record_heartbeat)
        return envfaults.wrap_methods(storage, _STORAGE_CALLS, store, False, _finished_already)
    if url.endswith(".journal"):
        Path(url).parent.mkdir(parents=True, exist_ok=True)
        Path(url).touch()
        store, folder = f"the Optuna journal {url}", Path(url).parent
        backend = envfaults.retrying(_JournalFile, store, folder=folder)(url)
        storage = JournalStorage(backend)
        names = [n for n in dir(optuna.storages.BaseStorage) if not n.startswith("_")]
        return envfaults.wrap_methods(storage, names, store, folder=folder)
    raise SpecError(
        f"--storage {url}: give a file ending in .journal or a URL such as postgresql://..."
    )
