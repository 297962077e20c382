"""Tests of the epoch kernel (harness.core.kernel) and of what it gives every core: meta_fit and
multitask_fit resumed from the state offered after an epoch equal the uninterrupted run bit for
bit on the CPU (as fit does, tests/test_resume.py), their states are plain trees that name their
config, and the kernel's own rules (the fallback when no epoch is finite, no checkpoint for an
epoch whose callback raised) on a toy core. The slow tests stop a meta-learning and a multi-task
study trial at its 2nd epoch with SIGTERM and check that the same command resumes it there."""

from __future__ import annotations

import math
import signal
import subprocess
import sys

import pytest
import torch
from conftest import REPO, hold_env, run_cli, wait_held
from test_resume import Checkpoints, Stop, plain_tree, same_tree
from torch import nn

from harness.config.spec import DataSpec, TrialConfig
from harness.core import kernel, meta, models, resume_state, shared
from harness.core import multitask as mt
from harness.core.resume_state import load_state_file
from harness.data import datasets as hdata

SPLIT = meta.DIGITS_SPLIT


def meta_config(**keys) -> TrialConfig:
    """4 meta-epochs of 6 episodes on the CPU, one thread; `keys` merged into `meta:`."""
    shape = {"meta_epochs": 4, "episodes_per_epoch": 6, "meta_batch_size": 4, "val_episodes": 6}
    tree = {"name": "k", "seed": 5, "task": {"kind": "meta"}, "meta": shape | {"queries": 3}}
    tree["meta"] |= keys
    tree |= {"model": {"pretrained": "none", "width": 8}}
    tree |= {"train": {"device": "cpu", "threads": 1}}
    return TrialConfig.model_validate(tree)


def mt_config(weighting: str, **train) -> TrialConfig:
    """The core reads train:, reg:, aug:, data.eval_train_max and multitask.weighting."""
    return TrialConfig.model_validate(
        {
            "name": "k",
            "seed": 2,
            "model": {"pretrained": "none", "width": 8},
            "train": {"epochs": 4, "device": "cpu", "lr": 0.05, "threads": 1, **train},
            "data": {"target_classes": list(range(10)), "shots_per_class": 20},
            "multitask": {"weighting": weighting},
            "aug": {"policy": "crop"},
            "reg": {"dropout": 0.2, "weight_decay": 0.001},
        }
    )


def small_model(config: TrialConfig, ways: int) -> models.ImageModel:
    shared.seed_everything(config.seed)
    return models.build_model(config.model, ways, config.reg.dropout)


@pytest.fixture(scope="module")
def pool():
    x, y, _, _ = meta.load_pool(DataSpec(), SPLIT)
    return x, y


@pytest.fixture(scope="module")
def digits() -> hdata.TaskData:
    return hdata.load_target(mt_config("fixed").data, seed=0)


def _check_resumed(straight, straight_cb, resumed, resumed_cb, model, stop: int, epochs: int):
    """The resumed run equals the uninterrupted one: every metric, the best epoch and its
    state, the weights it ends with, and the whole state after the last epoch."""
    assert resumed_cb.epochs == list(range(stop + 1, epochs + 1))  # only the new epochs
    assert resumed.history == straight.history
    assert resumed.best_epoch == straight.best_epoch and resumed.best == straight.best
    same_tree(resumed.best_state, straight.best_state)
    same_tree({k: v.detach().clone() for k, v in model.state_dict().items()}, straight.best_state)
    same_tree(resumed_cb.weights[epochs], straight_cb.weights[epochs])  # the last raw weights
    ends = [cb.states[epochs] | {"seconds": 0.0} for cb in (straight_cb, resumed_cb)]
    same_tree(*ends)
    assert resumed.seconds >= resumed_cb.states[epochs]["seconds"] > 0


META_CASES = {
    "protonet_cosine": {"meta_lr": 0.01, "schedule": "cosine"},
    "maml": {"algorithm": "maml", "inner_lr": 0.4, "inner_steps": 2},
    "fomaml_sgd": {"algorithm": "fomaml", "inner_steps": 1, "meta_optimizer": "sgd"},
    "reptile_cosine": {
        "algorithm": "reptile",
        "inner_steps": 2,
        "meta_optimizer": "sgd",
        "meta_lr": 0.5,
        "schedule": "cosine",
    },
}


