"""`run_study.py reproduce RUN_ID`: a trial re-run from its MLflow record alone matches it bit
for bit on the CPU; a differing value, a different data split and an unknown run are caught."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import mlflow
import optuna
import pytest
import torch
from conftest import QUICKSTART, REPO, TINY, run_cli
from mlflow import MlflowClient

import harness.reports.reproduce as reproduce_mod
import harness.study.search as study_mod
from harness.cli import main
from harness.config.load import load_spec
from harness.config.metrics import KINDS
from harness.reports import tolerance
from harness.study.search import StudyOptions, run_study


def _client(results) -> MlflowClient:
    uri = f"sqlite:///{results / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    return MlflowClient(uri)


def _trial_runs(client, study="quickstart") -> dict[int, object]:
    exp = client.get_experiment_by_name("quickstart")
    runs = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`optuna.study` = '{study}'", max_results=1000
    )
    return {int(r.data.tags["optuna.trial_number"]): r for r in runs}


def _reproductions(client, run_id: str) -> list:
    """The reproductions of a run, newest first."""
    exp = client.get_experiment_by_name("quickstart")
    return client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`harness.reproduces` = '{run_id}'",
        order_by=["attributes.start_time DESC"],
    )


@pytest.fixture(scope="module")
def study(tmp_path_factory, source_cache):
    """One tiny 3-epoch study: trial 0 (the baseline) COMPLETE, trials 1 and 2 PRUNED at epoch 2.

    Returns (results folder, {trial number: its MLflow run})."""
    results = tmp_path_factory.mktemp("reproduce") / "results"
    shutil.copytree(source_cache, results / "sources")
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            study_mod,
            "make_pruner",
            lambda s: optuna.pruners.ThresholdPruner(lower=1.5, n_warmup_steps=2),
        )
        spec = load_spec(QUICKSTART, [*TINY, "train.epochs=3"])
        run_study(spec, StudyOptions(results=results, n_trials=3, quiet=True))
    torch.set_num_threads(threads)
    runs = _trial_runs(_client(results))
    assert [runs[n].data.tags["optuna.state"] for n in sorted(runs)] == [
        "COMPLETE",
        "PRUNED",
        "PRUNED",
    ]
    assert runs[1].data.tags["harness.pruned_epoch"] == "2"
    return results, runs


@pytest.mark.parametrize(("number", "epochs"), [(0, 3), (1, 2)], ids=["complete", "pruned"])
def test_a_trial_reproduces_bit_for_bit_in_a_new_run(study, capsys, number, epochs):
    results, runs = study
    trial = runs[number]
    run_id = trial.info.run_id
    assert main(["reproduce", run_id, "--results", str(results)]) == 0
    out = capsys.readouterr().out
    assert f"reproduced: all {epochs} epochs match bit for bit" in out
    assert "<- differs" not in out
    for metric in KINDS["finetune"].epoch:  # every compared metric has a row per epoch
        assert sum(line.split()[1:2] == [metric] for line in out.splitlines()) == epochs

    client = _client(results)
    new = _reproductions(client, run_id)[0]
    tags = new.data.tags
    assert new.info.status == "FINISHED"
    assert new.info.run_name == f"reproduce-of-trial-{number}"
    assert "optuna.trial_number" not in tags  # not a trial run
    assert tags["harness.role"] == "reproduce"
    assert tags["harness.reproduce_result"] == "match"
    assert tags["mlflow.parentRunId"] == trial.data.tags["mlflow.parentRunId"]
    assert tags["harness.threads"] == trial.data.tags["harness.threads"]
    assert tags["harness.data_hash"] == trial.data.tags["harness.data_hash"]
    assert new.info.experiment_id == trial.info.experiment_id
    history = client.get_metric_history(new.info.run_id, "val_acc")
    assert [m.step for m in history] == list(range(1, epochs + 1))
    assert len(_trial_runs(client)) == 3  # still three trial runs


def test_a_differing_value_exits_1_naming_the_metric_and_epoch(study, capsys, monkeypatch):
    results, runs = study
    run_id = runs[2].info.run_id
    real = reproduce_mod.recorded_histories

    def one_ulp_off(client, run, keys):  # the record, with val_loss at epoch 2 one ulp higher
        histories = real(client, run, keys)
        histories["val_loss"][2] = math.nextafter(histories["val_loss"][2], math.inf)
        return histories

    monkeypatch.setattr(reproduce_mod, "recorded_histories", one_ulp_off)
    assert main(["reproduce", run_id, "--results", str(results)]) == 1
    out = capsys.readouterr().out
    verdict = out.strip().splitlines()[-1]
    assert verdict.startswith("differs: first at epoch 2, metric val_loss: recorded ")
    recorded, reproduced = verdict.split("recorded ")[1].split(", reproduced ")
    assert float(recorded) == math.nextafter(float(reproduced), math.inf)
    assert sum("<- differs" in line for line in out.splitlines()) == 1

    new = _reproductions(_client(results), run_id)[0]
    assert new.info.status == "FAILED"
    assert new.data.tags["harness.reproduce_result"] == "differs"
    assert new.data.tags["harness.reproduce_first_difference"] == verdict


def _perturbed(real, **relative):
    """recorded_histories, with each named metric's epoch-2 value moved by a relative amount
    (what another CPU's summation order does to the last digits)."""

    def histories(client, run, keys):
        out = real(client, run, keys)
        for key, amount in relative.items():
            out[key][2] = out[key][2] * (1 + amount)
        return out

    return histories


def test_another_cpu_model_reproduces_within_the_stated_tolerance(study, capsys, monkeypatch):
    """The middle verdict: recorded on another CPU model (its harness.cpu tag changed through
    MLflow's client), values a few parts in 1e6 apart: exit 0, `within_tolerance`, both machines
    named; the same differences on the recording CPU are `differs`."""
    results, runs = study
    run_id = runs[2].info.run_id
    client = _client(results)
    recorded_cpu = runs[2].data.tags["harness.cpu"]
    monkeypatch.setattr(
        reproduce_mod,
        "recorded_histories",
        _perturbed(reproduce_mod.recorded_histories, val_loss=3e-6, train_loss=-2e-6),
    )
    assert main(["reproduce", run_id, "--results", str(results)]) == 1  # same CPU: bit for bit
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("differs: first at epoch 2")

    client.set_tag(run_id, "harness.cpu", "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz")
    try:
        assert main(["reproduce", run_id, "--results", str(results)]) == 0
    finally:
        client.set_tag(run_id, "harness.cpu", recorded_cpu)
    out = capsys.readouterr().out
    verdict = out.strip().splitlines()[-1]
    assert verdict.startswith("reproduced within tolerance (rel 0.03, abs 0.001, accuracies ")
    threads = runs[2].data.tags["harness.threads"]
    kernels = runs[2].data.tags["harness.cpu_kernels"]
    assert (
        f"recorded on Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz [{kernels}], {threads} threads"
        in verdict
    )
    assert f"re-run on {recorded_cpu} [{kernels}], {threads} threads" in verdict
    assert "largest relative difference 3e-06 (val_loss, epoch 2)" in verdict
    new = _reproductions(client, run_id)[0]
    assert new.info.status == "FINISHED"
    assert new.data.tags["harness.reproduce_result"] == "within_tolerance"
    assert new.data.tags["harness.reproduce_largest_rel_difference"] == "3e-06"

    # beyond the tolerance on another CPU: differs, exit 1
    monkeypatch.setattr(
        reproduce_mod,
        "recorded_histories",
        _perturbed(reproduce_mod.recorded_histories, val_loss=0.2),
    )
    client.set_tag(run_id, "harness.cpu", "another CPU")
    try:
        assert main(["reproduce", run_id, "--results", str(results)]) == 1
    finally:
        client.set_tag(run_id, "harness.cpu", recorded_cpu)
    assert "differs: first at epoch 2, metric val_loss" in capsys.readouterr().out
    assert _reproductions(client, run_id)[0].data.tags["harness.reproduce_result"] == "differs"


@pytest.mark.slow
@pytest.mark.numerics
def test_a_rerun_on_another_kernel_path_is_within_the_cross_machine_tolerance(results_dir):
    """The same CPU on another code path (ATEN_CPU_CAPABILITY: default if this process runs
    vectorised, else the CPU's best) stands for another CPU model: `reproduce` names the two
    paths, says `within_tolerance` (not `match`, not `differs`), and every continuous value of
    a 10-epoch trial is within CROSS_MACHINE_REL. Its spread is noted for kernel_spread."""
    from recorded import THREADS, note_spread

    from harness.reports.tolerance import CROSS_MACHINE_REL, is_count_metric

    if torch.backends.cpu.get_cpu_capability() == "DEFAULT" and (
        "ATEN_CPU_CAPABILITY" not in os.environ
    ):
        pytest.skip("this CPU has no vectorised kernel path to compare with")
    threads = torch.get_num_threads()
    try:
        spec = load_spec(QUICKSTART, [*TINY, "train.epochs=10", f"train.threads={THREADS}"])
        run_study(spec, StudyOptions(results=results_dir, n_trials=1, quiet=True))
    finally:
        torch.set_num_threads(threads)
    (trial,) = _trial_runs(_client(results_dir)).values()
    here = torch.backends.cpu.get_cpu_capability()
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    if here != "DEFAULT":
        env["ATEN_CPU_CAPABILITY"] = "default"
    proc = subprocess.run(
        [sys.executable, str(REPO / "run_study.py"), "reproduce", trial.info.run_id]
        + ["--results", str(results_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    verdict = proc.stdout.strip().splitlines()[-1]
    client = _client(results_dir)
    new = _reproductions(client, trial.info.run_id)[0]
    assert new.data.tags["harness.cpu_kernels"] != trial.data.tags["harness.cpu_kernels"]
    if new.data.tags["harness.reproduce_result"] == "match":
        return  # this CPU computes the same bits on both paths: nothing to bound
    rel = CROSS_MACHINE_REL
    for key in KINDS["finetune"].epoch:
        if is_count_metric(key):
            continue
        old = {m.step: m.value for m in client.get_metric_history(trial.info.run_id, key)}
        now = {m.step: m.value for m in client.get_metric_history(new.info.run_id, key)}
        assert sorted(old) == sorted(now) == list(range(1, 11)), key
        for step in old:
            note_spread("reproduce:kernel_path", key, now[step], old[step])
            assert math.isclose(now[step], old[step], rel_tol=rel, abs_tol=1e-3), (key, step)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert verdict.startswith("reproduced within tolerance"), verdict
    assert f"[{trial.data.tags['harness.cpu_kernels']}]" in verdict


def test_the_cross_machine_tolerance_allows_one_example_on_accuracies():
    tol = tolerance.cross_machine_tolerance(50)
    assert tol.same(0.50, 0.52, "val_acc") and not tol.same(0.50, 0.5401, "val_acc")
    assert tol.same(0.1, 0.14, "overfit_gap")  # one example on each side of the gap
    assert not tol.same(1.0, 1.05, "val_loss") and tol.same(1.0, 1.029, "val_loss")
    assert tol.same(0.0, 9e-4, "overfit_gap_loss")  # a loss gap near 0: the absolute floor
    assert not tol.same(0.0, 2e-3, "overfit_gap_loss")
    assert not tolerance.EXACT.same(0.5, 0.52, "val_acc")


def test_code_and_version_changes_are_warned_about(study, capsys, monkeypatch):
    results, runs = study
    run = runs[2]
    changed = {"harness.git_commit": "0" * 40, "harness.version.torch": "1.0.0"}
    real = reproduce_mod._trial_run

    def with_old_provenance(client, run_id, uri):
        found = real(client, run_id, uri)
        found.data.tags.update(changed)
        return found

    monkeypatch.setattr(reproduce_mod, "_trial_run", with_old_provenance)
    assert main(["reproduce", run.info.run_id, "--results", str(results)]) == 0
    err = capsys.readouterr().err
    assert f"code differs from the record: harness.git_commit was {'0' * 40}" in err
    assert (
        f"torch differs from the record: harness.version.torch was 1.0.0, is {torch.__version__}"
        in err
    )


def test_a_different_data_split_is_refused_with_both_hashes(study, capsys):
    results, runs = study
    run_id = runs[0].info.run_id
    client = _client(results)
    recorded = runs[0].data.tags["harness.data_hash"]
    before = len(_reproductions(client, run_id))
    client.set_tag(run_id, "harness.data_hash", "f" * 16)
    try:
        assert main(["reproduce", run_id, "--results", str(results)]) == 2
    finally:
        client.set_tag(run_id, "harness.data_hash", recorded)
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "data split differs" in err
    assert "f" * 16 in err and recorded in err
    assert len(_reproductions(client, run_id)) == before  # refused before any run starts


def test_unknown_runs_and_stores_are_refused(study, capsys, tmp_path):
    results, runs = study
    assert main(["reproduce", "0123456789abcdef", "--results", str(results)]) == 2
    assert "no MLflow run '0123456789abcdef'" in capsys.readouterr().err
    parent = runs[0].data.tags["mlflow.parentRunId"]
    assert main(["reproduce", parent, "--results", str(results)]) == 2
    assert "is not a trial run (harness.role=study)" in capsys.readouterr().err
    empty = tmp_path / "nothing-here"
    assert main(["reproduce", runs[0].info.run_id, "--results", str(empty)]) == 2
    assert "no MLflow store at" in capsys.readouterr().err
    assert not empty.exists()  # nothing was created


def test_a_one_thread_trial_reproduces_from_another_thread_count(results_dir, capsys):
    threads = torch.get_num_threads()
    try:
        spec = load_spec(QUICKSTART, [*TINY, "train.threads=1"])
        run_study(spec, StudyOptions(results=results_dir, n_trials=1, quiet=True))
        (trial,) = _trial_runs(_client(results_dir)).values()
        assert trial.data.tags["harness.threads"] == "1"
        torch.set_num_threads(2)  # the tag, not the process's setting, decides
        assert main(["reproduce", trial.info.run_id, "--results", str(results_dir)]) == 0
        assert "reproduced: all 2 epochs match bit for bit" in capsys.readouterr().out
        assert torch.get_num_threads() == 2  # restored afterwards
        (new,) = _reproductions(_client(results_dir), trial.info.run_id)
        assert new.data.tags["harness.threads"] == "1"
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_reproduce_from_the_command_line(study, tmp_path):
    results, runs = study
    result = run_cli("reproduce", runs[1].info.run_id, "--results", str(results), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "reproduced: all 2 epochs match bit for bit" in result.stdout
    assert list(tmp_path.iterdir()) == []  # nothing written outside the results folder


def test_a_gpu_record_needs_a_gpu_and_sets_determinism_first(study, capsys, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    results, runs = study
    real = reproduce_mod._trial_run

    def on_gpu(client, run_id, uri):
        found = real(client, run_id, uri)
        found.data.tags["harness.device"] = "cuda (NVIDIA H100 80GB HBM3)"
        return found

    monkeypatch.setattr(reproduce_mod, "_trial_run", on_gpu)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seen = []
    real_available = torch.cuda.is_available

    def available():  # what was set by the time CUDA is first asked about
        seen.append(
            (
                os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
                torch.are_deterministic_algorithms_enabled(),
            )
        )
        return real_available()

    monkeypatch.setattr(torch.cuda, "is_available", available)
    assert main(["reproduce", runs[0].info.run_id, "--results", str(results)]) == 2
    assert "ran on cuda (NVIDIA H100 80GB HBM3); no CUDA device is visible here" in (
        capsys.readouterr().err
    )
    assert seen[0] == (":4096:8", True)
    assert not torch.are_deterministic_algorithms_enabled()  # restored


def test_compare_exactly_on_the_cpu_and_within_the_tolerance_on_a_gpu():
    recorded = {"val_loss": {1: 1.0, 2: float("nan")}, "phase": {1: 0.0, 2: 1.0}}
    reproduced = [{"val_loss": 1.0 + 1e-9, "phase": 0.0}, {"val_loss": float("nan")}]
    rows = {
        (r.epoch, r.metric): r for r in tolerance.compare(recorded, reproduced, 2, tolerance.EXACT)
    }
    assert not rows[1, "val_loss"].same  # one part in 1e9 is a difference on the CPU
    assert rows[2, "val_loss"].same  # NaN in both
    assert rows[1, "phase"].same and not rows[2, "phase"].same  # missing on one side
    assert rows[1, "train_acc"].recorded is None and rows[1, "train_acc"].same
    gpu = tolerance.GPU_TOLERANCE
    rows = {(r.epoch, r.metric): r for r in tolerance.compare(recorded, reproduced, 2, gpu)}
    assert rows[1, "val_loss"].same
    assert not gpu.same(0.5, 0.5 * (1 + 2e-4))
    assert gpu.describe() == "within tolerance (rel 0.0001, abs 1e-06)"


def test_a_resumed_trial_takes_its_earlier_epochs_from_the_attempt_it_retried(monkeypatch):
    def run(run_id, **tags):
        return SimpleNamespace(info=SimpleNamespace(run_id=run_id), data=SimpleNamespace(tags=tags))

    runs = {
        "first": run("first"),
        "second": run("second", **{"harness.retry_of": "first", "harness.resumed_from_epoch": "2"}),
    }
    steps = {
        "first": {"val_acc": {1: 0.1, 2: 0.2, 3: 0.99}},  # epoch 3 was never finished there
        "second": {"val_acc": {3: 0.3}},
    }
    monkeypatch.setattr(reproduce_mod.tracking, "find_run", lambda client, rid: runs.get(rid))
    monkeypatch.setattr(reproduce_mod.tracking, "metric_steps", lambda c, rid, keys: steps[rid])
    got = reproduce_mod.recorded_histories(None, runs["second"], ["val_acc"])
    assert got == {"val_acc": {1: 0.1, 2: 0.2, 3: 0.3}}


def test_a_source_model_missing_from_the_cache_comes_from_the_registry(study, capsys):
    results, runs = study
    trial = runs[1]
    assert trial.data.tags["harness.pretrained"].startswith("models:/source-")
    aside = results.parent / "sources-aside"
    (results / "sources").rename(aside)
    try:
        assert main(["reproduce", trial.info.run_id, "--results", str(results)]) == 0
        assert "reproduced: all 2 epochs match bit for bit" in capsys.readouterr().out
        assert not (results / "sources").exists()  # downloaded, not pretrained again
        assert list((results / "pretrained").rglob("*.pt"))
    finally:
        shutil.rmtree(results / "sources", ignore_errors=True)
        aside.rename(results / "sources")


@pytest.mark.slow
def test_a_copied_results_folder_works_alone_after_the_original_is_deleted(study, tmp_path):
    """MLflow records absolute artifact locations: the copy is relocated when opened, then
    `report --seeds 1` and `reproduce` run on it and write nothing outside it."""
    results, runs = study
    original = tmp_path / "original" / "results"
    shutil.copytree(results, original)  # a study of its own, made in `original`
    assert main(["report", "quickstart", "--results", str(original)]) == 0
    copy = tmp_path / "elsewhere" / "results"
    shutil.copytree(original, copy)
    shutil.rmtree(tmp_path / "original")
    work = tmp_path / "work"
    work.mkdir()
    rep = run_cli("report", "quickstart", "--results", str(copy), "--seeds", "1", cwd=work)
    assert rep.returncode == 0, rep.stdout + rep.stderr
    assert "results folder moved from" in rep.stderr
    again = run_cli("reproduce", runs[0].info.run_id, "--results", str(copy), cwd=work)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "reproduced: all 3 epochs match bit for bit" in again.stdout
    assert not (tmp_path / "original").exists()  # nothing written to the original's place
    assert list(work.iterdir()) == []
    client = MlflowClient(f"sqlite:///{copy / 'mlflow.db'}")
    exp = client.get_experiment_by_name("quickstart")
    assert exp.artifact_location.startswith((copy / "mlartifacts").resolve().as_uri())
    for run in client.search_runs([exp.experiment_id], max_results=1000):
        assert run.info.artifact_uri.startswith((copy / "mlartifacts").resolve().as_uri())
