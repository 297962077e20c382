"""What a person reads: the study's progress while it runs, and the table of best trials after.

Plain data in, text out: the study module turns Optuna trials into `TrialRow`s.
"""

from __future__ import annotations

import shlex
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from harness.config.metrics import KINDS, best_name, rank_key
from harness.config.tags import Tag
from harness.reports import comparisons


def kind_of(values: dict[str, Any]) -> str:
    """A trial's kind as far as its metrics tell: meta-learning's are named meta_*."""
    return "meta" if KINDS["meta"].headline[0] in values else "finetune"


def headline(attrs: dict[str, Any]) -> tuple[str, str]:
    """(accuracy, gap) of a trial, by its kind (harness.config.metrics)."""
    return KINDS[kind_of(attrs)].headline


def best_per_algorithm(rows: list[TrialRow]) -> list[TrialRow]:
    """A meta-learning study that searches `meta.algorithm`: each algorithm's best trial
    (`rows` best first), meta-tested once so that the report compares the algorithms."""
    best: dict[str, TrialRow] = {}
    for t in rows:
        algorithm = t.params.get("meta.algorithm")
        if algorithm is not None and kind_of(t.attrs) == "meta":
            best.setdefault(algorithm, t)
    return list(best.values())


@dataclass(frozen=True)
class TrialRow:
    number: int
    state: str  # COMPLETE, PRUNED, FAIL, RUNNING, WAITING
    value: float | None
    baseline: bool
    params: dict[str, Any]
    attrs: dict[str, Any]


@dataclass(frozen=True)
class Summary:
    study_name: str
    direction: str  # maximize / minimize
    trials: list[TrialRow]
    opts: Any  # StudyOptions: where the stores are
    test: dict[int, dict[str, float]] = field(default_factory=dict)  # trial -> test metrics
    seeds: dict[int, dict[str, tuple]] = field(default_factory=dict)  # trial -> (mean, std, n)
    files: list[Path] = field(default_factory=list)  # the written report (report.md first)
    pareto: set[int] = field(default_factory=set)  # multi-objective: the Pareto front
    objectives: tuple[str, ...] = ()
    ui_url: str = ""  # the study's runs table in the MLflow UI that `ui` starts
    classical: list = field(default_factory=list)  # harness.reports.classical.Reference, same split
    ablation: str = ""  # report --ablate: the ablation's table (harness.reports.ablation)
    soups: Any = None  # harness.study.soups.Soups: the study's model soups
    comparisons: list = field(default_factory=list)  # reports.comparisons.Claim: paired claims
    notes: tuple[str, ...] = ()  # what the reader must know first (a warm start, its data)

    def study_metrics(self) -> dict[str, float]:
        """The study's summary, as its parent run's metrics: trial counts, the best value, the
        baseline's, the gain over it (and the best trial's test metrics where measured)."""
        counts = self.counts()
        out = {
            "trials_complete": counts.get("COMPLETE", 0),
            "trials_pruned": counts.get("PRUNED", 0),
            "trials_failed": counts.get("FAIL", 0),
            "trials_retried": counts.get("RETRIED", 0),
        }
        name = self.objectives[0] if self.objectives else "objective"
        complete, base = self.complete(), self.baseline()
        if complete:
            out[best_name(name)] = complete[0].value
            out["best_trial"] = complete[0].number
            out |= {best_name(k): v for k, v in self.test.get(complete[0].number, {}).items()}
        if base is not None:
            out[f"baseline_{name}"] = base.value
            if complete:
                out["gain_over_baseline"] = complete[0].value - base.value
        return out

    def complete(self) -> list[TrialRow]:
        """The complete trials, best first, by `metrics.TIE_RULE`."""
        rows = [t for t in self.trials if t.state == "COMPLETE" and t.value is not None]
        objective = self.objectives[0] if self.objectives else "val_acc"
        maximize = self.direction == "maximize"
        return sorted(rows, key=lambda t: rank_key(t.value, t.attrs, t.number, objective, maximize))

    def baseline(self) -> TrialRow | None:
        return next((t for t in self.trials if t.baseline and t.state == "COMPLETE"), None)

    def counts(self) -> dict[str, int]:
        """Trials by state; an attempt that was interrupted (a signal, a dead process, the
        environment) and re-queued counts as RETRIED, not FAIL: it did not fail for good."""
        retried = {t.attrs.get(Tag.RETRY_OF) for t in self.trials}
        counts: dict[str, int] = {}
        for t in self.trials:
            state = "RETRIED" if t.state == "FAIL" and t.number in retried else t.state
            counts[state] = counts.get(state, 0) + 1
        return counts


