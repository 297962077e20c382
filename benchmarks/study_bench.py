"""The study level: pruning's saving, the bookkeeping per trial, the peak memory of a study.

    python benchmarks/study_bench.py pruning [--n-trials N]    # median pruner vs none
    python benchmarks/study_bench.py bookkeeping [--trials 300]  # ms a trial, training stubbed
    python benchmarks/study_bench.py memory                     # peak RSS, quickstart study
    python benchmarks/study_bench.py workers [--n-trials N] [--threads 1,2]  # 2 workers vs 1
    python benchmarks/study_bench.py all

Run by hand, never as a timed test. Each part prints a readable summary, then machine-readable
lines (name, then value).

- pruning: `run_study.py experiments/digits_regularization.yaml` twice in fresh results folders,
  with the file's median pruner and with `search.pruner=none`; same sampler seed, same trial
  count. Epochs trained (the trials' `epochs_run`) and best val_acc of each.
- bookkeeping: the default quickstart study (`model.pretrained=none`, no source pretraining)
  run by the harness's own `run_study` on the default stores (an Optuna journal file and an
  MLflow SQLite database in a fresh results folder), with `fit` replaced by a stub that calls
  the real callbacks every epoch with made-up metrics and offers a resume state of the real
  model's weights. The time of every call into the sampler and pruner (sampling), the Optuna
  storage (storage), `harness.tracking.store` and the EpochLogger (tracking), and the resume state,
  best-weights file and retention (checkpoint) is summed per trial, each call's own time
  (nested calls counted where they belong); `other` is the rest of the trial (configuration,
  model build, Optuna's loop). Reported at 10 trials (trials 1-10) and at N (the last 10).
- workers: `run_study.py experiments/digits_regularization.yaml` with one worker and with
  `--workers 2`, each with 1 and 2 CPU threads a worker (`train.threads`), in fresh results
  folders that start with the source model already pretrained. Trial throughput is finished
  trials over the time from the first trial's start to the last one's end (Optuna's
  datetime_start/datetime_complete: start-up left out); `ratio workers2/workers1` compares
  each worker count at its fastest thread count (and per thread count, and in epochs a
  second, which pruning's different choices under two samplers do not skew).
- memory: `run_study.py experiments/quickstart.yaml` (the default study, as a user types it) in
  a fresh results folder; the peak resident set size of that process.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _run_cli(*args: str) -> float:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, str(REPO / "run_study.py"), *args],
        cwd=REPO,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - started


# --- pruning: median pruner vs none -----------------------------------------------------------
def _study_figures(results: Path, name: str) -> dict[str, float]:
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage
    from optuna.trial import TrialState

    storage = JournalStorage(JournalFileBackend(str(results / "optuna.journal")))
    study = optuna.load_study(study_name=name, storage=storage)
    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    complete = [t for t in finished if t.state == TrialState.COMPLETE]
    epochs = sum(t.user_attrs.get("epochs_run", len(t.intermediate_values)) for t in finished)
    return {
        "trials": len(finished),
        "pruned": len(finished) - len(complete),
        "epochs": epochs,
        "best_val_acc": max(t.value for t in complete),
    }


def pruning(n_trials: int | None) -> list[str]:
    from harness.config.load import load_spec

    experiment = REPO / "experiments" / "digits_regularization.yaml"
    spec = load_spec(experiment, [])
    n = n_trials or spec.search.n_trials
    figures = {}
    for pruner in ("median", "none"):
        results = Path(tempfile.mkdtemp(prefix=f"bench-prune-{pruner}-"))
        args = [str(experiment), "--results", str(results), "--quiet", "--n-trials", str(n)]
        seconds = _run_cli(*args, "--set", f"search.pruner={pruner}")
        figures[pruner] = {**_study_figures(results, spec.name), "seconds": seconds}
        print(f"{pruner:>6}: {json.dumps(figures[pruner])}", flush=True)
    med, none = figures["median"], figures["none"]
    return [
        f"pruning trials {n}",
        f"pruning epochs_median {med['epochs']}",
        f"pruning epochs_none {none['epochs']}",
        f"pruning best_val_acc_median {med['best_val_acc']:.4f}",
        f"pruning best_val_acc_none {none['best_val_acc']:.4f}",
        f"ratio epochs median/none {med['epochs'] / none['epochs']:.3f}",
        f"pruning val_acc_points median-none {100 * (med['best_val_acc'] - none['best_val_acc']):+.2f}",  # noqa: E501
        f"pruning seconds_median {med['seconds']:.1f}",
        f"pruning seconds_none {none['seconds']:.1f}",
    ]


# --- bookkeeping per trial --------------------------------------------------------------------
class Clock:
    """Each wrapped call's own time (less the wrapped calls inside it), by category and trial."""

    def __init__(self):
        self.trial = -1  # the trial in progress; -1: the study's set-up
        self.stack: list[tuple[float, float]] = []  # per open call: wrapped calls inside it
        self.spent: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.cpu: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.starts: list[float] = []
        self.cpu_starts: list[float] = []  # the process's CPU time (all its threads)

    def mark(self) -> None:
        self.starts.append(time.perf_counter())
        self.cpu_starts.append(time.process_time())

    def wrap(self, fn, category: str):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self.stack.append((0.0, 0.0))
            started, cpu_started = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - started
                cpu = time.thread_time() - cpu_started
                inner, inner_cpu = self.stack.pop()
                self.spent[self.trial][category] += elapsed - inner
                self.cpu[self.trial][category] += cpu - inner_cpu
                if self.stack:
                    outer, outer_cpu = self.stack[-1]
                    self.stack[-1] = (outer + elapsed, outer_cpu + cpu)

        return timed

    def wrap_methods(self, obj, category: str, names=None) -> None:
        for name in names or [n for n in dir(obj) if not n.startswith("_")]:
            attr = getattr(obj, name, None)
            if callable(attr) and not isinstance(attr, type):
                setattr(obj, name, self.wrap(attr, category))


