"""Ablation of a study's best trial against the baseline recipe: which of the searched choices
made the difference, and by how much beyond seed noise (`run_study.py report STUDY --ablate`).

For each searched key where the best trial's config differs from the baseline's (a key with
`when:` children moves with them: reverting `strategy.kind` reverts `strategy.lp_epochs` too),
two variants: leave-one-out (the best recipe with that choice set back to the baseline's) and
add-one-in (the baseline recipe with only that choice taken from the best); and the best and
the baseline themselves. Every variant is trained over the same N seeds (seed i is the same for
every variant; same data split, same starting weights), as runs under the study's parent run
tagged `harness.ablation_of`, `harness.ablation`, `harness.seed_index`, `harness.role=ablation`;
each logs its best validation metric and its held-out test score (measured after selection).
Runs done earlier are reused: a larger N trains only the missing seeds. Effects are paired
differences over seeds, with a 95 % Student's t interval and a verdict in plain words.

Knows no Optuna; MLflow only through `harness.tracking.store` and `harness.tracking.runs`.
"""

from __future__ import annotations

import hashlib
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from harness.config.load import parse_yaml
from harness.config.metrics import KINDS, best_name
from harness.config.spec import ParamSpec, SpecError, TrialConfig, flatten
from harness.config.tags import Tag
from harness.core import tasks
from harness.reports.stats import Effect, _scaled, _std, maximized, paired, verdict
from harness.reports.variants import Group, Variant, _fmt, groups, parents_of, variants
from harness.tracking import runs
from harness.tracking import store as tracking

TEST_NOTE = "measured after selection: the test split, evaluated once per ablation run"


# --- Statistics. ---


# --- The variants. ---


# --- The runs. ---
def metric_names(config: TrialConfig) -> tuple[str, str, str | None]:
    """(validation metric, gap, test metric) of a task kind; meta: the first test shot count."""
    val, gap = KINDS[config.task.kind].headline
    if config.task.kind == "meta":
        return val, gap, f"meta_test_acc_{config.meta.test_shots[0]}shot"
    return val, gap, "test_acc"


def _test_config(config: TrialConfig) -> TrialConfig:
    if config.task.kind != "meta":
        return config
    return config.model_copy(
        update={"meta": config.meta.model_copy(update={"test_shots": config.meta.test_shots[:1]})}
    )


def config_key(config: TrialConfig, pretrained: str) -> str:
    """What a reused run must have been trained from: the variant's config but its seed, and
    its starting weights."""
    text = config.model_copy(update={"seed": 0}).model_dump_json() + pretrained
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def train_variant(
    res: runs.Resources,
    parent: str,
    of_run: str,
    name: str,
    index: int,
    config: TrialConfig,
    start: tuple[Path | None, str],
    key: str,
) -> dict[str, float]:
    """One variant at one seed from the starting weights `start` (path, description), as a
    tracked run; returns what it logged."""
    tags = {
        Tag.ABLATION_OF: of_run,
        Tag.ABLATION: name,
        Tag.SEED_INDEX: str(index),
        Tag.ABLATION_CONFIG: key,
        Tag.PRETRAINED: start[1],
        Tag.ROLE: "ablation",
        Tag.TEST: TEST_NOTE,
    }
    run_name = f"ablation-{name}-seed{config.seed}"
    test_config = _test_config(config)
    return runs.retrain(
        res,
        parent,
        run_name,
        config,
        start[0],
        tags,
        then=lambda model, data: tasks.test_metrics(test_config, model, data),
    )