@pytest.mark.parametrize("case", sorted(META_CASES))
def test_meta_fit_resumed_equals_uninterrupted(pool, tmp_path, case):
    config, stop = meta_config(**META_CASES[case]), 2
    model = small_model(config, 3)
    straight_cb = Checkpoints(model)
    straight = meta.meta_fit(config, model, *pool, SPLIT, [straight_cb])
    assert sorted(straight_cb.states) == [1, 2, 3, 4]

    path = tmp_path / "state.pt"
    interrupted = small_model(config, 3)
    with pytest.raises(Stop, match="after epoch 2"):
        meta.meta_fit(config, interrupted, *pool, SPLIT, [Checkpoints(interrupted, path, stop)])
    state = load_state_file(path)
    assert state.keys() == set(resume_state.COMMON) and state["epoch"] == stop
    plain_tree(state)

    model = small_model(config, 3)
    resumed_cb = Checkpoints(model)
    resumed = meta.meta_fit(config, model, *pool, SPLIT, [resumed_cb], resume=state)
    _check_resumed(straight, straight_cb, resumed, resumed_cb, model, stop, 4)


@pytest.mark.parametrize("weighting", ["fixed", "uncertainty"])
@pytest.mark.parametrize("stop", [1, 3])
def test_multitask_fit_resumed_equals_uninterrupted(digits, tmp_path, weighting, stop):
    config = mt_config(weighting, schedule="cosine", optimizer="adamw", lr=0.01)
    tasks = mt.digit_tasks(digits.classes)
    model = small_model(config, 10)
    straight_cb = Checkpoints(model)
    straight = mt.multitask_fit(config, model, tasks, digits, [straight_cb])

    path = tmp_path / "state.pt"
    interrupted = small_model(config, 10)
    with pytest.raises(Stop):
        mt.multitask_fit(config, interrupted, tasks, digits, [Checkpoints(interrupted, path, stop)])
    state = load_state_file(path)
    assert state.keys() == {*resume_state.COMMON, *resume_state.OWN["multitask"]}
    assert state["best_state"].keys() == {"model", "heads"} and "log_vars" in state["heads"]
    plain_tree(state)

    model = small_model(config, 10)
    resumed_cb = Checkpoints(model)
    resumed = mt.multitask_fit(config, model, tasks, digits, [resumed_cb], resume=state)
    _check_resumed(straight, straight_cb, resumed, resumed_cb, model, stop, 4)
    same_tree(resumed.heads.state_dict(), straight.heads.state_dict())  # the best epoch's heads
    if weighting == "uncertainty":  # the log-variances went on from the state's
        assert [m["digit_log_var"] for m in resumed.history] == [
            m["digit_log_var"] for m in straight.history
        ]


def test_a_state_of_another_config_or_kind_is_refused(pool, digits):
    config = meta_config(meta_epochs=2)
    model = small_model(config, 3)
    cb = Checkpoints(model)
    meta.meta_fit(config, model, *pool, SPLIT, [cb])
    other = meta_config(meta_epochs=2, meta_lr=0.01)
    with pytest.raises(ValueError, match=r"meta\.meta_lr"):
        meta.meta_fit(other, small_model(other, 3), *pool, SPLIT, resume=cb.states[1])
    mt_cfg = mt_config("fixed")
    with pytest.raises(ValueError, match=r"task\.kind"):
        mt.multitask_fit(
            mt_cfg, small_model(mt_cfg, 10), mt.digit_tasks(), digits, resume=cb.states[1]
        )
    with pytest.raises(ValueError, match="lacks"):  # a multitask state without its heads
        lacking = cb.states[1] | {"config": resume_state.config_key(mt_cfg)}
        mt.multitask_fit(mt_cfg, small_model(mt_cfg, 10), mt.digit_tasks(), digits, resume=lacking)
    done = meta.meta_fit(config, small_model(config, 3), *pool, SPLIT, resume=cb.states[2])
    assert done.history == cb.states[2]["history"]  # nothing left to train


# --- the kernel's own rules, on a toy core ---------------------------------------------------
def toy_setup(config: TrialConfig, values: list[float], log: list):
    """A linear model trained one SGD step an epoch; its val metric is `values[epoch - 1]`."""

    def setup(device) -> kernel.Core:
        model = nn.Linear(2, 1).to(device)
        optimizer = torch.optim.SGD([{"params": model.parameters(), "base_lr": 0.1}], lr=0.1)
        schedule = shared.Schedule(optimizer, config.train.schedule, config.train.epochs)
        generator = torch.Generator().manual_seed(config.seed)

        def train(epoch):
            x = torch.randn(8, 2, generator=generator)
            loss = model(x).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            schedule.set_lr()
            optimizer.step()
            schedule.step += 1
            return loss.detach(), optimizer.param_groups[0]["lr"]

        def measure(epoch, trained):
            loss, lr = trained
            return {"train_loss_running": loss.item(), "val_acc": values[epoch - 1], "lr": lr}

        def finish(kept):
            model.load_state_dict(kept)
            return {k: v.clone() for k, v in kept.items()}

        log.append(model)
        return kernel.Core(
            model,
            schedule,
            generator,
            config.train.epochs,
            train,
            measure,
            keep=lambda: shared.copy_state(model),
            finish=finish,
            close=lambda: log.append("closed"),
        )

    return setup