def own_trials(study, states=None) -> list:
    """The study's own trials (of `states`): those handed over by a warm start
    (`Tag.WARM_START`, `harness.study.warm`) guide its sampler but are not its trials."""
    trials = study.get_trials(deepcopy=False, states=states)
    return [t for t in trials if Tag.WARM_START not in t.user_attrs]


def pareto_front(trials: list, directions) -> list:
    """The complete trials (FrozenTrials) that no other of `trials` dominates."""
    signs = [1.0 if d.name == "MAXIMIZE" else -1.0 for d in directions]
    points = [(t, [s * v for s, v in zip(signs, t.values, strict=True)]) for t in trials]

    def dominated(p: list) -> bool:
        return any(all(a >= b for a, b in zip(q, p, strict=True)) and q != p for _, q in points)

    return [t for t, p in points if not dominated(p)]


def best_trial(study):
    """A single-objective study's best complete trial by `metrics.TIE_RULE` (Optuna's own
    `best_trial` breaks ties otherwise); None when none is complete."""
    maximize = study.directions[0].name == "MAXIMIZE"
    objective = (study.user_attrs.get(Tag.OBJECTIVES) or ["val_acc"])[0]
    complete = [t for t in own_trials(study) if t.state.name == "COMPLETE"]
    return min(
        (t for t in complete if t.values),
        key=lambda t: rank_key(t.values[0], t.user_attrs, t.number, objective, maximize),
        default=None,
    )


class Progress:
    """The study's progress: finished trials out of the budget, and the best value so far.

    On a terminal: a bar, with the running trial's epoch in its description (one line,
    updated in place) and a line per finished trial above it. Elsewhere (logs, CI): only
    the per-trial lines. `quiet`: nothing.
    """

    def __init__(self, total: int, done: int, quiet: bool = False, bar: bool = True):
        self.total, self.done, self.quiet = total, done, quiet
        self.bar = None
        if bar and not quiet and sys.stdout.isatty():
            self.bar = tqdm(total=total, initial=done, unit="trial", dynamic_ncols=True)

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        elif not self.quiet:
            print(text, flush=True)

    def epoch_line(
        self, trial_number: int, epochs: int, keys: tuple[str, str] = KINDS["finetune"].headline
    ):
        bar = self.bar
        acc, gap = keys

        class _Line:
            def on_epoch_end(self, epoch: int, m: dict[str, float]) -> None:
                if bar is not None:
                    bar.set_description(
                        f"trial {trial_number} epoch {epoch}/{epochs} {acc} {m[acc]:.3f} "
                        f"gap {m[gap]:+.3f}"
                    )

        return _Line()

    def on_trial_end(self, study, trial) -> None:  # an Optuna study callback
        state = trial.state.name
        if state in ("COMPLETE", "PRUNED"):
            self.done += 1
            if self.bar is not None:
                self.bar.update(1)
        a = trial.user_attrs
        line = f"[{self.done}/{self.total}] trial {trial.number} {state}"
        acc, gap = headline(a)
        if acc in a:
            line += f" {acc} {a[acc]:.4f} {gap} {a[gap]:+.4f}"
        if a.get(Tag.ERROR):
            line += f": {a[Tag.ERROR][:200]}"
        if a.get(Tag.PRUNED_EPOCH):
            line += f" at epoch {a[Tag.PRUNED_EPOCH]}"
        if a.get(Tag.BASELINE):
            line += " (baseline)"
        if len(study.directions) > 1:
            complete = [t for t in own_trials(study) if t.state.name == "COMPLETE"]
            front = pareto_front(complete, study.directions)
            line += f"  Pareto front: {len(front)} trials"
        elif (best := best_trial(study)) is not None:
            line += f"  best {best.value:.4f} (trial {best.number})"
            if self.bar is not None:
                self.bar.set_postfix_str(f"best {best.value:.4f}")
        self.note(line)

    def set_done(self, done: int, study=None) -> None:
        """The whole study's finished trials (other processes' included)."""
        if done > self.done:
            if self.bar is not None:
                self.bar.update(done - self.done)
            elif not self.quiet:
                best = ""
                top = (
                    best_trial(study) if study is not None and len(study.directions) == 1 else None
                )
                if top is not None:
                    best = f"  best {top.value:.4f} (trial {top.number})"
                print(f"[{done}/{self.total}] finished{best}", flush=True)
            self.done = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


WIDTH = 120  # a terminal's columns: every line `render` prints fits


