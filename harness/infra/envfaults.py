"""Faults of the environment, not of a trial: a store unreachable (a database restarting, a
tracking server down, a dropped connection) or a disk full. The one home that decides which
errors those are (`classify`), retries a store's transient errors for a window (`retrying`,
`--retry-window`, default 5 minutes) and turns a lasting one, or the first full disk, into
`EnvironmentStop`: the worker starts no new trial, leaves the running one as after SIGTERM
(resume state kept, run KILLED with `harness.fault`, trial re-queued) and exits 75
(EX_TEMPFAIL), so that the same command, run again, goes on.

Knows no Optuna or MLflow: it classifies their exceptions by type name, message and cause chain.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import random
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

EXIT_TEMPFAIL = 75  # sysexits.h: a temporary failure; batch schedulers can requeue on it
LOW_SPACE = 64 * 2**20  # a write error with less than this free is taken for a full disk
_DISK_TEXT = ("database or disk is full", "no space left on device", "disk quota exceeded")
# what store errors say when the other end is away (PostgreSQL, HTTP, sockets)
_AWAY_TEXT = (
    "connection refused",
    "could not connect",
    "connection reset",
    "connection aborted",
    "server closed the connection",
    "terminating connection",
    "the database system is",  # starting up, shutting down, in recovery mode
    "max retries exceeded",
    "failed to establish a new connection",
    "remote end closed connection",
    "timed out",
    "temporarily unavailable",
    "temporarily_unavailable",
    "database is locked",  # SQLite: another process holds the lock for longer than its timeout
    "ssl syscall error",
    "connection is closed",
    "connection already closed",
)
# what a store that answers says of a wrong URL or login: waiting does not mend those
_WRONG_TEXT = (
    "does not exist",
    "password authentication failed",
    "no password supplied",
    "no pg_hba.conf entry",
    "permission denied",
    "invalid dsn",
    "you are not authenticated",  # an MLflow server's login refused (401)
)
LOGIN_REFUSED = (401, 403)  # a tracking server's answer to a wrong login: never retried
_AWAY_TYPES = {  # (module prefix, class name): errors of a connection, not of a request
    ("psycopg", "OperationalError"),
    ("psycopg", "InterfaceError"),
    ("psycopg2", "OperationalError"),
    ("psycopg2", "InterfaceError"),
    ("sqlalchemy", "DisconnectionError"),
    ("requests", "ConnectionError"),
    ("requests", "Timeout"),
    ("requests", "ChunkedEncodingError"),
    ("urllib3", "ProtocolError"),
    ("urllib3", "NewConnectionError"),
    ("urllib3", "MaxRetryError"),
}


@dataclass(frozen=True)
class Fault:
    kind: str  # "disk_full" or "store"
    where: str  # the folder written to, or the store (its URL without password)
    detail: str  # the error, one line


class EnvironmentStop(KeyboardInterrupt):
    """The worker stops cleanly: not an `Exception`, so that neither Optuna's `catch` nor a
    trial's fault handling takes it for the trial's failure."""

    def __init__(self, fault: Fault, waited: float = 0.0, text: str = ""):
        super().__init__(fault.detail)
        self.fault, self.waited, self.text = fault, waited, text

    @classmethod
    def of_workers(cls, codes: list[int], logs: Path) -> EnvironmentStop:
        """The spawner's stop when a worker stopped for the environment: its message, read
        back from the worker's log, and the exit codes."""
        lines: list[str] = []
        for i, code in enumerate(codes):
            log = logs / f"worker-{i}.log"
            if code == EXIT_TEMPFAIL and log.is_file() and not lines:
                tail = log.read_text(errors="replace").splitlines()
                start = max((n for n, t in enumerate(tail) if t.startswith("Stopped:")), default=-1)
                lines = tail[start:] if start >= 0 else []
        text = "\n".join(
            [*lines[:12], f"Worker exit codes {codes}; their logs: {logs}"]
            if lines
            else [
                f"Stopped: a worker stopped for the environment (exit {EXIT_TEMPFAIL}); "
                f"exit codes {codes}; see {logs}",
                "Run the same command again to go on.",
            ]
        )
        return cls(Fault("workers", str(logs), f"exit codes {codes}"), text=text)

    def message(self) -> str:
        if self.text:
            return self.text
        f = self.fault
        if f.kind == "disk_full":
            head = (
                f"Stopped: the disk of {f.where} is full ({human(free_bytes(Path(f.where)))} "
                f"free): {f.detail}"
            )
            how = "Free space there, then run the same command again to go on."
        else:
            head = (
                f"Stopped: {f.where} was unreachable for {self.waited:.0f} s "
                f"(--retry-window {settings.window:g}): {f.detail}"
            )
            how = "When it is reachable again, run the same command again to go on."
        lines = [head[:600]]
        lines += [
            "No trial failed for good: an interrupted trial is re-queued and resumes from its "
            "last saved epoch; the finished trials and their runs are kept.",
            how,
        ]
        return "\n".join(lines)