def _stub_fit(clock: Clock):
    """fit without training: the real callbacks every epoch, made-up metrics (better near
    lr 1e-2), and a resume state holding the model's weights, offered as fit offers it (at the
    epochs whose `wants_state` is true)."""
    import torch

    from harness.core import finetune, resume_state

    def fit(config, model, data, callbacks=(), resume=None):
        callbacks = list(callbacks)
        savers = [c for c in callbacks if callable(getattr(c, "on_checkpoint", None))]
        weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        quality = max(0.0, 1.0 - abs(math.log10(config.train.lr) + 2.0) / 3.0)
        history = []
        for epoch in range(1, config.train.epochs + 1):
            acc = 0.2 + 0.7 * quality * (1.0 - math.exp(-epoch / 5.0))
            m = {
                "train_loss": 1.6 - acc,
                "train_acc": min(acc + 0.05, 1.0),
                "val_loss": 1.65 - acc,
                "val_acc": acc,
                "train_loss_running": 1.6 - acc,
                "train_acc_running": acc,
                "lr": config.train.lr,
            }
            m["overfit_gap"] = m["train_acc"] - m["val_acc"]
            m["overfit_gap_loss"] = m["val_loss"] - m["train_loss"]
            history.append(m)
            for cb in callbacks:  # their own time is the trial's, not the stub's
                clock.wrap(cb.on_epoch_end, "other")(epoch, m)
            due = [c for c in savers if getattr(c, "wants_state", lambda _e: True)(epoch)]
            if due:  # as fit: the state only at the epochs a callback keeps it
                state = {k: None for k in resume_state.KEYS}
                state.update(
                    version=resume_state.VERSION,
                    config=resume_state.config_key(config),
                    epoch=epoch,
                    model=weights,
                    history=history,
                    best_state=weights,
                    generator=torch.Generator().get_state(),
                )
                for cb in due:
                    clock.wrap(cb.on_checkpoint, "other")(epoch, state)
        best_epoch = max(range(len(history)), key=lambda i: history[i]["val_acc"]) + 1
        return finetune.FitResult(
            best_epoch=best_epoch,
            best=history[best_epoch - 1],
            history=history,
            best_state=weights,
            seconds=0.0,
            device="cpu",
            threads=torch.get_num_threads(),
        )

    return fit