def toy_config(epochs: int = 3) -> TrialConfig:
    tree = {"name": "toy", "seed": 0, "train": {"epochs": epochs, "device": "cpu"}}
    return TrialConfig.model_validate(tree | {"train": tree["train"] | {"schedule": "cosine"}})


def test_no_finite_epoch_keeps_the_last_weights():
    config, log = toy_config(), []
    result = kernel.run(config, toy_setup(config, [math.nan] * 3, log))
    (model, closed) = log
    assert closed == "closed" and result.best_epoch == 3 and result.best == result.history[2]
    same_tree(result.best_state, {k: v.detach() for k, v in model.state_dict().items()})
    lrs = [m["lr"] for m in result.history]  # the schedule's lr at each epoch's first step
    assert lrs == [0.1 * shared.lr_factor("cosine", s, 3) for s in range(3)]


def test_kernel_keeps_the_best_epoch_and_checkpoints_only_epochs_that_reported():
    class RaiseAt2(Checkpoints):
        def on_epoch_end(self, epoch, metrics):
            super().on_epoch_end(epoch, metrics)
            if epoch == 2:
                raise Stop("pruned")

    config, log = toy_config(), []
    result = kernel.run(config, toy_setup(config, [0.2, 0.7, 0.7], log))
    assert result.best_epoch == 2  # the first of equal values
    log.clear()
    holder = nn.Linear(1, 1)
    cb = RaiseAt2(holder)
    with pytest.raises(Stop):
        kernel.run(config, toy_setup(config, [0.2, 0.7, 0.7], log), [cb])
    assert cb.epochs == [1, 2] and sorted(cb.states) == [1] and log[-1] == "closed"
    assert cb.states[1].keys() == set(resume_state.COMMON)


# --- a study trial stopped by SIGTERM resumes through the study ------------------------------
STUDIES = {
    "meta": (
        REPO / "experiments" / "digits_meta.yaml",
        "meta_val_acc",
        [
            "meta.meta_epochs=4",
            "meta.episodes_per_epoch=8",
            "meta.val_episodes=10",
            "meta.test_episodes=10",
            "meta.test_shots=[1]",
            "meta.algorithm=protonet",
            "search.enqueue=[]",  # else the retry waits behind the other enqueued trials
        ],
    ),
    "multitask": (
        REPO / "experiments" / "digits_multitask.yaml",
        "val_acc",
        ["train.epochs=4", "model.pretrained=none", "search.baseline=false"],
    ),
}
COMMON_SETS = ["model.width=8", "search.pruner=none", "search.flush_seconds=0"]


def _study_args(kind: str, results, study: str) -> list[str]:
    path, _, sets = STUDIES[kind]
    args = [str(path), "--n-trials", "1", "--results", str(results), "--quiet"]
    args += ["--study-name", study]
    for s in (*COMMON_SETS, *sets):
        args += ["--set", s]
    return args


def _curves(results, study: str, metric: str) -> list[tuple[dict, dict]]:
    """Per run of `study` (by start): (its tags, {step: value} of `metric`)."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    runs = [
        r
        for e in client.search_experiments()
        for r in client.search_runs([e.experiment_id])
        if r.data.tags.get("optuna.study") == study
    ]
    runs.sort(key=lambda r: r.info.start_time)
    return [
        (
            r.data.tags | {"status": r.info.status},
            {m.step: m.value for m in client.get_metric_history(r.info.run_id, metric)},
        )
        for r in runs
    ]


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(STUDIES))
def test_sigterm_at_epoch_2_then_the_same_command_resumes_there(tmp_path, kind):
    results, metric = tmp_path / "results", STUDIES[kind][1]
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "run_study.py"), *_study_args(kind, results, "s")],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=hold_env(tmp_path / "hold", epoch=2),
    )
    (held,) = wait_held(tmp_path / "hold", [proc])
    state = load_state_file(results / "resume" / "s" / f"trial-{held['trial']}.pt")
    assert state["epoch"] == held["written_upto"] >= 2
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    again = run_cli(*_study_args(kind, results, "s"), cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    (dead_tags, dead), (retry_tags, retry) = _curves(results, "s", metric)
    assert dead_tags["status"] == "KILLED" and dead_tags["harness.fault"] == "interrupted"
    assert retry_tags["status"] == "FINISHED"
    assert retry_tags["harness.resume"].startswith("resumed from epoch ")  # where it came from
    resumed = int(retry_tags["harness.resumed_from_epoch"])
    assert resumed >= 2
    assert sorted(dead) == list(range(1, resumed + 1))
    assert sorted(retry) == list(range(resumed + 1, 5))  # the curve goes on from there
    assert list((results / "resume" / "s").glob("*")) == []  # no state left behind
    # and equals the same trial run straight
    straight = tmp_path / "straight"
    proc = run_cli(*_study_args(kind, straight, "t"), cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ((_, whole),) = _curves(straight, "t", metric)
    assert dead | retry == whole
