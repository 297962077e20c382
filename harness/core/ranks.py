"""A trial on K ranks: rank 0 (the process that runs the trial) starts ranks 1..K-1 with
`torch.multiprocessing` (spawn context); every rank joins one process group through a
`TCPStore` that rank 0 serves on a free local port; rank 0 sends the trial's config, data hash,
resume state and thread count by `broadcast_object_list`; each other rank prepares the same
trial with the function its caller hands over (`harness.core.tasks.rank_trial`: the same data
split, checked by its hash, and the same architecture without weights) and runs the same
`finetune.fit` with the process group and no callbacks. See `harness.core.distributed` for
what fit does with the group, and for the faults: a rank that dies or raises ends the trial
with `RankFailed`; whatever way rank 0 leaves, it kills the other ranks, and a rank whose
parent dies is killed by the kernel (PR_SET_PDEATHSIG).

Core-level: imports neither Optuna nor MLflow.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import os
import signal
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from harness.config.spec import TrialConfig
from harness.core.distributed import RankFailed, Stopped, rank_threads, timeout_seconds, uses_cuda
from harness.core.finetune import fit


# --- The runtime: rank 0 starts the others --------------------------------------------------
def _die_with_parent() -> None:
    """Linux: the kernel kills this process when its parent dies (no orphaned rank)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _backend(config: TrialConfig) -> str:
    return "nccl" if uses_cuda(config) else "gloo"


def _rank_main(
    rank: int, world_size: int, port: int, backend: str, errors, prepare: Callable
) -> None:
    """Ranks 1..K-1: join the group, take the trial from rank 0, `prepare(config, cache_dir)`
    its (data, model), fit with no callbacks."""
    _die_with_parent()
    parent = mp.parent_process()
    if parent is not None and not parent.is_alive():  # it died before the line above
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches rank 0, which stops us
    timeout = datetime.timedelta(seconds=timeout_seconds())
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        store = dist.TCPStore("127.0.0.1", port, world_size, False, timeout=timeout)
        store.set(f"ready{rank}", "1")
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world_size, timeout=timeout
        )
        payload = [None]
        dist.broadcast_object_list(payload, src=0)
        config, data_hash, resume, threads, cache_dir = payload[0]
        torch.set_num_threads(threads)
        data, model = prepare(config, cache_dir)
        if data.data_hash != data_hash:
            raise RankFailed(f"rank {rank}: data hash {data.data_hash}, rank 0 has {data_hash}")
        with contextlib.suppress(Stopped):
            fit(config, model, data, (), resume=resume, group=dist.group.WORLD)
        dist.destroy_process_group()
    except BaseException as err:
        errors.put((rank, f"{type(err).__name__}: {err}", traceback.format_exc()))
        os._exit(1)  # no atexit: a broken group's teardown could wait
    os._exit(0)


def _free_store(timeout: datetime.timedelta) -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", 0, None, True, timeout=timeout, wait_for_workers=False)


def _failure(procs, errors, wait: float = 5.0) -> str | None:
    """What went wrong on ranks 1..K-1, if anything: a reported error, else an exit status;
    waits up to `wait` seconds for a rank that is ending to say so."""
    deadline, dead_since = time.monotonic() + wait, None
    while True:
        if not errors.empty():
            rank, message, _trace = errors.get()
            return f"rank {rank} raised {message}"
        dead = [(i + 1, p.exitcode) for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
        if dead:
            dead_since = dead_since or time.monotonic()
            if time.monotonic() - dead_since > 0.5:  # time to report its error, if it raised
                r, code = dead[0]
                how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
                return f"rank {r} {how}"
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def _start(config: TrialConfig, timeout: datetime.timedelta, prepare: Callable):
    """Spawn ranks 1..K-1 and join the group as rank 0; (processes, error queue)."""
    k, backend = config.train.devices_per_trial, _backend(config)
    store = _free_store(timeout)
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()  # a put is written before the rank exits
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(r, k, store.port, backend, errors, prepare),
            daemon=True,
            name=f"harness-rank-{r}",
        )
        for r in range(1, k)
    ]
    try:  # whatever stops the start (a rank's death, SIGTERM, a timeout) stops every rank
        for p in procs:
            p.start()
        deadline = time.monotonic() + max(timeout.total_seconds(), 120.0)  # spawn and imports
        waiting = [f"ready{r}" for r in range(1, k)]
        while not store.check(waiting):  # a rank that dies while it starts fails the trial now
            if any(not p.is_alive() for p in procs) or time.monotonic() > deadline:
                raise RankFailed(_failure(procs, errors, 1.0) or "a rank did not start in time")
            time.sleep(0.05)
        if backend == "nccl":
            torch.cuda.set_device(0)
        dist.init_process_group(backend, store=store, rank=0, world_size=k, timeout=timeout)
    except BaseException:
        _stop([p for p in procs if p.pid is not None])
        raise
    return procs, errors, store


def _stop(procs, grace: float = 0.0) -> None:
    """Wait up to `grace` seconds for the ranks to end, then kill those left, and reap them."""
    deadline = time.monotonic() + grace
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(10)


def train(
    config: TrialConfig,
    model,
    data,
    prepare: Callable,
    callbacks=(),
    resume=None,
    cache_dir: Path | None = None,
):
    """`finetune.fit` on `config.train.devices_per_trial` ranks, this process rank 0 (its
    callbacks run here); the result is rank 0's. The other ranks build their trial with
    `prepare(config, cache_dir) -> (data, model)`, a module-level function (spawn pickles it by
    name). Raises RankFailed when another rank fails."""
    timeout = datetime.timedelta(seconds=timeout_seconds())
    threads_before = torch.get_num_threads()
    threads = rank_threads(config)
    procs, errors, _store = _start(config, timeout, prepare)
    ok = False
    try:
        torch.set_num_threads(threads)
        try:
            payload = [(config, data.data_hash, resume, threads, cache_dir)]
            dist.broadcast_object_list(payload, src=0)
            result = fit(config, model, data, callbacks, resume=resume, group=dist.group.WORLD)
        except RuntimeError as err:  # a collective that failed: a lost rank?
            why = _failure(procs, errors)
            # alive, but hung: gloo says "Timed out waiting ..." or, when the wait ends inside
            # DDP's buffer broadcast, "Application timeout caused pair closure"
            if why is None and any(w in str(err).lower() for w in ("timed out", "timeout")):
                why = f"a rank did not answer within {timeout_seconds():g} s (HARNESS_DIST_TIMEOUT)"
            if why is not None:
                message = f"{why}; the trial stops ({type(err).__name__}: {err})"
                raise RankFailed(message[:2000]) from err
            raise
        ok = True
        return result
    finally:
        torch.set_num_threads(threads_before)
        _stop(procs, grace=timeout.total_seconds() if ok else 0.0)
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
        if ok and any(p.exitcode != 0 for p in procs):
            raise RankFailed(_failure(procs, errors, 0.5) or "a rank did not end cleanly")