def best_table(summary: Summary, top: int = 5) -> str:
    """One row per trial (the full MLflow run id: `reproduce` takes it), its params on the
    lines below, wrapped to fit `WIDTH`."""
    rows = summary.complete()[:top]
    acc, gap = headline(rows[0].attrs) if rows else KINDS["finetune"].headline
    head = (
        f"{'trial':>5}  {acc:>7}  {gap:>{max(11, len(gap))}}  {'epoch':>5}  {'ran':>3}  "
        f"{'time':>6}  mlflow run (params below)"
    )
    lines = [head]
    for t in rows:
        a = t.attrs
        lines.append(
            f"{t.number:>5}  {a.get(acc, float('nan')):>{len(acc)}.4f}  "
            f"{a.get(gap, float('nan')):>+{max(11, len(gap))}.4f}  {a.get('best_epoch', '-'):>5}  "
            f"{a.get('epochs_run', '-'):>3}  {a.get('seconds', float('nan')):>5.1f}s  "
            f"{a.get('mlflow_run_id', '-')}"
        )
        params = (
            "baseline recipe"
            if t.baseline
            else " ".join(f"{k}={_fmt(v)}" for k, v in t.params.items())
        )
        lines += textwrap.wrap(
            params, WIDTH, initial_indent=" " * 7, subsequent_indent=" " * 7, break_long_words=False
        )
    return "\n".join(lines)


def ui_hint(opts) -> str:
    """The command that opens the MLflow UI on these stores, with this interpreter (the
    project's `.venv/bin/python` when it runs from there)."""
    try:
        python = str(Path(sys.executable).relative_to(Path.cwd()))
    except ValueError:
        python = "python"
    cmd = [python, "run_study.py", "ui"]
    if str(opts.results) != "results":
        cmd += ["--results", str(opts.results)]
    if opts.tracking_uri:
        cmd += ["--tracking-uri", opts.tracking_uri]
    return shlex.join(cmd)


@dataclass(frozen=True)
class SeedGroup:
    label: str  # the setting: the sampled values but the seed
    params: dict[str, Any]
    metric: str  # test_acc where every trial of the study was tested, else the objective's
    mean: float
    std: float
    n: int


def seed_groups(summary: Summary) -> list[SeedGroup]:
    """Complete trials that differ only in `seed`, grouped: a study that samples the seed
    (a grid over settings x seeds) reports each setting as mean and spread."""
    import statistics

    rows = [t for t in summary.complete() if "seed" in t.params]
    if not rows:
        return []
    tested = all(t.number in summary.test and "test_acc" in summary.test[t.number] for t in rows)
    metric = "test_acc" if tested else headline(rows[0].attrs)[0]
    groups: dict[tuple, list[float]] = {}
    settings: dict[tuple, dict] = {}
    for t in rows:
        params = {k: v for k, v in sorted(t.params.items()) if k != "seed"}
        key = tuple(sorted((k, str(v)) for k, v in params.items()))
        value = summary.test[t.number]["test_acc"] if tested else t.attrs.get(metric)
        if value is not None:
            groups.setdefault(key, []).append(value)
            settings[key] = params
    out = []
    for key, values in groups.items():
        label = " ".join(f"{k}={_fmt(v)}" for k, v in settings[key].items()) or "(no setting)"
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(
            SeedGroup(label, settings[key], metric, statistics.fmean(values), spread, len(values))
        )
    return sorted(out, key=lambda g: [_order(v) for v in g.params.values()])


def _order(value: Any) -> tuple:
    """Numbers in numeric order (1, 5, 20), before strings in theirs."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def meta_scores(test: dict[str, float]) -> str:
    """`1-shot 0.83 ± 0.02, 5-shot ...` from a trial's meta-test metrics."""
    shots = sorted(int(k.split("_")[-1][:-4]) for k in test if k.startswith("meta_test_acc_"))
    return ", ".join(
        f"{k}-shot {test[f'meta_test_acc_{k}shot']:.4f} ± {test[f'meta_test_ci95_{k}shot']:.4f}"
        for k in shots
    )


def classical_lines(summary: Summary) -> list[str]:
    """The classical reference: each model's chosen settings, val and test accuracy, and what
    was searched (the claim against the best trial is a paired comparison:
    `reports.comparisons`)."""
    refs = summary.classical
    if not refs:
        return []
    out = [
        "\nClassical reference (the same split; settings chosen on val, refit on train, tested "
        "once):"
    ]
    width = max(len(r.label) for r in refs)
    out.append(f"  {'model':<{width}}  val_acc  test_acc  settings")
    for r in refs:
        out.append(f"  {r.label:<{width}}  {r.val_acc:7.4f}  {r.test_acc:8.4f}  {r.setting}")
    searched = dict.fromkeys(f"{r.model}: {r.searched}" for r in refs)
    out += textwrap.wrap(
        f"Searched (ties: the first best in grid order): {'; '.join(searched)}.",
        WIDTH,
        initial_indent="  ",
        subsequent_indent="    ",
        break_long_words=False,
    )
    return out


