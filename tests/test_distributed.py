"""One trial on K devices (`train.devices_per_trial`, `harness.core.distributed`), tested on the CPU
with K=2 gloo ranks in real processes: repeatable bit for bit, equal to one device with the same
global batch within a stated tolerance, a killed rank fails the trial in time and leaves no
process behind, bad input exits 2 before anything is created, and a whole study with
`--devices-per-trial 2` is one MLflow run per trial (not per rank) that `reproduce` re-runs on
two ranks."""

from __future__ import annotations

import math
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest
from conftest import QUICKSTART, REPO, TINY, hold_env, make_config, release, run_cli, wait_held
from recorded import THREADS, note_spread

from harness.config.load import load_spec
from harness.config.spec import SpecError
from harness.core import distributed, shared, tasks
from harness.study.workers import assign, worker_count

# K=2 against K=1, same global batch and `bn: sync`: the ranks sum the same numbers in another
# order (the loss of a slice, the gradients' all-reduce), so float32 rounding differs. Spread
# measured across kernel paths (benchmarks/kernel_spread.py, 9 paths; lr 0.01): at most
# 6.8e-6 relative on a loss (ATEN_CPU_CAPABILITY=default; 2e-6 on the vectorised paths) and
# 5.7e-6 absolute on the loss gap (a difference of two losses, near 0); accuracies and the
# learning rate were equal on every path. Tolerances: 10x and more (14x, 17x); accuracies
# within one example (a prediction that sits on a tie may flip), the learning rate exactly.
REL_TOL, ABS_TOL = 1e-4, 1e-4


def _config(k: int, bn: str = "train", epochs: int = 2, threads: int = 1, **train):
    return make_config(
        train={"epochs": epochs, "devices_per_trial": k, "threads": threads, "batch_size": 32}
        | train,
        model={"pretrained": "none"},
        strategy={"bn": bn},
    )


def _fit(config, callbacks=()):
    data = tasks.load_data(config)
    shared.seed_everything(config.seed)
    model = tasks.build(config, data, None)
    return tasks.train(config, model, data, callbacks)


def _no_ranks_left():
    deadline = time.monotonic() + 10
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.1)
    return multiprocessing.active_children() == []


# --- The core on two gloo ranks ---------------------------------------------------------------
def test_two_ranks_repeat_bit_for_bit():
    config = _config(2).model_copy(
        update={"reg": make_config(reg={"dropout": 0.3, "mixup_alpha": 0.2}).reg}
    )  # dropout: a stream per rank; MixUp: the global RNG, the same on every rank
    a, b = _fit(config), _fit(config)
    assert a.history == b.history
    assert a.best_state.keys() == b.best_state.keys()
    assert all((a.best_state[k] == b.best_state[k]).all() for k in a.best_state)
    assert a.threads == 1 and _no_ranks_left()


@pytest.mark.numerics
@pytest.mark.parametrize("kind", ["full", "lp_ft"])
def test_two_ranks_equal_one_device_with_the_same_global_batch(kind):
    epochs = 3 if kind == "lp_ft" else 2  # lp_ft: DDP wrapped again at its switch (epoch 2)

    def config(k):  # lr 0.01: at 0.05 one step amplifies last-bit differences ~1000x
        c = _config(k, bn="sync", epochs=epochs, threads=THREADS, lr=0.01)
        return c.model_copy(
            update={
                "strategy": make_config(
                    strategy={"kind": kind, "bn": "sync", "lp_epochs": 1}
                ).strategy
            }
        )

    one, two = _fit(config(1)), _fit(config(2))
    assert len(one.history) == len(two.history) == epochs
    data = tasks.load_data(config(1))
    n_train, n_val = len(data.y_train), len(data.y_val)
    n_eval = min(n_train, config(1).data.eval_train_max)
    one_example = {"train_acc": 1 / n_eval, "val_acc": 1 / n_val, "train_acc_running": 1 / n_train}
    one_example["overfit_gap"] = 1 / n_eval + 1 / n_val  # one example on each side
    losses = ("train_loss", "val_loss", "train_loss_running", "overfit_gap_loss")
    bad = []
    for epoch, (m1, m2) in enumerate(zip(one.history, two.history, strict=True), start=1):
        assert m1.keys() == m2.keys()
        for key in (*losses, *one_example, "lr"):
            note_spread(f"k2_vs_k1[{kind}]", key, m2[key], m1[key])
        for key in losses:
            if not math.isclose(m1[key], m2[key], rel_tol=REL_TOL, abs_tol=ABS_TOL):
                bad.append((epoch, key, m1[key], m2[key]))
        for key, allowed in one_example.items():
            if abs(m1[key] - m2[key]) > allowed + 1e-12:
                bad.append((epoch, key, m1[key], m2[key]))
        if m1["lr"] != m2["lr"]:  # the schedule counts steps: no rounding
            bad.append((epoch, "lr", m1["lr"], m2["lr"]))
    assert not bad, bad
    assert one.best_epoch == two.best_epoch  # no accuracy moved on any path measured


