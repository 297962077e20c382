"""Shared fixtures: the repository paths, and one pretrained source model per test session."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# pytest-xdist's workers share the cores: each (and the study processes it starts) gets its
# share of threads instead of every process spinning one per core. Set before torch loads;
# a value in the environment wins.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _share = (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _share)))

# The longest files first (the end-to-end ones, by the suite's measured durations: `make test`
# prints them), each to one worker (`--dist loadfile --no-loadscope-reorder`): the workers end
# together, not one of them running a long file alone at the end.
LONGEST_FIRST = (
    "test_faults.py",
    "test_nodes.py",
    "test_distributed.py",
    "test_workers.py",
    "test_tasks.py",
    "test_outages.py",
    "test_envfaults.py",
    "test_kernel.py",
    "test_study.py",
    "test_warm_start.py",
    "test_reproduce.py",
    "test_soup_study.py",
    "test_ui.py",
    "test_ablation.py",
)


def pytest_collection_modifyitems(items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept


REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "experiments" / "quickstart.yaml"
# Tiny end-to-end settings: a short source pretraining and 2-epoch trials.
TINY = ["model.source_epochs=3", "train.epochs=2"]


def run_cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python run_study.py ARGS` in a fresh process, as a user types it."""
    return subprocess.run(
        [sys.executable, str(REPO / "run_study.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


HOLD = REPO / "tests" / "hold"


def hold_env(folder: Path, epoch: int = 2, from_trial: int = 0, when: str = "saved") -> dict:
    """The environment of study processes whose trials hold at a state until `release(folder)`
    (tests/hold/sitecustomize.py): a fault test waits for that state, not for a time."""
    import os

    folder.mkdir(parents=True, exist_ok=True)
    path = os.pathsep.join(p for p in (str(HOLD), os.environ.get("PYTHONPATH", "")) if p)
    return {
        **os.environ,
        "PYTHONPATH": path,
        "HARNESS_TEST_HOLD": str(folder),
        "HARNESS_TEST_HOLD_EPOCH": str(epoch),
        "HARNESS_TEST_HOLD_FROM_TRIAL": str(from_trial),
        "HARNESS_TEST_HOLD_WHEN": when,
    }


def wait_held(folder: Path, procs=(), n: int = 1, limit: float = 900, pids=None) -> list[dict]:
    """Until `n` trials hold (each marker: trial, pid, epoch, written_upto), counting only the
    processes `pids` if given. Fails at once if every process in `procs` has ended; `limit`
    only guards against a hang."""
    import json
    import time

    deadline = time.monotonic() + limit
    while True:
        held = []
        for path in sorted(folder.glob("held-*.json")):
            marker = json.loads(path.read_text())
            if pids is None or marker["pid"] in pids:
                held.append(marker)
        if len(held) >= n:
            return held
        if procs and all(p.poll() is not None for p in procs):
            pytest.fail(f"the study ended before {n} trial(s) held at the awaited state")
        assert time.monotonic() < deadline, f"no trial held within {limit} s"
        time.sleep(0.1)


def release(folder: Path) -> None:
    """Let every held trial, and every later one, go on."""
    (folder / "open").touch()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(
    backend: str, artifacts: Path, port: int, extra: tuple[str, ...] = (), env: dict | None = None
) -> subprocess.Popen:
    """`mlflow server` on `backend` (a database URL) in its own process group, once healthy;
    `extra` arguments (`--app-name basic-auth`) and `env` added."""
    import os
    import signal
    import time
    import urllib.request

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            backend,
            "--artifacts-destination",
            str(artifacts),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            *extra,
        ],  # fmt: skip
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.read().strip() == b"OK":
                    return proc
        except OSError:
            time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"mlflow server on {backend} did not start")


@pytest.fixture(scope="session")
def source_cache(tmp_path_factory) -> Path:
    """The `sources/` folder of a results folder, holding the quickstart's tiny source model.

    Trained once per session; copy it into a test's results folder to skip pretraining.
    """
    from harness.config.load import load_spec
    from harness.config.spec import baseline_config
    from harness.core.source import get_source_model

    spec = load_spec(QUICKSTART, [f"{s}" for s in TINY])
    folder = tmp_path_factory.mktemp("source-cache") / "sources"
    get_source_model(baseline_config(spec), folder)
    return folder


@pytest.fixture
def results_dir(tmp_path, source_cache) -> Path:
    """A fresh results folder that already holds the session's source model."""
    results = tmp_path / "results"
    shutil.copytree(source_cache, results / "sources")
    return results


@pytest.fixture(scope="module")
def task():
    """The digits target task of `make_config()` (seed 0): a small real TaskData, on the CPU."""
    from harness.data import datasets

    return datasets.load_target(make_config().data, 0)


def make_config(defaults: dict | None = None, **sections: dict):
    """A strict TrialConfig for core tests: CPU, 3 epochs, lr 0.05; `defaults` then `sections`
    merged in per section."""
    from harness.config.spec import TrialConfig

    tree: dict = {"name": "t", "seed": 0, "train": {"epochs": 3, "device": "cpu", "lr": 0.05}}
    for layer in (defaults or {}, sections):
        for key, value in layer.items():
            tree[key] = {**tree.get(key, {}), **value} if isinstance(value, dict) else value
    return TrialConfig.model_validate(tree)


def fresh_model(config, num_classes: int = 5):
    """The small CNN of `config`, initialised from its seed."""
    from harness.core import models, shared

    shared.seed_everything(config.seed)
    return models.build_model(config.model, num_classes, config.reg.dropout)


@pytest.fixture
def host_reads(monkeypatch):
    """A counter of Python-level tensor -> host reads (`.item()`, `.tolist()`, `bool(t)`, ...):
    `host_reads(fn)` runs `fn` and returns how many it made."""
    import torch

    count = {"n": 0}

    def counting(original):
        def wrapper(self, *args, **kwargs):
            count["n"] += 1
            return original(self, *args, **kwargs)

        return wrapper

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, counting(getattr(torch.Tensor, name)))

    def run(fn) -> int:
        count["n"] = 0
        fn()
        return count["n"]

    return run


def tiny_study_args(experiment: Path, results: Path, n_trials: int, *extra: str) -> list[str]:
    """The CLI arguments of a tiny study (TINY settings, `n_trials` trials, quiet)."""
    args = [str(experiment), "--n-trials", str(n_trials), "--results", str(results), "--quiet"]
    for s in TINY:
        args += ["--set", s]
    return [*args, *extra]


def tree_state(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder`: (size, mtime in ns): what a read-only command must leave."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="session")
def tiny_studies(tmp_path_factory, source_cache) -> Path:
    """One results folder holding three tiny finished quickstart studies (2 trials each, the
    baseline and one sampled): `quickstart`, `qs-b` (adamw pinned: the same data split) and
    `qs-other` (data.split_seed=1: another split). For warm-start and comparison tests: copy it
    before writing into it."""
    results = tmp_path_factory.mktemp("tiny-studies") / "results"
    shutil.copytree(source_cache, results / "sources")
    for extra in (
        (),
        ("--study-name", "qs-b", "--set", "train.optimizer=adamw"),
        ("--study-name", "qs-other", "--set", "data.split_seed=1"),
    ):
        proc = run_cli(*tiny_study_args(QUICKSTART, results, 2, *extra), cwd=results.parent)
        assert proc.returncode == 0, proc.stderr
    return results
