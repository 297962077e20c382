"""Resume states in the shared store: a trial run's latest resume state in its MLflow
artifacts (`checkpoints.SHARED_STATE_DIR`), where every node that reaches the tracking server
reaches it, uploaded in the background so that training does not wait.

A state counts once it is whole: its file is uploaded first, then its record (epoch, size,
SHA-256); a node that dies mid-upload leaves the previous whole state the latest. After a
record is written the run's older states are deleted (the last one is kept); a trial that ends
(COMPLETE, PRUNED or FAIL) has its runs' states deleted (`delete_states`). A state fetched back
is checked against its record: a cut or changed file is refused, never loaded.

Knows no Optuna; the file names are `harness.core.checkpoints`'s.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
from pathlib import Path

from harness.core import checkpoints
from harness.core.checkpoints import SHARED_STATE_DIR
from harness.infra import envfaults
from harness.tracking import store as tracking


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _repo(client, run_id: str):
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    return get_artifact_repository(client.get_run(run_id).info.artifact_uri)


def _listed(client, run_id: str) -> dict[int, set[str]]:
    """{epoch: {"state", "record"}} of the run's shared states."""
    found: dict[int, set[str]] = {}
    for info in client.list_artifacts(run_id, SHARED_STATE_DIR):
        parsed = checkpoints.shared_state_epoch(info.path)
        if parsed is not None:
            found.setdefault(parsed[0], set()).add(parsed[1])
    return found


def upload_state(client, run_id: str, staged: Path, epoch: int) -> int:
    """Upload the state of `epoch` (a file named by `checkpoints.shared_state_names`), then its
    record; then delete the run's older states. Returns its size in bytes."""
    size = staged.stat().st_size
    record = {"epoch": epoch, "bytes": size, "sha256": _sha256(staged)}
    client.log_artifact(run_id, str(staged), SHARED_STATE_DIR)
    name = checkpoints.shared_state_names(epoch)[1]
    client.log_text(run_id, json.dumps(record), f"{SHARED_STATE_DIR}/{name}")
    older = [e for e in _listed(client, run_id) if e < epoch]
    if older:
        repo = _repo(client, run_id)
        for e in older:
            for artifact in checkpoints.shared_state_names(e):
                _delete(repo, f"{SHARED_STATE_DIR}/{artifact}")
    return size


def _delete(repo, path: str) -> None:
    # an artifact store that cannot delete keeps it; the record of the newer one wins
    with contextlib.suppress(NotImplementedError, OSError, tracking.TrackingError):
        repo.delete_artifacts(path)


def delete_states(client, run_ids) -> None:
    """Every shared state of these runs gone (their trial ended; one try each)."""
    with envfaults.one_try():
        for run_id in run_ids:
            try:
                if _listed(client, run_id):
                    _delete(_repo(client, run_id), SHARED_STATE_DIR)
            except (Exception, envfaults.EnvironmentStop):
                continue  # a store away: the states stay (a later retry's end deletes them)


def fetch_state(client, run_id: str, folder: Path) -> tuple[int, Path] | None:
    """The run's latest whole shared state, downloaded into `folder`: (epoch, file); None
    when it has none. ValueError when the file does not match its record (cut or changed)."""
    whole = [e for e, kinds in _listed(client, run_id).items() if kinds == {"state", "record"}]
    if not whole:
        return None
    epoch = max(whole)
    state_name, record_name = checkpoints.shared_state_names(epoch)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in (state_name, record_name):
        paths[name] = Path(
            client.download_artifacts(run_id, f"{SHARED_STATE_DIR}/{name}", str(folder))
        )
    try:
        record = json.loads(paths[record_name].read_text())
        size, digest = int(record["bytes"]), str(record["sha256"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"the record of the shared state of epoch {epoch} is unreadable") from err
    path = paths[state_name]
    if path.stat().st_size != size or _sha256(path) != digest:
        raise ValueError(
            f"the shared state of epoch {epoch} does not match its record "
            f"({path.stat().st_size} bytes, {size} recorded; or another SHA-256): corrupt"
        )
    return epoch, path


class Uploads:
    """A trial run's background uploads: `offer` hands over each new state (a staged file),
    a thread uploads the latest one (a state offered while another uploads replaces the one
    waiting), `finish` ends it, uploading what waits or dropping it. A store away costs one
    try per state (the next state, or `finish`, tries again), never a wait in training."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id
        self.cond = threading.Condition()
        self.pending: tuple[int, Path] | None = None
        self.busy = self.closed = False
        self.done: list[tuple[int, int, float]] = []  # (epoch, bytes, seconds) per upload
        self.thread = threading.Thread(target=self._loop, name="state-upload", daemon=True)
        self.thread.start()

    def offer(self, epoch: int, staged: Path) -> None:
        with self.cond:
            old, self.pending = self.pending, (epoch, staged)
            self.cond.notify_all()
        if old is not None and old[1] != staged:
            old[1].unlink(missing_ok=True)

    def _upload(self, epoch: int, staged: Path) -> bool:
        started = time.perf_counter()
        try:
            with envfaults.one_try():
                size = upload_state(self.client, self.run_id, staged, epoch)
        except (Exception, envfaults.EnvironmentStop):
            return False
        self.done.append((epoch, size, time.perf_counter() - started))
        return True

    def _loop(self) -> None:
        while True:
            with self.cond:
                while self.pending is None and not self.closed:
                    self.cond.wait()
                if self.pending is None:
                    return
                job, self.pending, self.busy = self.pending, None, True
            ok = self._upload(*job)
            with self.cond:
                self.busy = False
                retry = not ok and self.pending is None and not self.closed
                if retry:
                    self.pending = job
                else:
                    job[1].unlink(missing_ok=True)
                self.cond.notify_all()
                if retry:  # a store away: try again in a while, or with the next state
                    self.cond.wait(5.0)

    def finish(self, upload: bool, timeout: float = 60.0) -> dict[str, float]:
        """Stop: with `upload`, the state waiting (if any) is uploaded first, for up to
        `timeout` seconds; else it is dropped (an upload under way ends first). Returns the
        run's upload metrics: the last state's size in MB, the mean upload seconds, the count."""
        deadline = time.monotonic() + timeout
        with self.cond:
            if not upload and self.pending is not None:
                self.pending[1].unlink(missing_ok=True)
                self.pending = None
            self.closed = True
            self.cond.notify_all()
            while (self.pending is not None or self.busy) and time.monotonic() < deadline:
                self.cond.wait(max(0.0, deadline - time.monotonic()))
        if not self.done:
            return {}
        return {
            "state_upload_mb": self.done[-1][1] / 2**20,
            "state_upload_seconds": sum(d[2] for d in self.done) / len(self.done),
            "state_uploads": float(len(self.done)),
        }