def test_two_ranks_resume_equals_uninterrupted():
    class Keep:  # on rank 0: the resume state after epoch 1
        state = None

        def on_epoch_end(self, epoch, metrics):
            pass

        def on_checkpoint(self, epoch, state):
            if epoch == 1:
                Keep.state = state

    config = _config(2, epochs=3).model_copy(update={"reg": make_config(reg={"dropout": 0.3}).reg})
    straight = _fit(config, [Keep()])
    assert Keep.state is not None and Keep.state["epoch"] == 1
    data = tasks.load_data(config)
    shared.seed_everything(config.seed)
    resumed = tasks.train(config, tasks.build(config, data, None), data, resume=Keep.state)
    assert resumed.history == straight.history
    assert all((resumed.best_state[k] == straight.best_state[k]).all() for k in resumed.best_state)


class _SignalRank1:
    """Runs on rank 0, the parent of rank 1: a real signal to the real process after epoch 1."""

    def __init__(self, sig: int):
        self.sig = sig

    def on_epoch_end(self, epoch, metrics):
        if epoch == 1:
            for child in multiprocessing.active_children():
                if child.name == "harness-rank-1":
                    os.kill(child.pid, self.sig)


def test_a_killed_rank_fails_the_trial_within_the_timeout(monkeypatch):
    monkeypatch.setenv("HARNESS_DIST_TIMEOUT", "60")

    started = time.monotonic()
    with pytest.raises(distributed.RankFailed, match="rank 1 was killed by signal 9"):
        _fit(_config(2, epochs=3), [_SignalRank1(signal.SIGKILL)])
    assert time.monotonic() - started < 60
    assert _no_ranks_left()


def test_a_callback_raising_on_rank_0_stops_every_rank():
    class Boom:
        def on_epoch_end(self, epoch, metrics):
            raise ValueError("a pruning, say")

    started = time.monotonic()
    with pytest.raises(ValueError, match="a pruning"):
        _fit(_config(2, epochs=3), [Boom()])
    assert time.monotonic() - started < 60
    assert _no_ranks_left()


def test_sync_batchnorm_goes_back_to_batchnorm_after_fit():
    import torch

    config = _config(2, bn="sync", epochs=1)
    data = tasks.load_data(config)
    model = tasks.build(config, data, None)
    _fit_model = tasks.train(config, model, data)
    assert _fit_model.best_epoch == 1
    kinds = {type(m) for m in model.modules()}
    assert torch.nn.BatchNorm2d in kinds
    assert not any(issubclass(k, distributed.GlooSyncBatchNorm) for k in kinds)


# --- Config, devices, workers ------------------------------------------------------------------
def test_config_rules(tmp_path):
    with pytest.raises(ValueError, match="train.batch_size: 30 does not split"):
        _config(4, batch_size=30)
    with pytest.raises(ValueError, match="train.devices_per_trial: 2: .*fine-tuning only"):
        make_config(task={"kind": "multitask"}, train={"devices_per_trial": 2})
    searched = tmp_path / "searched.yaml"
    text = QUICKSTART.read_text()
    searched.write_text(text + "    train.devices_per_trial: {categorical: [1, 2]}\n")
    with pytest.raises(SpecError, match="train.devices_per_trial: not searchable"):
        load_spec(searched)
    odd = tmp_path / "odd.yaml"
    odd.write_text(text.replace("categorical: [16, 32]", "int: [15, 32]"))
    with pytest.raises(SpecError, match="search.space.train.batch_size: .* multiples of 2"):
        load_spec(odd, ["train.devices_per_trial=2"])


def test_device_check_counts_cpu_cores():
    cores = len(os.sched_getaffinity(0))
    distributed.check_devices(_config(min(2, cores)))
    too_many = 2 * cores
    with pytest.raises(SpecError, match=f"train.devices_per_trial: {too_many} devices"):
        distributed.check_devices(_config(too_many, batch_size=2 * too_many))


def test_threads_split_over_ranks(monkeypatch):
    import torch

    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert distributed.rank_threads(_config(2, threads=None)) == 4
    assert distributed.rank_threads(_config(2, threads=3)) == 3  # train.threads: per rank