@dataclass
class Ablation:
    best_trial: int
    baseline_trial: int
    of_run: str
    seeds: list[int]
    groups: list[Group]
    variants: list[Variant]
    val: str
    test: str | None
    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # variant, metric
    notes: list[str] = field(default_factory=list)
    trained: int = 0  # runs trained by this call (the others were reused)

    def of(self, name: str) -> dict[str, list[float]] | None:
        v = next((v for v in self.variants if v.name == name), None)
        if v is None or v.config is None:
            return None
        return self.values.get(v.same_as or v.name)

    def effect(self, a: str, b: str, metric: str) -> Effect | None:
        va, vb = self.of(a), self.of(b)
        if va is None or vb is None:
            return None
        return paired(va[metric], vb[metric])

    def effects(self, metric: str) -> list[tuple[Group, Effect | None, Effect | None]]:
        """Per group: (leave-one-out effect: best - without it, add-one-in: with it - baseline),
        sorted by the leave-one-out effect, most helpful first."""
        m = best_name(metric) if metric == self.val else metric
        rows = [
            (
                g,
                self.effect("best", f"loo:{g.leader}", m),
                self.effect(f"add:{g.leader}", "baseline", m),
            )
            for g in self.groups
        ]
        sign = 1.0 if maximized(metric) else -1.0
        return sorted(rows, key=lambda r: -sign * r[1].mean if r[1] else math.inf)

    def table(self) -> str:
        n, val, test = len(self.seeds), self.val, self.test
        metrics = [val, *([test] if test else [])]
        out = [
            f"Ablation of the best trial ({self.best_trial}) against the baseline recipe "
            f"(trial {self.baseline_trial}): {n} seeds per variant (seeds "
            f"{self.seeds[0]}-{self.seeds[-1]}; same data split, same starting weights; "
            f"{self.trained} of {self.runs()} runs trained by this call, the rest reused).",
            "Each effect is the mean paired difference over seeds ± the half-width of its 95% "
            f"interval (Student's t, {n - 1} df).",
            "  without it = best recipe minus the best with that choice set back to the "
            "baseline's (leave-one-out)",
            "  alone      = baseline plus that choice minus the baseline (add-one-in)",
            f"  {val}: the validation split the search selected on (favours the best's choices)",
        ]
        if test:
            out.append(f"  {test}: {TEST_NOTE}")
        total = [(m, self.effect("best", "baseline", self._m(m))) for m in metrics]
        out += ["", "best vs baseline:"]
        out += [f"  {m:<22} {verdict(e, m)}" for m, e in total if e is not None]
        out += ["", "Choices of the best recipe (a choice with `when:` children moves with them):"]
        for g, _, _ in self.effects(val):
            out.append(f"  {g.label()}")
            for label, a, b in (
                ("without it", "best", f"loo:{g.leader}"),
                ("alone", f"add:{g.leader}", "baseline"),
            ):
                for m in metrics:
                    e = self.effect(a, b, self._m(m))
                    text = verdict(e, m) if e else "not run: " + self._why(a, b)
                    out.append(f"    {label:<10}  {m:<22} {text}")
        out += ["", *self.in_short()]
        out += ["", f"Per variant, mean ± std over the {n} seeds:"]
        for v in self.variants:
            vals = self.of(v.name)
            if vals is None:
                out.append(f"  {v.name:<32} not run: {v.error}")
                continue
            cells = "  ".join(
                f"{m} {statistics.fmean(vals[self._m(m)]):.4f} ± {_std(vals[self._m(m)]):.4f}"
                for m in metrics
            )
            same = f"  (the same config as {v.same_as})" if v.same_as else ""
            out.append(f"  {v.name:<32} {cells}{same}")
        out += [f"Note: {note}" for note in self.notes]
        return "\n".join(out)

    def runs(self) -> int:
        """How many runs the ablation is made of (a variant with another's config has none)."""
        return len(self.seeds) * sum(1 for v in self.variants if v.config and not v.same_as)

    def in_short(self) -> list[str]:
        """The choices by their leave-one-out verdict on the test metric (the validation
        metric when there is none)."""
        m = self.test or self.val
        found: dict[str, list[str]] = {"helps": [], "hurts": [], "no effect": [], "not run": []}
        for g, _, _ in self.effects(m):
            e = self.effect("best", f"loo:{g.leader}", self._m(m))
            word = verdict(e, m).split(":")[0].split(" distinguishable")[0] if e else "not run"
            found[word].append(g.leader)
        lines = [f"In short, each choice left out of the best recipe, on {m}:"]
        for word, text in (
            ("helps", "it helps"),
            ("hurts", "it hurts"),
            ("no effect", "no effect distinguishable from seed noise"),
            ("not run", "not run"),
        ):
            if found[word]:
                lines.append(f"  {text}: {', '.join(found[word])}")
        return lines

    def _m(self, metric: str) -> str:
        return best_name(metric) if metric == self.val else metric

    def _why(self, *names: str) -> str:
        return "; ".join(
            f"{v.name}: {v.error}" for v in self.variants if v.name in names and v.error
        )

    def plot(self, path: Path) -> Path:
        """Horizontal bars: each choice's effect without it and alone, 95 % error bars, one
        panel per metric, sorted by the leave-one-out effect on the validation metric."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        metrics = [self.val, *([self.test] if self.test else [])]
        order = [g for g, _, _ in self.effects(self.val)][::-1]  # most helpful on top
        fig, axes = plt.subplots(
            1,
            len(metrics),
            figsize=(5.5 * len(metrics), 1.2 + 0.55 * (len(order) + 1)),
            squeeze=False,
            sharey=True,
        )
        labels = [g.short() for g in order] + ["best vs baseline"]  # y = 0, 1, ...
        for ax, m in zip(axes[0], metrics, strict=True):
            scale, unit = _scaled(m)
            for offset, (name, pair) in enumerate(
                (
                    ("without it (leave-one-out)", lambda g: ("best", f"loo:{g.leader}")),
                    ("alone (add-one-in)", lambda g: (f"add:{g.leader}", "baseline")),
                )
            ):
                ys, xs, errs = [], [], []
                for i, g in enumerate(order):
                    e = self.effect(*pair(g), self._m(m))
                    if e is not None:
                        ys.append(i + 0.2 - 0.4 * offset)
                        xs.append(e.mean * scale)
                        errs.append(0.0 if math.isnan(e.half) else e.half * scale)
                ax.barh(ys, xs, height=0.38, xerr=errs, capsize=3, label=name)
            total = self.effect("best", "baseline", self._m(m))
            if total is not None:
                half = 0.0 if math.isnan(total.half) else total.half * scale
                ax.barh(
                    [len(order)],
                    [total.mean * scale],
                    height=0.5,
                    xerr=[half],
                    capsize=3,
                    color="grey",
                    label="best vs baseline",
                )
            ax.axvline(0.0, color="black", lw=0.8)
            ax.set_yticks(range(len(labels)), labels)
            ax.set_xlabel(f"effect on {m}{unit and ' (points)'}, mean ± 95% CI")
            ax.set_title(m + (" (after selection)" if m == self.test else ""))
        axes[0][0].legend(fontsize=7, loc="best")
        fig.tight_layout()
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        return path

    def add_to_report(self, report_md: Path) -> list[Path]:
        """Write ablation.png next to report.md and add a section that shows it."""
        png = self.plot(report_md.parent / "ablation.png")
        title = "Ablation: each choice of the best recipe, without it and alone"
        with report_md.open("a") as f:
            f.write(f"## {title}\n\n![{title}]({png.name})\n")
        return [png]


# --- The whole ablation. ---
def _space(params: dict[str, str]) -> dict[str, ParamSpec] | None:
    """The study's search space as its parent run recorded it (`search.space`)."""
    text = params.get("search.space")
    if not text:
        return None
    try:
        tree = parse_yaml(text)
        return {k: ParamSpec.model_validate(v) for k, v in tree.items()}
    except (ValueError, AttributeError):
        return None


