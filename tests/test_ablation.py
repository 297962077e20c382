"""`report STUDY --ablate`: leave-one-out and add-one-in variants of the best trial over seeds,
paired intervals, verdicts, reuse of earlier runs, the plot, and refusals of bad input."""

from __future__ import annotations

import math
import re

import pytest
from conftest import QUICKSTART, TINY

from harness import cli
from harness.config.spec import ParamSpec, SpecError
from harness.core import tasks
from harness.reports import ablation, stats, variants
from harness.reports.stats import Effect, paired, verdict
from harness.reports.variants import Group

# A space whose only non-baseline trial is known in advance: lr 0.03 (the baseline's 0.001) and
# partial fine-tuning with its conditional child freeze_stages 2 (the baseline: full, 1).
SPACE = """\
search:
  n_trials: 2
  pruner: none
  space:
    strategy.kind: {categorical: [partial]}
    strategy.freeze_stages: {categorical: [2], when: {strategy.kind: partial}}
    train.lr: {categorical: [0.03]}
"""


def _experiment(tmp_path, name: str = "ablate-test") -> str:
    text = QUICKSTART.read_text().split("\nsearch:")[0].replace("name: quickstart", f"name: {name}")
    path = tmp_path / f"{name}.yaml"
    path.write_text(text + "\n" + SPACE)
    return str(path)


def _run(results, experiment: str, *extra: str) -> int:
    args = [experiment, "--results", str(results), "--quiet", *extra]
    for s in TINY:
        args += ["--set", s]
    return cli.main(args)


def _ablation_runs(results, name: str = "ablate-test"):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{results / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=[name], output_format="list")
    return [r for r in runs if r.data.tags.get("harness.role") == "ablation"]


# --- Statistics, by hand. ---
def test_paired_interval_matches_a_hand_computation():
    a, b = [0.80, 0.85, 0.90], [0.70, 0.80, 0.80]
    e = paired(a, b)
    # differences 0.10, 0.05, 0.10: mean 0.083333, sample sd 0.028868, t(0.975, 2) = 4.302653:
    sd = math.sqrt(((0.1 - 0.25 / 3) ** 2 * 2 + (0.05 - 0.25 / 3) ** 2) / 2)
    assert e.n == 3
    assert e.mean == pytest.approx(0.25 / 3)
    assert e.half == pytest.approx(4.302652729911275 * sd / math.sqrt(3))
    assert e.half == pytest.approx(0.071711, abs=1e-6)
    assert stats.t_quantile(4) == pytest.approx(2.776445105)
    assert verdict(e, "val_acc") == "helps: +8.3 ± 7.2 pt"
    assert verdict(paired(b, a), "test_acc") == "hurts: -8.3 ± 7.2 pt"
    noisy = paired([0.8, 0.7, 0.9], [0.75, 0.8, 0.8])
    assert verdict(noisy, "val_acc").startswith("no effect distinguishable from seed noise (+")
    # a metric that is better lower: a negative difference helps; no percentage points
    assert verdict(Effect(-0.02, 0.01, 5), "overfit_gap") == "helps: -0.0200 ± 0.0100"
    assert "one seed" in verdict(paired([0.9], [0.8]), "val_acc")


def test_conditional_keys_move_with_their_parent():
    space = {
        "strategy.kind": ParamSpec(categorical=["full", "lp_ft"]),
        "strategy.lp_epochs": ParamSpec(int=[2, 8], when={"strategy.kind": "lp_ft"}),
        "strategy.ft_lr_scale": ParamSpec(float=[0.05, 1.0], when={"strategy.kind": "lp_ft"}),
        "aug.policy": ParamSpec(categorical=["none", "randaugment"]),
        "aug.magnitude": ParamSpec(int=[3, 15], when={"aug.policy": "randaugment"}),
        "train.lr": ParamSpec(float=[1e-4, 1e-1], log=True),
        "reg.dropout": ParamSpec(float=[0.0, 0.5]),
    }
    best = {
        "strategy.kind": "lp_ft",
        "strategy.lp_epochs": 5,
        "strategy.ft_lr_scale": 0.1,  # the default: equal, not part of the group
        "aug.policy": "none",
        "aug.magnitude": 12,  # its parent equals the baseline's: a choice of its own
        "train.lr": 0.01,
        "reg.dropout": 0.0,
    }
    base = {**best, "strategy.kind": "full", "strategy.lp_epochs": 2, "aug.magnitude": 9}
    base["train.lr"] = 0.001
    gs = variants.groups(best, base, variants.parents_of(space), list(space))
    assert gs == [
        Group(("strategy.kind", "strategy.lp_epochs"), ("lp_ft", 5), ("full", 2)),
        Group(("aug.magnitude",), (12,), (9,)),
        Group(("train.lr",), (0.01,), (0.001,)),
    ]
    assert gs[0].label() == "strategy.kind=lp_ft (+ strategy.lp_epochs=5)  [baseline: full, 2]"


