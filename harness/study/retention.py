"""The retention policy of best weights (`search.keep_checkpoints`, `search.top_k`): after every
trial, the kept trials' best weights are logged to MLflow (as `checkpoints/`) and the others'
local files and artifacts are deleted, so disk use stays bounded as the study goes on. Used by
`harness.study.search`; `ctx` is its context (spec, results folder, study name, MLflow client).
"""

from __future__ import annotations

import fcntl

import optuna
from optuna.trial import TrialState

from harness.config.metrics import rank_key
from harness.config.tags import Tag
from harness.core import checkpoints
from harness.reports.report import own_trials, pareto_front
from harness.tracking import registry
from harness.tracking import store as tracking


def ranked_trials(study: optuna.Study) -> list:
    """The complete trials, best first, by `metrics.TIE_RULE` (the first objective)."""
    maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    objective = (study.user_attrs.get(Tag.OBJECTIVES) or ["val_acc"])[0]
    complete = own_trials(study, (TrialState.COMPLETE,))
    return sorted(
        complete, key=lambda t: rank_key(t.values[0], t.user_attrs, t.number, objective, maximize)
    )


def keep_set(study: optuna.Study, policy: str, k: int, soup_k: int = 0) -> set[int]:
    """Numbers of the complete trials whose best weights are kept: the top k and the baseline,
    and until the study's soup is made the top `soup_k` (its candidates)."""
    complete = own_trials(study, (TrialState.COMPLETE,))
    if policy == "all":
        return {t.number for t in complete}
    if policy == "none":
        return set()
    ranked = ranked_trials(study)
    keep = {t.number for t in ranked[: max(k, soup_k)]}
    best_of: dict[str, int] = {}  # and each meta-learning algorithm's best, tested at the end
    for t in ranked:
        if "meta.algorithm" in t.params:
            best_of.setdefault(t.params["meta.algorithm"], t.number)
    keep |= set(best_of.values())
    if len(study.directions) > 1:  # and the whole Pareto front
        keep |= {t.number for t in pareto_front(complete, study.directions)}
    return keep | {t.number for t in complete if t.user_attrs.get(Tag.BASELINE)}


def apply_retention(ctx, study: optuna.Study) -> None:
    """Log the kept trials' weights to MLflow; delete the others' local files and artifacts.

    Run after every trial, so that disk use stays bounded by the policy as the study goes on.
    """
    search = ctx.spec.search
    soup_k = search.soup_candidates if ctx.spec.soup != "none" else 0
    keep = keep_set(study, search.keep_checkpoints, search.top_k, soup_k)
    _apply(
        ctx.client,
        ctx.opts.results,
        ctx.study_name,
        study,
        keep,
        ctx.logged,
        ctx.retained,
        ctx.progress.note,
    )


def after_soup(client, results, study: optuna.Study, name: str, plan: dict) -> None:
    """Once the soup is made: the candidates outside the study's own policy lose their
    weights (local files and MLflow copies)."""
    if "keep" not in plan:  # `report --soup` on a study made before soups: nothing was added
        return
    keep = keep_set(study, plan["keep"], plan["top_k"])
    _apply(client, results, name, study, keep, set(), {}, lambda _line: None)


def _apply(client, results, name, study, keep, logged, retained, note) -> None:
    with open(checkpoints.retention_lock(results, name), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the workers sharing this results folder, in turn
        for t in own_trials(study, (TrialState.COMPLETE,)):
            kept = t.number in keep
            # a trial once decided is looked at again only when it falls out (a finished
            # trial's rank only falls): no file check per complete trial after every trial
            if retained.get(t.number) == kept:
                continue
            try:
                _retain(client, results, name, logged, t, kept)
                retained[t.number] = kept
            except (OSError, tracking.TrackingError) as err:  # another node got there first
                note(f"checkpoint of trial {t.number}: {err}; left as it is")


def _retain(client, results, name, logged: set, t, kept: bool) -> None:
    path = checkpoints.best_weights_path(results, name, t.number)
    run_id = t.user_attrs.get("mlflow_run_id")
    if kept:  # asked of MLflow once per run and process: not every kept run at every trial
        if path.is_file() and run_id not in logged:
            if registry.checkpoint_state(client, run_id) != "logged":
                registry.log_checkpoint(client, run_id, path)
            logged.add(run_id)
    elif checkpoints.drop_best(results, name, t.number):
        was_logged = run_id in logged  # logged by this process: no need to ask MLflow
        logged.discard(run_id)
        if was_logged or registry.checkpoint_state(client, run_id) == "logged":
            registry.delete_checkpoint(client, run_id)
        else:  # fell out before it was ever logged
            client.set_tag(run_id, Tag.CHECKPOINT, "deleted")