class _Settings:
    window: float = 300.0  # seconds a store may be unreachable before the worker stops
    quiet: bool = False


settings = _Settings()


def configure(window: float | None = None, quiet: bool | None = None) -> None:
    if window is not None:
        settings.window = float(window)
    if quiet is not None:
        settings.quiet = bool(quiet)


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def free_bytes(folder: Path) -> int:
    """Free bytes of the filesystem holding `folder` (or its nearest existing parent)."""
    p = Path(folder).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def chain(err: BaseException):
    """`err` and the exceptions it was raised from or while handling, once each."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def stop_in(err: BaseException) -> EnvironmentStop | None:
    """The `EnvironmentStop` behind `err` (Optuna may replace it by an error of its own when the
    store it reports the trial's end to is the one that is away)."""
    return next((e for e in chain(err) if isinstance(e, EnvironmentStop)), None)


def _line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return f"{type(err).__name__}: {text}"[:300]


def _folder_of(err: BaseException, folder: Path | None) -> str:
    name = getattr(err, "filename", None)
    if name:
        return str(Path(name).absolute().parent)
    return str(folder) if folder is not None else "."


def _away(e: BaseException, remote: bool) -> bool:
    mod, name = type(e).__module__.split(".")[0], type(e).__name__
    text = str(e).lower()
    if any(t in text for t in _WRONG_TEXT):  # reachable, but the request itself is wrong
        return False
    if isinstance(e, ConnectionError | TimeoutError) or (mod, name) in _AWAY_TYPES:
        return True
    texts = ("OperationalError", "InterfaceError", "StorageInternalError", "MlflowException")
    if name in texts and any(t in text for t in _AWAY_TEXT):
        return True
    if remote and name in ("MlflowException", "RestException"):  # the tracking server's 5xx
        status = getattr(e, "get_http_status_code", lambda: 0)()
        if status in LOGIN_REFUSED:
            return False
        return status >= 500 or "api request to" in text
    return False


def classify(
    err: BaseException, folder: Path | None = None, store: str = "", remote: bool = False
) -> Fault | None:
    """The environment's fault behind `err`, or None (the trial's own fault, or a bug).

    A full disk: ENOSPC or EDQUOT anywhere in the cause chain, SQLite's "database or disk is
    full", or any write error (torch hides ENOSPC in a RuntimeError) while `folder` has less
    than LOW_SPACE free. A store away: connection errors of PostgreSQL, SQLite's lock, HTTP
    connection errors, and (`remote`) the tracking server's 5xx answers."""
    errors = list(chain(err))
    for e in errors:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return Fault("disk_full", _folder_of(e, folder), _line(e))
        if any(t in str(e).lower() for t in _DISK_TEXT):
            return Fault("disk_full", _folder_of(e, folder), _line(e))
    for e in errors:
        if _away(e, remote):
            return Fault("store", store or "a store", _line(e))
    if folder is not None and any(isinstance(e, OSError | RuntimeError) for e in errors):
        try:
            if free_bytes(folder) < LOW_SPACE:
                return Fault("disk_full", str(folder), _line(err))
        except OSError:
            pass
    return None


def disk_full(err: BaseException, folder: Path | None = None) -> Fault | None:
    """The full disk behind an error raised outside the stores' retried calls (a checkpoint, a
    resume state, the report): there, a store away has already been retried and turned into
    `EnvironmentStop`, and a bare timeout is nobody's store."""
    fault = classify(err, folder=folder)
    return fault if fault is not None and fault.kind == "disk_full" else None


def _say(text: str) -> None:
    from tqdm import tqdm  # prints above a progress bar, if one is shown

    tqdm.write(text, file=sys.stderr)


class _Wait:
    """One outage of one store, as a caller sees it: backoff with jitter, and a line every 10 s
    (every minute under --quiet) saying which store is away and for how long."""

    def __init__(self, store: str):
        self.store, self.started, self.attempt, self.next_line = store, time.monotonic(), 0, 0.0

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def pause(self, fault: Fault) -> bool:
        """Sleep before the next try; False when the window is spent."""
        elapsed, window = self.elapsed, _window()
        if elapsed >= window:
            return False
        if elapsed >= self.next_line:
            _say(
                f"waiting for {self.store}: unreachable for {elapsed:.0f} s "
                f"({fault.detail[:160]}); retrying for up to {settings.window:g} s (--retry-window)"
            )
            self.next_line = elapsed + (60.0 if settings.quiet else 10.0)
        delay = min(10.0, 0.25 * 2**self.attempt) * random.uniform(0.5, 1.0)
        time.sleep(max(0.0, min(delay, window - elapsed)))
        self.attempt += 1
        return True

    def back(self) -> None:
        if self.next_line > 0:  # a line said it was away: say it is back
            _say(f"{self.store} is reachable again after {self.elapsed:.0f} s; going on")


_local = threading.local()


def retrying(fn, store: str, remote: bool = False, already_done=None, folder: Path | None = None):
    """`fn` with its transient store errors retried (capped exponential backoff, jitter) for
    `settings.window` seconds; a full disk, or a store away past the window, raises
    `EnvironmentStop`. `already_done(err)`: an error that, after a retried attempt, means the
    previous attempt had taken effect before its connection dropped (e.g. Optuna's 'trial
    already finished' on a retried `tell`). `folder`: where a local store writes, named when
    its disk is full."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if getattr(_local, "depth", 0):  # inside another retried call: the outer one retries
            return fn(*args, **kwargs)
        wait = None
        while True:
            _local.depth = 1
            try:
                result = fn(*args, **kwargs)
            except Exception as err:
                fault = classify(err, folder=folder, store=store, remote=remote)
                if fault is None:
                    if wait is not None and already_done is not None and already_done(err):
                        wait.back()
                        return None
                    raise
                if fault.kind == "disk_full":
                    raise EnvironmentStop(fault) from err
                wait = wait or _Wait(store)
                if not wait.pause(fault):
                    raise EnvironmentStop(fault, wait.elapsed) from err
                continue
            finally:
                _local.depth = 0
            if wait is not None:
                wait.back()
            return result

    return call


def wrap_methods(
    obj, names, store: str, remote: bool = False, already_done=None, folder: Path | None = None
):
    """Replace `obj`'s bound methods `names` by retrying ones (on the instance only)."""
    for name in names:
        method = getattr(obj, name, None)
        if callable(method):
            setattr(obj, name, retrying(method, store, remote, already_done, folder))
    return obj


@contextlib.contextmanager
def one_try():
    """Store calls this thread makes inside get one try each (no window of waiting): the calls
    made while stopping, and those of a helper thread whose work the next write redoes."""
    saved = getattr(_local, "one_try", False)
    _local.one_try = True
    try:
        yield
    finally:
        _local.one_try = saved


@contextlib.contextmanager
def while_stopping(stopping: bool):
    """Store calls made as the process stops for the environment get one try each, and a store
    still away is left to the next start (its `EnvironmentStop` goes no further); when not
    `stopping`, nothing changes."""
    if not stopping:
        yield
        return
    with one_try(), contextlib.suppress(EnvironmentStop):
        yield


def _window() -> float:
    return 0.0 if getattr(_local, "one_try", False) else settings.window


def check_space(folder: Path, need: int) -> str | None:
    """A warning when `folder`'s disk has less free space than `need` bytes, else None."""
    free = free_bytes(folder)
    if free >= need:
        return None
    return (
        f"warning: {folder} has {human(free)} free; this study will keep about {human(need)} "
        "there (best weights by search.keep_checkpoints/top_k, their MLflow copies, the resume "
        "states of running trials, the stores). It stops with exit 75 when the disk fills up."
    )