def bookkeeping(n_trials: int, window: int = 10) -> list[str]:
    import optuna

    from harness.config.load import load_spec
    from harness.core import resume_state
    from harness.study import objective as objective_mod
    from harness.study import retention
    from harness.study import search as study
    from harness.tracking import provenance, registry, sysmetrics, ui
    from harness.tracking import store as tracking

    clock = Clock()
    results = Path(tempfile.mkdtemp(prefix="bench-bookkeeping-"))
    spec = load_spec(
        REPO / "experiments" / "quickstart.yaml",
        [f"search.n_trials={n_trials}", "model.pretrained=none"],
    )
    # the training stand-in, wherever the study finds `fit`
    stub = clock.wrap(_stub_fit(clock), "stub")
    if hasattr(study, "fit"):
        study.fit = stub
    try:  # where the study calls fit through harness.core.tasks
        from harness.core import tasks

        tasks.fit = stub
    except ImportError:
        pass
    # sampling (sampler and pruner) and storage
    open_storage, make_sampler, make_pruner = (  # the names the study loop calls
        study.open_storage,
        study.make_sampler,
        study.make_pruner,
    )

    def storage(url):
        s = open_storage(url)
        clock.wrap_methods(s, "storage")
        return s

    def sampler(*a, **k):
        s = make_sampler(*a, **k)
        clock.wrap_methods(
            s,
            "sampling",
            [
                "infer_relative_search_space",
                "sample_relative",
                "sample_independent",
                "before_trial",
                "after_trial",
            ],
        )
        return s

    def pruner(*a, **k):
        p = make_pruner(*a, **k)
        clock.wrap_methods(p, "sampling", ["prune"])
        return p

    study.open_storage, study.make_sampler, study.make_pruner = storage, sampler, pruner
    # tracking: every function of the tracking layer, the epoch logger, the system monitor
    monitor = sysmetrics.system_monitor

    def system_monitor(*a, **k):
        m = monitor(*a, **k)
        m.finish = clock.wrap(m.finish, "tracking")
        return m

    sysmetrics.system_monitor = system_monitor
    for module in (tracking, registry, provenance, ui, sysmetrics):  # the tracking layer
        for name in dir(module):
            fn = getattr(module, name)
            ours = getattr(fn, "__module__", "") == module.__name__ and name[0] != "_"
            if ours and callable(fn) and not isinstance(fn, type):
                setattr(module, name, clock.wrap(fn, "tracking"))
    for name in ("on_epoch_end", "flush", "end_run"):
        if hasattr(tracking.EpochLogger, name):  # the names of this version of the logger
            setattr(
                tracking.EpochLogger,
                name,
                clock.wrap(getattr(tracking.EpochLogger, name), "tracking"),
            )
    # checkpoint: the resume state, the best weights' file, the retention policy
    resume_state.save_state = clock.wrap(resume_state.save_state, "checkpoint")
    objective_mod.atomic_write = clock.wrap(objective_mod.atomic_write, "checkpoint")
    retention.apply_retention = clock.wrap(retention.apply_retention, "checkpoint")
    # the trials' boundaries
    objective = objective_mod.objective

    def timed_objective(ctx, trial):
        clock.trial = trial.number
        clock.mark()
        return objective(ctx, trial)

    objective_mod.objective = timed_objective

    def finish(*a, **k):
        clock.mark()  # the end of the last trial
        clock.trial = -2

    study.finish_report = study.summarize = finish  # the study imports them by name
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    started = time.perf_counter()
    study.run_study(spec, study.StudyOptions(results=results, quiet=True))
    wall = time.perf_counter() - started
    n = len(clock.starts) - 1
    print(f"{n} trials of the stubbed quickstart study in {wall:.1f} s; results in {results}")
    categories = ("sampling", "storage", "tracking", "checkpoint")
    lines = []
    # wall: what a trial waits for; cpu: the CPU time it costs (the process's, background
    # threads included, by category the trial thread's), which other load on the machine
    # inflates much less than the wall time (it leaves out time waiting for a core or a disk)
    for unit, marks, spent in (
        ("ms", clock.starts, clock.spent),
        ("cpu_ms", clock.cpu_starts, clock.cpu),
    ):
        totals = [b - a for a, b in zip(marks, marks[1:], strict=False)]
        for label, trials in (
            (f"at_{window}", range(1, 1 + window)),
            (f"at_{n}", range(n - window, n)),
        ):
            trials = [i for i in trials if 0 <= i < n]
            mean = {c: 1000 * sum(spent[i][c] for i in trials) / len(trials) for c in categories}
            stub = 1000 * sum(spent[i]["stub"] for i in trials) / len(trials)
            total = 1000 * sum(totals[i] for i in trials) / len(trials) - stub
            other = total - sum(mean.values())
            print(
                f"{label:>7} (trials {trials[0]}-{trials[-1]}) {unit:>6}: {total:7.1f} a trial = "
                + " + ".join(f"{c} {v:.1f}" for c, v in mean.items())
                + f" + other {other:.1f}   (the stub's own, {stub:.1f}, left out)"
            )
            lines.append(f"bookkeeping_{unit} {label} {total:.1f}")
            lines += [f"bookkeeping_{unit} {label} {c} {v:.1f}" for c, v in mean.items()]
            lines.append(f"bookkeeping_{unit} {label} other {other:.1f}")
        mean_all = 1000 * (sum(totals) - sum(spent[i]["stub"] for i in range(n))) / n
        print(f"mean of all {n} trials {unit:>6}: {mean_all:.1f} a trial")
        lines.append(f"bookkeeping_{unit} mean_of_{n} {mean_all:.1f}")
    load = os.getloadavg()
    lines.append(f"bookkeeping load_average_1m {load[0]:.2f}")  # of the machine, at the end
    return lines


