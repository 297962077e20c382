"""Studies that start from studies: the earlier studies named by `search.warm_start` (or
`--warm-start`) found, read without a write, and their complete trials handed to the new study's
sampler with Optuna's own API (`Study.add_trials` of `optuna.trial.create_trial`s carrying the
new space's distributions). Each handed-over trial carries the user attribute
`harness.warm_start` ("STUDY@WHERE trial N"): the study's budget, runs, retention, soups and
report count only its own trials (`harness.reports.report.own_trials`).

A source is `STUDY` (this command's storage), `STUDY@RESULTS_DIR` (that folder's
`optuna.journal` and `mlflow.db`) or `STUDY@STORAGE_URL` (a `*.journal` file or an RDB URL).
`report --compare` names its studies the same way (`sources`, `open_source`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from harness.config.spec import ExperimentSpec, SpecError, active, fixed_values
from harness.config.tags import Tag
from harness.reports.report import own_trials
from harness.study.space import distribution
from harness.tracking import store as tracking
from harness.tracking.runs import StudyOptions


@dataclass(frozen=True)
class Source:
    """An earlier study, as named on the command line or in the file."""

    text: str  # as given: STUDY, STUDY@RESULTS_DIR or STUDY@STORAGE_URL
    name: str
    storage: str  # the Optuna storage's URL or journal path
    tracking_uri: str  # its MLflow store: RESULTS_DIR's, else this command's
    results: Path  # its results folder: RESULTS_DIR, else this command's

    @property
    def label(self) -> str:
        """How reports name it: STUDY, or STUDY@WHERE (the storage's password hidden)."""
        where = self.text.partition("@")[2]
        return f"{self.name}@{tracking.redact(where)}" if where else self.name


def parse(text: str, opts: StudyOptions) -> Source:
    """`STUDY`, `STUDY@RESULTS_DIR` or `STUDY@STORAGE_URL` (an URL, or a file ending .journal)."""
    name, sep, where = text.strip().partition("@")
    if not name or (sep and not where):
        raise SpecError(f"{text!r}: give STUDY, STUDY@RESULTS_DIR or STUDY@STORAGE_URL")
    if not sep:
        return Source(text, name, opts.storage_url(), opts.tracking(), opts.results)
    if "://" in where or where.endswith(".journal"):
        return Source(text, name, where, opts.tracking(), opts.results)
    folder = Path(where)
    uri = tracking.default_tracking_uri(folder)
    return Source(text, name, str(folder / "optuna.journal"), uri, folder)


def open_source(source: Source, what: str = "warm start") -> optuna.Study:
    """The source's study, read only: its storage opened without creating anything (a journal
    that is not there, a database that does not answer or has no such study: SpecError)."""
    where = tracking.redact(source.storage)
    if "://" in source.storage:
        try:
            storage = optuna.storages.RDBStorage(source.storage, skip_table_creation=True)
            names = [s.study_name for s in optuna.get_all_study_summaries(storage, False)]
        except Exception as err:  # any driver's error: the storage cannot be opened
            first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
            raise SpecError(
                f"{what} {source.text}: cannot open the Optuna storage {where} "
                f"({type(err).__name__}: {first})"
            ) from None
    else:
        if not Path(source.storage).is_file():
            raise SpecError(f"{what} {source.text}: no Optuna journal at {where}")
        storage = JournalStorage(JournalFileBackend(source.storage))
        names = [s.study_name for s in optuna.get_all_study_summaries(storage, False)]
    if source.name not in names:
        raise SpecError(
            f"{what} {source.text}: no study {source.name!r} in {where} "
            f"(studies there: {', '.join(names) or 'none'})"
        )
    return optuna.load_study(study_name=source.name, storage=storage)


@dataclass
class Handover:
    """What a warm start hands to the new study, and what it left out."""

    trials: list = field(default_factory=list)  # FrozenTrials to add
    sources: list = field(default_factory=list)  # {"source", "trials", "data"} per study
    not_complete: int = 0  # pruned, failed, running: no final value to learn from
    baseline: int = 0  # the baseline recipe samples nothing
    skipped: int = 0  # a choice the new space lacks, or no parameter of the new space left
    dropped: dict[str, int] = field(default_factory=dict)  # parameter -> trials it left
    clipped: dict[str, int] = field(default_factory=dict)  # parameter -> values clipped

    def line(self) -> str:
        """The one line that says what was handed over, dropped, clipped and skipped."""
        names = ", ".join(f"{s['source']} ({s['trials']})" for s in self.sources)
        out = f"warm start: {len(self.trials)} complete trials of {names} handed to the sampler"
        left = []
        if self.dropped:
            n = sum(self.dropped.values())
            keys = ", ".join(sorted(self.dropped))
            left.append(f"{n} values dropped (not in this space: {keys})")
        if self.clipped:
            n = sum(self.clipped.values())
            left.append(f"{n} values clipped into this space's range ({', '.join(self.clipped)})")
        if self.skipped:
            left.append(f"{self.skipped} trials skipped (a choice or no key of this space)")
        if self.not_complete or self.baseline:
            left.append(
                f"{self.not_complete} not complete and {self.baseline} baseline trials not used"
            )
        return out + ("; " + "; ".join(left) if left else "")


def _fit(param, value):
    """(value in the new space's range, clipped?) or (None, False): a choice it lacks."""
    if param.kind == "categorical":
        return (value, False) if value in param.categorical else (None, False)
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        return None, False
    lo, hi = param.candidates()
    fitted = min(max(value, lo), hi)
    step = param.step or (1 if param.kind == "int" else None)
    if step:
        fitted = lo + round((fitted - lo) / step) * step
        fitted = min(fitted, hi)
    if param.kind == "int":
        fitted = int(fitted)
    return fitted, fitted != value


def convert(spec: ExperimentSpec, trial, origin: str, out: Handover) -> None:
    """One earlier trial, in the new space: its parameters outside the space dropped (and
    those whose `when` no longer holds), values outside a range clipped; a categorical value
    the space lacks skips it. Appended to `out.trials` with the warm-start attribute."""
    if trial.state != TrialState.COMPLETE or not trial.values:
        out.not_complete += 1
        return
    if trial.user_attrs.get(Tag.BASELINE) or not trial.params:
        out.baseline += 1
        return
    known = fixed_values(spec)
    params, dists, clipped = {}, {}, []
    for key, p in spec.search.space.items():  # in file order: a `when` sees the keys before it
        if key not in trial.params or not active(p, known):
            continue
        value, was_clipped = _fit(p, trial.params[key])
        if value is None:
            out.skipped += 1
            return
        params[key] = known[key] = value
        dists[key] = distribution(p)
        if was_clipped:
            clipped.append(key)
    if not params:
        out.skipped += 1
        return
    for key in trial.params.keys() - params.keys():
        out.dropped[key] = out.dropped.get(key, 0) + 1
    for key in clipped:
        out.clipped[key] = out.clipped.get(key, 0) + 1
    attrs = {Tag.WARM_START: f"{origin} trial {trial.number}"}
    for key in (*spec.objective.all_metrics, "overfit_gap", "adaptation_gap"):
        if key in trial.user_attrs:  # what the tie rule reads
            attrs[key] = trial.user_attrs[key]
    out.trials.append(
        optuna.trial.create_trial(
            state=TrialState.COMPLETE,
            values=list(trial.values),
            params=params,
            distributions=dists,
            user_attrs=attrs,
        )
    )


def gather(spec: ExperimentSpec, opts: StudyOptions) -> Handover:
    """Every source of `spec.search.warm_start`, read and checked: a different objective
    (metric or direction) or task kind is refused; its complete trials converted."""
    out = Handover()
    objective = spec.objective
    mine = list(zip(objective.all_metrics, objective.all_directions, strict=True))
    for text in spec.search.warm_start:
        source = parse(text, opts)
        study = open_source(source)
        names = study.user_attrs.get(Tag.OBJECTIVES) or ["val_acc"]
        theirs = [(m, d.name.lower()) for m, d in zip(names, study.directions, strict=False)]
        if theirs != mine:
            show = lambda pairs: ", ".join(f"{d} {m}" for m, d in pairs)  # noqa: E731
            raise SpecError(
                f"warm start {text}: its objective is {show(theirs)}, this study's is "
                f"{show(mine)}; trials measured on another objective would mislead the sampler"
            )
        kind = study.user_attrs.get(Tag.TASK_KIND)
        if kind and kind != spec.task.kind:
            raise SpecError(f"warm start {text}: a {kind} study, this one is {spec.task.kind}")
        before = len(out.trials)
        for trial in own_trials(study):
            convert(spec, trial, source.label, out)
        out.sources.append(
            {
                "source": source.label,
                "trials": len(out.trials) - before,
                "data": study.user_attrs.get(Tag.DATA_HASH),
            }
        )
    return out


def named(sources: list[dict]) -> str:
    """The studies a warm start came from, with their handed-over trials: the parent run's
    tag and the report's note."""
    return ", ".join(f"{s['source']} ({s['trials']} trials)" for s in sources)


def data_notes(sources: list[dict], data_hash: str | None) -> list[str]:
    """The sources' data against the new study's: the report's lines about it."""
    out = []
    for s in sources:
        theirs = s.get("data")
        if theirs is None:
            out.append(f"{s['source']}: its data split is not recorded (an older study)")
        elif theirs != data_hash:
            out.append(
                f"{s['source']} used other data (data hash {theirs}, this study {data_hash}): "
                "its trials guide the sampler, they do not measure this task"
            )
    return out


def own_view(study: optuna.Study) -> optuna.Study:
    """The study itself, or, where a warm start added trials, an in-memory copy of its own
    trials (for Optuna's plots and importances, which read every trial of a study)."""
    trials = own_trials(study)
    if len(trials) == len(study.get_trials(deepcopy=False)):
        return study
    copy = optuna.create_study(directions=study.directions)
    for key, value in study.user_attrs.items():
        copy.set_user_attr(key, value)
    copy.add_trials(trials)
    return copy
