"""Warm start against a cold start: does a study of `digits_regularization` find better models
sooner when its sampler starts from a finished study of the quickstart space?

    python benchmarks/warm_bench.py [--results DIR] [--seeds 0,1,2] [--n-trials 30]
        [--source-trials 30] [--epochs N]

1. `run_study.py experiments/quickstart.yaml --n-trials SOURCE_TRIALS` (seed 0) into
   DIR/source: the earlier study.
2. For each seed S: `run_study.py experiments/digits_regularization.yaml --set seed=S` cold
   (study cold-S) and warm-started from `quickstart@DIR/source` (study warm-S), each
   N trials, into DIR/runs, every trial's weights kept (`search.keep_checkpoints=all`, no soup).
   The seed sets the sampler and the data split: seeds 1 and 2 split the digits otherwise than
   the source study did (the warm report says so).
3. After 10, 20 and N of each study's own finished trials: the best val_acc so far, and the
   test_acc of that trial (`harness.study.finish.test_once`: its kept weights tested once).

Prints a Markdown table (mean over seeds, and each seed) and machine-readable lines. Run by
hand, never as a timed test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from optuna.trial import TrialState

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _run(argv: list[str]) -> None:
    from harness import cli

    started = time.monotonic()
    code = cli.main(argv)
    print(f"  ({time.monotonic() - started:.0f} s) exit {code}: {' '.join(argv[:1] + argv[-6:])}")
    if code != 0:
        raise SystemExit(f"run_study.py {' '.join(argv)} exited {code}")


def _points(results: Path, name: str, checkpoints: list[int]) -> dict[int, tuple]:
    """{k: (best val_acc, its trial's test_acc, trial number)} after k own finished trials."""
    import optuna

    from harness.config.metrics import rank_key
    from harness.reports.report import own_trials
    from harness.study.finish import test_once
    from harness.study.storage import open_storage
    from harness.tracking import store as tracking

    storage = open_storage(str(results / "optuna.journal"))
    study = optuna.load_study(study_name=name, storage=storage)
    client = tracking.connect(tracking.default_tracking_uri(results))
    finished = [t for t in own_trials(study) if t.state.name in ("COMPLETE", "PRUNED")]
    finished.sort(key=lambda t: t.datetime_complete)
    out = {}
    for k in checkpoints:
        complete = [t for t in finished[:k] if t.state.name == "COMPLETE"]
        best = min(  # the harness's own order: the objective, then its tie rule
            complete, key=lambda t: rank_key(t.value, t.user_attrs, t.number, "val_acc", True)
        )
        test = test_once(client, results, name, best) or {}
        out[k] = (best.value, test.get("test_acc", float("nan")), best.number)
    return out


def _done(results: Path, name: str, n: int) -> bool:
    """Whether study `name` has `n` own finished trials already (a rerun only reads it)."""
    import optuna

    from harness.reports.report import own_trials
    from harness.study.storage import open_storage

    journal = results / "optuna.journal"
    if not journal.is_file():
        return False
    storage = open_storage(str(journal))
    if name not in [s.study_name for s in optuna.get_all_study_summaries(storage, False)]:
        return False
    study = optuna.load_study(study_name=name, storage=storage)
    return len(own_trials(study, (TrialState.COMPLETE, TrialState.PRUNED))) >= n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=Path("/tmp/warm-bench"))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--n-trials", type=int, default=30)
    p.add_argument("--source-trials", type=int, default=30)
    p.add_argument("--runs", help="the studies' folder under --results (default: runs)")
    p.add_argument("--epochs", type=int, help="train.epochs of every study (default: the files')")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    checkpoints = sorted({k for k in (10, 20, args.n_trials) if k <= args.n_trials})
    extra = ["--quiet"] + (["--set", f"train.epochs={args.epochs}"] if args.epochs else [])
    source = args.results / "source"
    if not (source / "optuna.journal").is_file():
        _run(
            [str(REPO / "experiments" / "quickstart.yaml"), "--results", str(source)]
            + ["--n-trials", str(args.source_trials), *extra]
        )
    runs = args.results / (args.runs or "runs")
    keep = ["--set", "search.keep_checkpoints=all", "--set", "search.soup=none"]
    table: dict[str, dict[int, dict[int, tuple]]] = {"cold": {}, "warm": {}}
    for seed in seeds:
        for mode in ("cold", "warm"):
            name = f"{mode}-{seed}"
            argv = [str(REPO / "experiments" / "digits_regularization.yaml")]
            argv += ["--results", str(runs), "--study-name", name, "--n-trials", str(args.n_trials)]
            argv += ["--set", f"seed={seed}", *keep, *extra]
            if mode == "warm":
                argv += ["--warm-start", f"quickstart@{source}"]
            if not _done(runs, name, args.n_trials):
                _run(argv)
            table[mode][seed] = _points(runs, name, checkpoints)
            print(
                f"  {name}: "
                + ", ".join(f"{k}: {v[0]:.4f}/{v[1]:.4f}" for k, v in table[mode][seed].items()),
                flush=True,
            )
    print(f"\n| trials | start | best val_acc (mean of {len(seeds)} seeds) | its test_acc ", end="")
    print("| per seed (val / test) |")
    print("|---:|---|---:|---:|---|")
    for k in checkpoints:
        for mode in ("cold", "warm"):
            vals = [table[mode][s][k][0] for s in seeds]
            tests = [table[mode][s][k][1] for s in seeds]
            each = ", ".join(f"{v:.3f} / {t:.3f}" for v, t in zip(vals, tests, strict=True))
            print(
                f"| {k} | {mode} | {statistics.fmean(vals):.4f} | {statistics.fmean(tests):.4f} "
                f"| {each} |"
            )
    for mode in ("cold", "warm"):
        for s in seeds:
            for k in checkpoints:
                val, test, number = table[mode][s][k]
                print(f"{mode}_seed{s}_at{k} val_acc={val:.4f} test_acc={test:.4f} trial={number}")


if __name__ == "__main__":
    main()
