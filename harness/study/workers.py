"""Several worker processes of one study on this machine: which GPU and how many CPU threads
each gets (pure functions), and spawning them.

Every worker is an ordinary `run_study.py` process joining the same study through the shared
Optuna storage and MLflow store; the study's budget of finished trials holds across them
(Optuna's MaxTrialsCallback), so nothing here schedules trials.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def visible_gpus(env: dict[str, str] | None = None, device_count: int | None = None) -> list[str]:
    """The GPU ids this process may use: CUDA_VISIBLE_DEVICES when set (ids or UUIDs, gaps
    kept as written), else 0..n-1 for the driver's device count."""
    env = os.environ if env is None else env
    listed = env.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip() and g.strip() != "-1"]
    if device_count is None:
        import torch

        device_count = torch.cuda.device_count()
    return [str(i) for i in range(device_count)]


def worker_count(requested: str, gpus: list[str], per_trial: int = 1) -> int:
    """`auto`: one worker per group of `per_trial` visible GPUs (one per GPU when a trial
    takes one), else one. A number: that many."""
    if requested == "auto":
        return max(1, len(gpus) // per_trial)
    n = int(requested)
    if n < 1:
        raise ValueError(f"--workers {requested}: must be at least 1 or auto")
    return n


def assign(n_workers: int, gpus: list[str], cpus: int, per_trial: int = 1) -> list[dict[str, str]]:
    """The environment of each worker: a group of `per_trial` GPUs each (its trials' ranks:
    `train.devices_per_trial`; groups round robin when there are more workers than groups;
    an empty CUDA_VISIBLE_DEVICES hides the GPUs when there are none, or fewer than a group)
    and an even share of the CPU threads (at least one; a worker's ranks split its share)."""
    threads = max(1, cpus // n_workers)
    groups = [",".join(gpus[j : j + per_trial]) for j in range(0, len(gpus), per_trial)]
    groups = [g for g in groups if g.count(",") + 1 == per_trial]  # whole groups only
    out = []
    for i in range(n_workers):
        env = {"CUDA_VISIBLE_DEVICES": groups[i % len(groups)] if groups else ""}
        env["HARNESS_WORKER_INDEX"] = str(i)  # seeds its sampler apart from the others
        env["OMP_NUM_THREADS"] = str(threads)  # torch takes its thread count from it
        out.append(env)
    return out


def spawn(argv: list[str], envs: list[dict[str, str]], logs: Path) -> list[subprocess.Popen]:
    """Start one `run_study.py ARGV --worker` process per environment; output to `logs/`."""
    logs.mkdir(parents=True, exist_ok=True)
    script = Path(__file__).resolve().parents[2] / "run_study.py"
    procs = []
    for i, extra in enumerate(envs):
        log = open(logs / f"worker-{i}.log", "w")  # noqa: SIM115 - closed by the child's exit
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), *argv, "--worker", "--quiet"],
                env={**os.environ, **extra},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    return procs
