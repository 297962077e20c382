"""Atomic writes (harness.infra.files) and the files a trial leaves: a write interrupted by an
exception or a signal leaves no temporary file and the previous content; an attempt that did
not complete leaves no best-weights file."""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import subprocess
import sys

import pytest
from conftest import QUICKSTART, REPO, TINY

from harness.config import metrics
from harness.infra.files import atomic_write


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = tmp_path / "state.pt"
    atomic_write(path, lambda f: f.write(b"before"))

    def broken(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, broken)
    assert path.read_bytes() == b"before"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]


SLOW_WRITER = """
import signal, sys, time
from harness.infra.files import atomic_write
from harness.study.recovery import Interrupted

def on_signal(signum, frame):  # as the study does: the signal becomes an exception
    raise Interrupted(signal.Signals(signum).name)

signal.signal(signal.SIGTERM, on_signal)

def slow(f):
    f.write(b"x" * 4096)
    f.flush()
    print("writing", flush=True)
    time.sleep(60)

try:
    atomic_write(sys.argv[1], slow)
except Interrupted:
    sys.exit(75)
"""


def test_sigterm_during_a_best_weights_write_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "trial-3-best.pt"
    path.write_bytes(b"earlier")
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_WRITER, str(path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "writing"
        assert any(p.name.endswith(".tmp") for p in tmp_path.iterdir())  # mid-write
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 75
    finally:
        if proc.poll() is None:
            proc.kill()
    assert path.read_bytes() == b"earlier"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trial-3-best.pt"]


def test_an_attempt_that_fails_after_writing_its_best_weights_leaves_none(results_dir, monkeypatch):
    """The trial fails after its best-weights file was written (here: a summary metric the
    result does not have): the file goes with the failed attempt."""
    from harness.config.load import load_spec
    from harness.core.checkpoints import best_weights_path
    from harness.study.search import StudyOptions, run_study

    real = metrics.KINDS["finetune"]
    summary = (*real.summary, "no_such_metric")
    monkeypatch.setitem(metrics.KINDS, "finetune", dataclasses.replace(real, summary=summary))
    written = []
    from harness.core import checkpoints

    original = checkpoints.save_best

    def recording(results, study_name, number, state):
        written.append(number)
        return original(results, study_name, number, state)

    monkeypatch.setattr(checkpoints, "save_best", recording)
    spec = load_spec(QUICKSTART, TINY)
    with contextlib.suppress(Exception):  # the study may stop on its only trial failing
        run_study(spec, StudyOptions(results=results_dir, n_trials=1, quiet=True))
    assert written, "the best weights were never written: the test proves nothing"
    assert not best_weights_path(results_dir, "quickstart", 0).exists()
    leftovers = list((results_dir / "checkpoints").rglob("*"))
    assert [p for p in leftovers if p.is_file() and not p.name.startswith(".")] == []
