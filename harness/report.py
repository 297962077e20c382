"""What a person reads: the study's progress while it runs, and the table of best trials after.

Plain data in, text out: the study module turns Optuna trials into `TrialRow`s.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm


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

    def complete(self) -> list[TrialRow]:
        rows = [t for t in self.trials if t.state == "COMPLETE" and t.value is not None]
        return sorted(rows, key=lambda t: t.value, reverse=self.direction == "maximize")

    def baseline(self) -> TrialRow | None:
        return next((t for t in self.trials if t.baseline and t.state == "COMPLETE"), None)

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.trials:
            counts[t.state] = counts.get(t.state, 0) + 1
        return counts


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

    def epoch_line(self, trial_number: int, epochs: int):
        bar = self.bar

        class _Line:
            def on_epoch_end(self, epoch: int, m: dict[str, float]) -> None:
                if bar is not None:
                    bar.set_description(
                        f"trial {trial_number} epoch {epoch}/{epochs} val_acc {m['val_acc']:.3f} "
                        f"gap {m['overfit_gap']:+.3f}"
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
        if "val_acc" in a:
            line += f" val_acc {a['val_acc']:.4f} overfit_gap {a['overfit_gap']:+.4f}"
        if a.get("harness.pruned_epoch"):
            line += f" at epoch {a['harness.pruned_epoch']}"
        if a.get("harness.baseline"):
            line += " (baseline)"
        try:
            line += f"  best {study.best_value:.4f} (trial {study.best_trial.number})"
            if self.bar is not None:
                self.bar.set_postfix_str(f"best {study.best_value:.4f}")
        except ValueError:  # no complete trial yet
            pass
        self.note(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def best_table(summary: Summary, top: int = 5) -> str:
    rows = summary.complete()[:top]
    head = (
        f"{'trial':>5}  {'val_acc':>7}  {'overfit_gap':>11}  {'epoch':>5}  "
        f"{'mlflow run':<32}  params"
    )
    lines = [head]
    for t in rows:
        a = t.attrs
        params = (
            "baseline recipe"
            if t.baseline
            else " ".join(f"{k}={_fmt(v)}" for k, v in t.params.items())
        )
        lines.append(
            f"{t.number:>5}  {a.get('val_acc', float('nan')):>7.4f}  "
            f"{a.get('overfit_gap', float('nan')):>+11.4f}  {a.get('best_epoch', '-'):>5}  "
            f"{a.get('mlflow_run_id', '-'):<32}  {params}"
        )
    return "\n".join(lines)


def ui_hint(opts) -> str:
    cmd = ["python", "run_study.py", "ui"]
    if str(opts.results) != "results":
        cmd += ["--results", str(opts.results)]
    if opts.tracking_uri:
        cmd += ["--tracking-uri", opts.tracking_uri]
    return shlex.join(cmd)


def render(summary: Summary, top: int = 5) -> str:
    c = summary.counts()
    head = (
        f"Study {summary.study_name!r}: {c.get('COMPLETE', 0)} complete, "
        f"{c.get('PRUNED', 0)} pruned, {c.get('FAIL', 0)} failed"
    )
    out = [head, ""]
    best = summary.complete()
    if not best:
        out.append("No trial completed.")
    else:
        out += [
            "Best trials (by the objective, on the validation split):",
            best_table(summary, top),
        ]
        base = summary.baseline()
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
    out.append(f"\nOpen the MLflow UI on these results: {ui_hint(summary.opts)}")
    return "\n".join(out)