def plan(client, parent: str, best_row, base_row) -> Ablation:
    """What the ablation of `best_row` against `base_row` (report.TrialRow) trains; an input
    error (SpecError) when there is nothing to ablate. Trains nothing."""
    if best_row is None:
        raise SpecError("--ablate: the study has no complete trial to ablate")
    if base_row is None:
        raise SpecError(
            "--ablate: the study has no complete baseline trial (search.baseline: false, or it "
            "failed) to ablate against"
        )
    if best_row.number == base_row.number:
        raise SpecError(
            f"--ablate: the best trial is the baseline (trial {base_row.number}): nothing to ablate"
        )
    of_run, base_run = best_row.attrs["mlflow_run_id"], base_row.attrs["mlflow_run_id"]
    best, base = runs.load_config(of_run), runs.load_config(base_run)
    best_flat, base_flat = (
        flatten(best.model_dump(mode="json")),
        flatten(base.model_dump(mode="json")),
    )
    _, tags = tracking.run_record(client, of_run)
    sampled = [k for k in tags.get(Tag.SAMPLED, "").split(",") if k]
    notes = []
    space = _space(tracking.run_record(client, parent)[0]) if parent else None
    if space is None:
        space = {}
        notes.append(
            "the study's search space was not readable from its parent run: conditional keys "
            "are not grouped with their parents"
        )
    searched = [*space, *(k for k in sampled if k not in space)]
    parents = parents_of(space)
    if best_flat["task.kind"] != base_flat["task.kind"]:  # a multi-task best, its baseline a
        # plain fine-tune: the auxiliary tasks are a choice, their searched settings its children
        searched.insert(0, "task.kind")
        for k in searched:
            if k.startswith(f"{best.task.kind}."):
                parents[k] = [*parents.get(k, []), "task.kind"]
    gs = groups(best_flat, base_flat, parents, searched)
    if not gs:
        raise SpecError(
            f"--ablate: the best trial ({best_row.number}) has the baseline's value for every "
            "searched key: nothing to ablate"
        )
    other = [
        f"{k}={_fmt(best_flat[k])} (baseline: {_fmt(base_flat.get(k))})"
        for k in best_flat
        if k not in searched and k not in ("name", "seed") and best_flat[k] != base_flat.get(k)
    ]
    if other:
        notes.append(
            "outside the searched keys the recipes also differ in "
            + ", ".join(other[:8])
            + (" ..." if len(other) > 8 else "")
            + ": leave-one-out keeps the best's, add-one-in the baseline's"
        )
    val, _, test = metric_names(best)
    split = best.split_seed  # every variant on the best's data split
    vs = [
        v
        if v.config is None
        else Variant(
            v.name,
            v.config.model_copy(
                update={"data": v.config.data.model_copy(update={"split_seed": split})}
            ),
            v.same_as,
        )
        for v in variants(best, base, gs)
    ]
    return Ablation(best_row.number, base_row.number, of_run, [], gs, vs, val, test, notes=notes)


