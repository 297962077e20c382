"""A test hook that makes the moment a fault test needs last until the test has acted on it.

A fault test cannot sample a moment (a trial RUNNING at epoch k) by polling: on a busy machine
the trial may be over before the poll sees it. So the test starts its study processes with
`tests/hold` on PYTHONPATH (see `hold_env` in conftest.py) and this module, imported by every
Python process at start (`sitecustomize`), makes trials wait at a chosen state:

- `HARNESS_TEST_HOLD=FOLDER` turns it on. Without it nothing is imported or patched.
- `HARNESS_TEST_HOLD_EPOCH=K` (default 2) and `HARNESS_TEST_HOLD_FROM_TRIAL=N` (default 0):
  which trials and epochs hold.
- `HARNESS_TEST_HOLD_WHEN=saved` (default): a trial holds right after its resume state of an
  epoch >= K is written (its heartbeat and metrics are written with it), and on shared
  stores once its background upload is whole in the trial run's artifacts, so a kill there
  resumes from that epoch, on this node or another. `unflushed`: it holds at the end of the
  first epoch >= K after some epoch's metrics (and resume state) were written, before its own
  metrics reach the logger: that epoch, and any buffered since the last write, are not in
  MLflow (a kill "between two flushes"), whatever the machine's speed.

A holding trial writes `FOLDER/held-TRIAL-PID.json` ({trial, pid, epoch, written_upto}) and
sleeps until `FOLDER/open` exists (the test creates it) or a signal ends it (SIGTERM's handler
runs in the sleep). Each trial holds once. Every process the study starts inherits the
environment: workers, DDP ranks (only rank 0 runs the trial's callbacks).

`HARNESS_TEST_HOSTNAME=NAME` (on or without a hold) makes the process report NAME as its host:
another node, on this machine (tests/test_nodes.py).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

TARGET = "harness.study.recovery"


def _hold(watch, epoch: int, uploaded: bool = False) -> None:
    folder = Path(os.environ["HARNESS_TEST_HOLD"])
    number = watch.trial.number
    if getattr(watch, "_held", False) or number < int(
        os.environ.get("HARNESS_TEST_HOLD_FROM_TRIAL", "0")
    ):
        return
    if (folder / "open").exists():
        return
    watch._held = True
    uploads = getattr(watch, "uploads", None)
    while uploaded and uploads is not None and epoch not in {d[0] for d in uploads.done}:
        time.sleep(0.05)  # the state of `epoch` is whole in the shared store only then
    marker = {"trial": number, "pid": os.getpid(), "epoch": epoch}
    marker["written_upto"] = watch.logger.written_upto
    tmp = folder / f".held-{number}-{os.getpid()}.tmp"
    tmp.write_text(json.dumps(marker))
    tmp.replace(folder / f"held-{number}-{os.getpid()}.json")  # whole or absent
    while not (folder / "open").exists():
        time.sleep(0.05)


def _patch(module) -> None:
    watch = module.TrialWatch
    when = os.environ.get("HARNESS_TEST_HOLD_WHEN", "saved")
    k = int(os.environ.get("HARNESS_TEST_HOLD_EPOCH", "2"))
    init, on_checkpoint = watch.__init__, watch.on_checkpoint

    def __init__(self, trial, resume_file, logger, *args, **kwargs):
        init(self, trial, resume_file, logger, *args, **kwargs)
        if when != "unflushed":
            return
        logger_epoch_end = logger.on_epoch_end

        def epoch_end(epoch, metrics):  # before the logger buffers (or writes) this epoch
            if epoch >= k and logger.written_upto >= 1:
                _hold(self, epoch)
            logger_epoch_end(epoch, metrics)

        logger.on_epoch_end = epoch_end  # this trial's logger only

    def checkpoint(self, epoch, state):
        on_checkpoint(self, epoch, state)
        if when == "saved" and epoch >= k:
            _hold(self, epoch, uploaded=True)

    watch.__init__, watch.on_checkpoint = __init__, checkpoint


class _Finder(importlib.abc.MetaPathFinder):
    """Patches `harness.study.recovery` right after it is first imported, wherever that happens."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


if os.environ.get("HARNESS_TEST_HOLD"):
    sys.meta_path.insert(0, _Finder())
if os.environ.get("HARNESS_TEST_HOSTNAME"):  # another node, as its trials' records see it
    import socket

    socket.gethostname = lambda: os.environ["HARNESS_TEST_HOSTNAME"]