def test_nothing_to_ablate_is_an_input_error():
    with pytest.raises(SpecError, match="no complete trial"):
        ablation.plan(None, "", None, None)


# --- End to end, in process. ---
@pytest.mark.slow
def test_report_ablate_trains_tags_reuses_and_plots(tmp_path, results_dir, monkeypatch, capsys):
    experiment = _experiment(tmp_path)
    assert _run(results_dir, experiment) == 0
    capsys.readouterr()
    report = ["report", "ablate-test", "--results", str(results_dir), "--ablate"]
    assert cli.main([*report, "--seeds", "2"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out

    runs = _ablation_runs(results_dir)
    # 2 groups: lr, and strategy.kind with its child freeze_stages. loo:strategy.kind is the
    # config of add:train.lr (and loo:train.lr that of add:strategy.kind): 4 configs x 2 seeds
    assert len(runs) == 8
    assert all(r.info.status == "FINISHED" for r in runs)
    names = {r.data.tags["harness.ablation"] for r in runs}
    assert names == {"best", "baseline", "loo:strategy.kind", "add:strategy.kind"}
    best_run = {r.data.tags["harness.ablation_of"] for r in runs}
    assert len(best_run) == 1
    parent = {r.data.tags["mlflow.parentRunId"] for r in runs}
    assert len(parent) == 1
    for r in runs:
        assert r.data.tags["harness.seed_index"] in ("0", "1")
        assert int(r.data.params["seed"]) == 1 + int(r.data.tags["harness.seed_index"])
        assert "best_val_acc" in r.data.metrics and "test_acc" in r.data.metrics
        assert "after selection" in r.data.tags["harness.test"]
    by = {
        (r.data.tags["harness.ablation"], r.data.tags["harness.seed_index"]): r.data for r in runs
    }
    assert by[("loo:strategy.kind", "0")].params["strategy.kind"] == "full"
    assert by[("loo:strategy.kind", "0")].params["strategy.freeze_stages"] == "1"
    assert by[("loo:strategy.kind", "0")].params["train.lr"] == "0.03"
    assert by[("add:strategy.kind", "0")].params["strategy.freeze_stages"] == "2"
    assert by[("add:strategy.kind", "0")].params["train.lr"] == "0.001"
    assert len({r.data.params["data.split_seed"] for r in runs}) == 1
    # the starting weights of the trials (the source model pretrained under the study's seed)
    import mlflow

    trials = mlflow.search_runs(experiment_names=["ablate-test"], output_format="list")
    starts = {
        r.data.tags["harness.pretrained"] for r in trials if "optuna.trial_number" in r.data.tags
    }
    assert len(starts) == 1
    assert {r.data.tags["harness.pretrained"] for r in runs} == starts

    # the table: the hand-computed interval of best vs baseline on val_acc
    diffs = [
        by[("best", i)].metrics["best_val_acc"] - by[("baseline", i)].metrics["best_val_acc"]
        for i in ("0", "1")
    ]
    mean = sum(diffs) / 2
    half = 12.706204736174707 * abs(diffs[0] - diffs[1]) / math.sqrt(2) / math.sqrt(2)
    assert f"{mean * 100:+.1f} ± {half * 100:.1f} pt" in out
    assert "strategy.kind=partial (+ strategy.freeze_stages=2)  [baseline: full, 1]" in out
    assert "train.lr=0.03  [baseline: 0.001]" in out
    assert "(the same config as loo:strategy.kind)" in out
    assert "8 of 8 runs trained by this call" in out
    assert "In short, each choice left out of the best recipe, on test_acc:" in out
    assert re.search(r"without it\s+val_acc", out) and re.search(r"alone\s+test_acc", out)

    folder = results_dir / "reports" / "ablate-test"
    assert "ablation.png" in (folder / "report.md").read_text()
    assert "Ablation of the best trial" in (folder / "report.md").read_text()
    _assert_not_blank(folder / "ablation.png")

    # a second call trains nothing; a larger N trains only the missing seeds
    def refuse(*args, **kwargs):
        raise AssertionError("trained again")

    with monkeypatch.context() as m:
        m.setattr(tasks, "train", refuse)
        assert cli.main([*report, "--seeds", "2"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"{mean * 100:+.1f} ± {half * 100:.1f} pt" in out and "0 of 8 runs trained" in out
    assert len(_ablation_runs(results_dir)) == 8
    assert cli.main([*report, "--seeds", "3"]) == 0
    runs = _ablation_runs(results_dir)
    assert len(runs) == 12
    assert {r.data.tags["harness.seed_index"] for r in runs} == {"0", "1", "2"}


def _assert_not_blank(path) -> None:
    import matplotlib.image

    pixels = matplotlib.image.imread(path)[..., :3]
    share = (pixels.min(axis=-1) < 0.9).mean()
    assert share > 0.02, f"{path} looks blank ({share:.3f} of its pixels are not white)"


@pytest.mark.slow
def test_ablate_refuses_bad_input(tmp_path, results_dir, monkeypatch, capsys):
    experiment = _experiment(tmp_path)
    assert _run(results_dir, experiment, "--n-trials", "1") == 0  # the baseline alone
    capsys.readouterr()
    monkeypatch.setattr(tasks, "train", lambda *a, **k: pytest.fail("trained"))
    report = ["report", "ablate-test", "--results", str(results_dir), "--ablate"]
    assert cli.main(report) == 2
    assert "the best trial is the baseline (trial 0): nothing to ablate" in capsys.readouterr().err
    assert cli.main([*report, "--seeds", "1"]) == 2
    assert "at least 2 seeds" in capsys.readouterr().err
    assert _ablation_runs(results_dir) == []


def test_a_multitask_best_ablates_its_auxiliary_tasks_as_one_choice(monkeypatch):
    from harness.config.load import load_spec
    from harness.config.spec import baseline_config, trial_config
    from harness.reports.report import TrialRow
    from harness.tracking import runs
    from harness.tracking import store as tracking

    spec = load_spec(QUICKSTART.parent / "digits_multitask.yaml")
    values = {"multitask.weighting": "fixed", "multitask.tasks.parity.weight": 0.9}
    values |= {"train.lr": 0.01, "aug.policy": "none"}
    best, base = trial_config(spec, values), baseline_config(spec)
    space = tracking.yaml_text(spec.model_dump(mode="json", by_alias=True)["search"]["space"])
    records = {
        "best": ({}, {"harness.sampled": ",".join(values)}),
        "p": ({"search.space": space}, {}),
    }
    monkeypatch.setattr(runs, "load_config", {"best": best, "base": base}.__getitem__)
    monkeypatch.setattr(tracking, "run_record", lambda client, run_id: records[run_id])
    row = lambda n, run, b: TrialRow(n, "COMPLETE", 0.9, b, {}, {"mlflow_run_id": run})  # noqa: E731
    ab = ablation.plan(None, "p", row(3, "best", False), row(0, "base", True))
    assert [g.keys for g in ab.groups] == [
        ("task.kind", "multitask.tasks.parity.weight"),
        ("train.lr",),
    ]
    by = {v.name: v.config for v in ab.variants}
    assert by["loo:task.kind"].task.kind == "finetune" and by["loo:task.kind"].train.lr == 0.01
    assert by["add:task.kind"].task.kind == "multitask" and by["add:task.kind"].train.lr == 0.001
    assert by["add:task.kind"].multitask.tasks["parity"].weight == 0.9
    assert {v.config.data.split_seed for v in ab.variants} == {best.split_seed}
    assert any("train.schedule=cosine" in note for note in ab.notes)  # outside the search


def test_table_sorts_by_effect_and_says_what_was_not_run(tmp_path):
    gs = [Group(("train.lr",), (0.01,), (0.001,)), Group(("reg.dropout",), (0.3,), (0.0,))]
    names = ["best", "baseline", "loo:train.lr", "add:train.lr", "loo:reg.dropout"]
    vs = [variants.Variant(n, object()) for n in names]
    vs.append(variants.Variant("add:reg.dropout", None, error="refused: a bad combination"))
    ab = ablation.Ablation(7, 0, "run", [1, 2, 3], gs, vs, "val_acc", "test_acc")
    values = {  # best - loo: lr +0.20 (steady), dropout +0.00 +-0.01
        "best": [0.90, 0.91, 0.92],
        "baseline": [0.60, 0.62, 0.61],
        "loo:train.lr": [0.70, 0.71, 0.72],
        "add:train.lr": [0.80, 0.83, 0.81],
        "loo:reg.dropout": [0.91, 0.90, 0.92],
    }
    ab.values = {k: {"best_val_acc": v, "test_acc": v} for k, v in values.items()}
    text = ab.table()
    assert text.index("train.lr=0.01  [baseline: 0.001]") < text.index("reg.dropout=0.3")
    assert "without it  val_acc                helps: +20.0 ± 0.0 pt" in text
    assert "alone       test_acc               not run: add:reg.dropout: refused" in text
    assert "  it helps: train.lr\n  no effect distinguishable from seed noise: reg.dropout" in text
    _assert_not_blank(ab.plot(tmp_path / "ablation.png"))