# --- two workers against one ---------------------------------------------------------------------
def _throughput(results: Path, name: str) -> dict[str, float]:
    """Finished trials and epochs a second, from the first trial's start to the last one's end
    (the process start-up, data and source model loading left out)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage
    from optuna.trial import TrialState

    storage = JournalStorage(JournalFileBackend(str(results / "optuna.journal")))
    trials = optuna.load_study(study_name=name, storage=storage).get_trials()
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    first = min(t.datetime_start for t in trials if t.datetime_start)
    last = max(t.datetime_complete for t in finished)
    seconds = (last - first).total_seconds()
    epochs = sum(t.user_attrs.get("epochs_run", len(t.intermediate_values)) for t in finished)
    return {
        "trials": len(finished),
        "epochs": epochs,
        "trial_seconds": round(seconds, 2),
        "trials_per_s": len(finished) / seconds,
        "epochs_per_s": epochs / seconds,
    }


def workers(n_trials: int | None, threads: list[int]) -> list[str]:
    """`experiments/digits_regularization.yaml` with one worker, then `--workers 2`, each with
    every thread count a worker of `threads` (`train.threads`), in fresh results folders that
    start with the source model already pretrained (copied from a warm-up study)."""
    import shutil

    from harness.config.load import load_spec

    experiment = REPO / "experiments" / "digits_regularization.yaml"
    spec = load_spec(experiment, [])
    n = n_trials or spec.search.n_trials
    warm = Path(tempfile.mkdtemp(prefix="bench-workers-warm-"))
    _run_cli(str(experiment), "--results", str(warm), "--quiet", "--n-trials", "1")
    figures: dict[tuple[int, int], dict[str, float]] = {}
    for count in (1, 2):
        for t in threads:
            results = Path(tempfile.mkdtemp(prefix=f"bench-workers-{count}x{t}-"))
            shutil.copytree(warm / "sources", results / "sources")
            args = [str(experiment), "--results", str(results), "--quiet", "--n-trials", str(n)]
            args += ["--set", f"train.threads={t}"]
            if count > 1:
                args += ["--workers", str(count)]
            load = os.getloadavg()[0]
            seconds = _run_cli(*args)
            figures[count, t] = {
                **_throughput(results, spec.name),
                "wall_seconds": round(seconds, 1),
                "load_1m_before": load,
                "load_1m_after": os.getloadavg()[0],
            }
            print(f"workers {count} threads {t}: {json.dumps(figures[count, t])}", flush=True)
    lines = []
    for (count, t), f in figures.items():
        lines.append(f"workers {count} threads {t} trials_per_s {f['trials_per_s']:.3f}")
        lines.append(f"workers {count} threads {t} epochs_per_s {f['epochs_per_s']:.2f}")
    for t in threads:
        one, two = figures[1, t], figures[2, t]
        lines.append(
            f"ratio workers2/workers1 threads{t} {two['trials_per_s'] / one['trials_per_s']:.3f}"
        )  # noqa: E501
    best1 = max((figures[1, t] for t in threads), key=lambda f: f["trials_per_s"])
    best2 = max((figures[2, t] for t in threads), key=lambda f: f["trials_per_s"])
    lines.append(f"ratio workers2/workers1 {best2['trials_per_s'] / best1['trials_per_s']:.3f}")
    lines.append(
        f"ratio workers2/workers1 epochs_per_s {best2['epochs_per_s'] / best1['epochs_per_s']:.3f}"
    )
    return lines


# --- memory of the default study ----------------------------------------------------------------
def memory() -> list[str]:
    results = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    seconds = _run_cli(str(REPO / "experiments" / "quickstart.yaml"), "--results", str(results))
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak_kb <= before:
        print("note: an earlier child process had a higher peak; this figure is that one's")
    print(f"quickstart study: {seconds:.1f} s, peak RSS {peak_kb / 1024:.0f} MiB ({results})")
    return [f"memory peak_rss_mib quickstart {peak_kb / 1024:.0f}", f"memory seconds {seconds:.1f}"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("part", choices=["pruning", "bookkeeping", "memory", "workers", "all"])
    p.add_argument("--n-trials", type=int, help="pruning: trials of each study (default: file's)")
    p.add_argument("--trials", type=int, default=300, help="bookkeeping: trials of the study")
    p.add_argument(
        "--threads", default="1,2", help="workers: CPU threads a worker, each measured (1,2)"
    )
    args = p.parse_args()
    lines = []
    if args.part in ("memory", "all"):  # first: the peak of the first child process is its own
        lines += memory()
    if args.part in ("pruning", "all"):
        lines += pruning(args.n_trials)
    if args.part in ("bookkeeping", "all"):
        lines += bookkeeping(args.trials)
    if args.part in ("workers", "all"):
        lines += workers(args.n_trials, [int(t) for t in args.threads.split(",")])
    import torch

    print("\n".join(lines))
    print(
        f"device cpu torch {torch.__version__} threads {torch.get_num_threads()} "
        f"cores {os.cpu_count()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