@pytest.mark.parametrize(
    "n, gpus, k, want",
    [
        (4, [str(i) for i in range(8)], 2, ["0,1", "2,3", "4,5", "6,7"]),
        (2, ["3", "5", "6", "7"], 2, ["3,5", "6,7"]),
        (3, ["0", "1", "2", "3"], 2, ["0,1", "2,3", "0,1"]),  # more workers than groups
        (2, ["0", "1", "2"], 2, ["0,1", "0,1"]),  # the odd GPU out is left unused
        (2, ["0"], 2, ["", ""]),  # not one whole group: no GPU (the device check says so)
        (2, [], 2, ["", ""]),
    ],
)
def test_workers_get_groups_of_gpus(n, gpus, k, want):
    envs = assign(n, gpus, cpus=16, per_trial=k)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == want
    assert all(e["OMP_NUM_THREADS"] == str(16 // n) for e in envs)


def test_auto_workers_on_an_eight_gpu_node():
    gpus = [str(i) for i in range(8)]
    assert worker_count("auto", gpus, 2) == 4
    assert worker_count("auto", gpus, 1) == 8
    assert worker_count("auto", [], 2) == 1


# --- The CLI -----------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(
    "args, named",
    [
        ([str(QUICKSTART), "--devices-per-trial", "3"], "train.batch_size"),
        (
            [str(REPO / "experiments" / "digits_meta.yaml"), "--devices-per-trial", "2"],
            "train.devices_per_trial",
        ),
        ([str(QUICKSTART), "--devices-per-trial", "0"], "--devices-per-trial"),
    ],
)
def test_bad_input_exits_2_and_creates_nothing(tmp_path, args, named):
    results = tmp_path / "results"
    done = run_cli(*args, "--results", str(results), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert named in done.stderr
    assert not results.exists()


@pytest.mark.slow
def test_more_devices_than_cpu_cores_exits_2(tmp_path):
    cores = len(os.sched_getaffinity(0))
    k = next((k for k in (4, 8, 16) if k > cores), None)
    if k is None:
        pytest.skip(f"{cores} CPU cores: no K in 4, 8, 16 exceeds them")
    results = tmp_path / "results"
    done = run_cli(
        str(QUICKSTART), "--devices-per-trial", str(k), "--set", "train.batch_size=32",
        "--results", str(results), cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "train.devices_per_trial" in done.stderr and "CPU cores" in done.stderr
    assert not results.exists()


@pytest.mark.slow
def test_study_on_two_ranks_end_to_end(tmp_path, results_dir, monkeypatch):
    import mlflow
    import optuna
    from mlflow import MlflowClient
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    args = [str(QUICKSTART), "--n-trials", "2", "--results", str(results_dir), "--quiet"]
    args += ["--devices-per-trial", "2", "--set", "train.threads=1"]
    for s in TINY:
        args += ["--set", s]
    done = run_cli(*args, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr

    storage = JournalStorage(JournalFileBackend(str(results_dir / "optuna.journal")))
    trials = optuna.load_study(study_name="quickstart", storage=storage).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]

    uri = f"sqlite:///{results_dir / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["quickstart"], output_format="list")
    trial_runs = [r for r in runs if "optuna.trial_number" in r.data.tags]
    assert len(trial_runs) == 2  # one run per trial, not one per rank
    client = MlflowClient(uri)
    for run in trial_runs:
        assert run.info.status == "FINISHED"
        assert run.data.tags["harness.devices_per_trial"] == "2"
        assert run.data.params["train.devices_per_trial"] == "2"
        assert run.data.tags["harness.threads"] == "1"
        val = client.get_metric_history(run.info.run_id, "val_acc")
        assert [m.step for m in val] == [1, 2]
        n_val = 5 * 30  # val_per_class x classes: the reduced accuracy counts every rank's
        assert all(abs(m.value * n_val - round(m.value * n_val)) < 1e-6 for m in val)
        trial = trials[int(run.data.tags["optuna.trial_number"])]
        assert trial.value == max(m.value for m in val)

    again = run_cli("reproduce", trial_runs[0].info.run_id, "--results", str(results_dir),
                    cwd=tmp_path, timeout=600)  # fmt: skip
    assert again.returncode == 0, again.stdout + again.stderr
    assert "x 2 data-parallel ranks" in again.stdout
    assert "bit for bit" in again.stdout

    from harness.reports.reproduce import reproduce
    from harness.tracking.runs import StudyOptions

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0})  # a one-core machine
    with pytest.raises(SpecError, match="ran on 2 devices .* only 1 CPU cores"):
        reproduce(trial_runs[0].info.run_id, StudyOptions(results=results_dir))


# --- Faults with real processes: a rank killed, the study stopped ----------------------------
def _rank_pids(pid: int) -> list[int]:
    """The spawned ranks among the children of process `pid` (not multiprocessing's tracker)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    out = []
    for child in children:
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_text()
        except OSError:
            continue
        if "spawn_main" in cmdline:
            out.append(int(child))
    return out


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


def _study_args(results, n_trials: int, *extra: str) -> list[str]:
    args = [str(QUICKSTART), "--n-trials", str(n_trials), "--results", str(results), "--quiet"]
    args += ["--devices-per-trial", "2"]
    for s in ("train.threads=1", "search.pruner=none", *extra):
        args += ["--set", s]
    return args


def _records(results):
    import mlflow
    import optuna
    from mlflow import MlflowClient

    from harness.study.search import open_storage

    storage = open_storage(str(results / "optuna.journal"))
    trials = optuna.load_study(study_name="quickstart", storage=storage).get_trials()
    uri = f"sqlite:///{results / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["quickstart"], output_format="list")
    runs = {r.info.run_id: r for r in runs if "optuna.trial_number" in r.data.tags}
    return trials, runs, MlflowClient(uri)


@pytest.mark.slow
def test_a_killed_rank_fails_its_trial_and_the_study_goes_on(results_dir):
    import subprocess
    import sys

    args = _study_args(results_dir, 2, *TINY, "search.flush_seconds=0")
    hold = results_dir.parent / "hold"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "run_study.py"), *args],
        cwd=results_dir.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=hold_env(hold, epoch=1),  # rank 0 holds after epoch 1, rank 1 waits for it
    )
    wait_held(hold, [proc])
    ranks = _rank_pids(proc.pid)
    killed = ranks[0] if ranks else None
    if killed is not None:
        os.kill(killed, signal.SIGKILL)
    release(hold)
    assert killed is not None, "no rank process appeared"
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    trials, runs, _client = _records(results_dir)
    states = [t.state.name for t in trials]
    assert states.count("FAIL") == 1 and states.count("COMPLETE") == 2, states
    failed = next(t for t in trials if t.state.name == "FAIL")
    assert "rank 1" in failed.user_attrs["harness.error"]
    run = runs[failed.user_attrs["mlflow_run_id"]]
    assert run.info.status == "FAILED" and run.data.tags["harness.fault"] == "rank"
    assert len(runs) == 3  # one run per trial, not per rank


@pytest.mark.slow
def test_sigterm_stops_every_rank_and_the_trial_resumes_on_two_ranks(results_dir):
    import subprocess
    import sys

    from harness.core.resume_state import load_state_file

    extra = ("model.pretrained=none", "data.shots_per_class=150", "data.val_per_class=20")
    extra += ("train.epochs=6",)
    args = _study_args(results_dir, 1, *extra, "search.flush_seconds=0")
    hold = results_dir.parent / "hold"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "run_study.py"), *args],
        cwd=results_dir.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=hold_env(hold, epoch=2),  # after the resume state of epoch 2
    )
    wait_held(hold, [proc])
    assert load_state_file(results_dir / "resume" / "quickstart" / "trial-0.pt")["epoch"] == 2
    ranks = _rank_pids(proc.pid)
    assert ranks, "no rank process seen"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode not in (0, None), out
    assert all(_gone(pid) for pid in ranks), "a rank outlived the study"

    again = run_cli(*args, cwd=results_dir.parent, timeout=600)
    assert again.returncode == 0, again.stderr
    trials, runs, client = _records(results_dir)
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    killed = runs[trials[0].user_attrs["mlflow_run_id"]]
    assert killed.info.status == "KILLED" and killed.data.tags["harness.fault"] == "interrupted"
    retry = runs[trials[1].user_attrs["mlflow_run_id"]]
    resumed = int(retry.data.tags["harness.resumed_from_epoch"])
    assert resumed >= 2 and retry.data.tags["harness.devices_per_trial"] == "2"
    steps = [m.step for m in client.get_metric_history(retry.info.run_id, "val_acc")]
    assert steps == list(range(resumed + 1, 7))


def test_a_hung_rank_fails_the_trial_after_the_timeout(monkeypatch):
    monkeypatch.setenv("HARNESS_DIST_TIMEOUT", "8")

    started = time.monotonic()  # SIGSTOP: the rank lives on but never answers a collective
    with pytest.raises(distributed.RankFailed, match="did not answer within 8 s"):
        _fit(_config(2, epochs=3), [_SignalRank1(signal.SIGSTOP)])
    assert time.monotonic() - started < 60
    assert _no_ranks_left()