def render(summary: Summary, top: int = 5) -> str:
    c = summary.counts()
    head = (
        f"Study {summary.study_name!r}: {c.get('COMPLETE', 0)} complete, "
        f"{c.get('PRUNED', 0)} pruned, {c.get('FAIL', 0)} failed"
    )
    if c.get("RETRIED"):
        n = c["RETRIED"]
        head += f" ({n} interrupted attempt{'s' * (n > 1)}, re-queued and retried)"
    out = [head, *summary.notes, ""]
    best = summary.complete()
    base = summary.baseline()
    if not best:
        out.append("No trial completed.")
    else:
        out += [
            "Best trials (by the objective, on the validation split):",
            best_table(summary, top),
        ]
        b = best[0]
        if base is None:
            out.append("\nNo baseline trial in this study (search.baseline: false, or it failed).")
        else:
            ba, bb = base.attrs, b.attrs
            out.append(
                f"\nBaseline (trial {base.number}, the founding recipe): "
                f"val_acc {ba['val_acc']:.4f}, "
                f"overfit_gap {ba['overfit_gap']:+.4f}"
            )
            out.append(
                f"Gain of the best trial ({b.number}) over the baseline: "
                f"{bb['val_acc'] - ba['val_acc']:+.4f} val_acc ({bb['val_acc']:.4f} vs "
                f"{ba['val_acc']:.4f}), overfit_gap {bb['overfit_gap']:+.4f} "
                f"vs {ba['overfit_gap']:+.4f}"
            )
    for number, label in (
        (best[0].number if best else None, "best trial"),
        (base.number if best and base else None, "baseline"),
    ):
        if number is None:
            continue
        t = summary.test.get(number)
        if t and "test_acc" not in t:
            out.append(
                f"Meta-test classes ({label}, trial {number}, evaluated once; mean ± 95% "
                f"interval): {meta_scores(t)}"
            )
        elif t:
            out.append(
                f"Test split ({label}, trial {number}, evaluated once): "
                f"test_acc {t['test_acc']:.4f}, test_loss {t['test_loss']:.4f}"
            )
        else:
            out.append(f"Test split ({label}, trial {number}): not evaluated (no weights kept)")
    out += classical_lines(summary)
    out += comparisons.lines(summary)
    if summary.pareto:
        names = ", ".join(summary.objectives)
        out.append(f"\nPareto front ({names}): trials {sorted(summary.pareto)}")
        for t in summary.complete():
            if t.number in summary.pareto:
                values = ", ".join(
                    f"{m} {t.attrs.get(m, float('nan')):.4f}" for m in summary.objectives
                )
                out.append(f"  trial {t.number}: {values}")
    if summary.seeds:
        n = next(iter(next(iter(summary.seeds.values())).values()))[2]
        out.append(f"\nOver {n} more training seeds (same split, same starting weights):")
        for number, m in summary.seeds.items():
            label = "baseline" if number == (base.number if base else None) else f"trial {number}"
            (acc, a), (gap, g) = list(m.items())[:2]
            out.append(
                f"  {label:>9}: {acc} {a[0]:.4f} ± {a[1]:.4f}, {gap} {g[0]:+.4f} ± {g[1]:.4f}"
            )
    tested = [t for t in best_per_algorithm(summary.complete()) if t.number in summary.test]
    if len(tested) > 1:
        out.append("\nMeta-test per algorithm (each one's best trial; mean ± 95% interval):")
        for t in tested:
            out.append(
                f"  {t.params['meta.algorithm']:>8} (trial {t.number}, meta_val_acc "
                f"{t.attrs['meta_val_acc']:.4f}): {meta_scores(summary.test[t.number])}"
            )
    groups = seed_groups(summary)
    if groups:
        metric = groups[0].metric
        out.append(f"\nOver seeds (each setting's complete trials; {metric} mean ± std):")
        for g in groups:
            out.append(f"  {g.label}: {g.mean:.4f} ± {g.std:.4f} (n={g.n})")
    if summary.ablation:
        out.append(f"\n{summary.ablation}")
    if summary.files:
        out.append(f"\nReport: {summary.files[0]}")
    # the command and the URL alone on their lines: nothing else shares a line too long to fit
    out += ["\nOpen the MLflow UI on these results:", f"  {ui_hint(summary.opts)}"]
    if summary.ui_url:
        out += ["then the study's runs:", f"  {summary.ui_url}"]
    return "\n".join(out)