def run(res: runs.Resources, parent: str, ab: Ablation, n: int, note=print) -> Ablation:
    """Train what is missing of every variant over seeds best.seed+1 .. best.seed+n (runs
    found by their tags are reused), and collect the values."""
    best = next(v.config for v in ab.variants if v.name == "best")
    ab.seeds = [best.seed + 1 + i for i in range(n)]
    wanted = tuple(m for m in (best_name(ab.val), ab.test) if m)
    done = tracking.finished_ablations(res.client, res.exp_id, ab.of_run, wanted)
    trained = [v for v in ab.variants if v.config is not None and v.same_as is None]
    # the starting weights of the variant's config at the trial's own seed, for every seed (a
    # source model is pretrained under the seed of the config that asks for it)
    starts = {v.name: res.pretrained_for(v.config) for v in trained}
    keys = {v.name: config_key(v.config, starts[v.name][1]) for v in trained}
    todo = [  # seed by seed: an interrupted call leaves whole seeds for a smaller N
        (v, i) for i in range(n) for v in trained if (v.name, i, keys[v.name]) not in done
    ]
    for k, (v, i) in enumerate(todo, 1):
        config = v.config.model_copy(update={"seed": ab.seeds[i]})
        got = train_variant(res, parent, ab.of_run, v.name, i, config, starts[v.name], keys[v.name])
        done[(v.name, i, keys[v.name])] = {m: got[m] for m in wanted}
        note(
            f"ablation [{k}/{len(todo)}] {v.name} seed {ab.seeds[i]}: {ab.val} "
            f"{got[best_name(ab.val)]:.4f}" + (f", {ab.test} {got[ab.test]:.4f}" if ab.test else "")
        )
    ab.trained = len(todo)
    for v in trained:
        ab.values[v.name] = {
            m: [done[(v.name, i, keys[v.name])][m] for i in range(n)] for m in wanted
        }
    return ab


def ablate_study(client, opts, summary, study_attrs: dict, n: int) -> Ablation:
    """`report --ablate`: the ablation of the study's best complete trial against its baseline
    trial over `n` seeds (the hook `study_report.finish_report` calls)."""
    if n < 2:
        raise SpecError(f"--ablate --seeds {n}: an interval needs at least 2 seeds")
    complete = summary.complete()
    parent = study_attrs.get("mlflow_parent_run_id", "")
    ab = plan(client, parent, complete[0] if complete else None, summary.baseline())
    exp_id = tracking.experiment_id(
        client, study_attrs[Tag.EXPERIMENT], opts.results, opts.tracking()
    )
    return run(runs.Resources(opts.results, client, exp_id, print), parent, ab, n)
