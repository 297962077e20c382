"""The retention policy of best weights (`search.keep_checkpoints`, `search.top_k`): after every
trial, the kept trials' best weights are logged to MLflow (as `checkpoints/`) and the others'
local files and artifacts are deleted, so disk use stays bounded as the study goes on. Used by
`harness.study.search`; `ctx` is its context (spec, results folder, study name, MLflow client).
"""

from __future__ import annotations

import fcntl

import optuna
from optuna.trial import TrialState

from harness.config.tags import Tag
from harness.core import checkpoints
from harness.tracking import registry
from harness.tracking import store as tracking


def keep_set(study: optuna.Study, policy: str, k: int) -> set[int]:
    """Numbers of the complete trials whose best weights are kept: the top k and the baseline."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if policy == "all":
        return {t.number for t in complete}
    if policy == "none":
        return set()
    maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    ranked = sorted(complete, key=lambda t: (-t.values[0] if maximize else t.values[0], t.number))
    keep = {t.number for t in ranked[:k]}
    best_of: dict[str, int] = {}  # and each meta-learning algorithm's best, tested at the end
    for t in ranked:
        if "meta.algorithm" in t.params:
            best_of.setdefault(t.params["meta.algorithm"], t.number)
    keep |= set(best_of.values())
    if len(study.directions) > 1:  # and the whole Pareto front
        keep |= {t.number for t in study.best_trials}
    return keep | {t.number for t in complete if t.user_attrs.get(Tag.BASELINE)}


def apply_retention(ctx, study: optuna.Study) -> None:
    """Log the kept trials' weights to MLflow; delete the others' local files and artifacts.

    Run after every trial, so that disk use stays bounded by the policy as the study goes on.
    """
    search = ctx.spec.search
    with open(checkpoints.retention_lock(ctx.opts.results, ctx.study_name), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the workers sharing this results folder, in turn
        keep = keep_set(study, search.keep_checkpoints, search.top_k)
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            kept = t.number in keep
            # a trial once decided is looked at again only when it falls out (a finished
            # trial's rank only falls): no file check per complete trial after every trial
            if ctx.retained.get(t.number) == kept:
                continue
            try:
                _retain(ctx, t, kept)
                ctx.retained[t.number] = kept
            except (OSError, tracking.TrackingError) as err:  # another node got there first
                ctx.progress.note(f"checkpoint of trial {t.number}: {err}; left as it is")


def _retain(ctx, t, kept: bool) -> None:
    path = checkpoints.best_weights_path(ctx.opts.results, ctx.study_name, t.number)
    run_id = t.user_attrs.get("mlflow_run_id")
    if kept:  # asked of MLflow once per run and process: not every kept run at every trial
        if path.is_file() and run_id not in ctx.logged:
            if registry.checkpoint_state(ctx.client, run_id) != "logged":
                registry.log_checkpoint(ctx.client, run_id, path)
            ctx.logged.add(run_id)
    elif checkpoints.drop_best(ctx.opts.results, ctx.study_name, t.number):
        logged = run_id in ctx.logged  # logged by this process: no need to ask MLflow
        ctx.logged.discard(run_id)
        if logged or registry.checkpoint_state(ctx.client, run_id) == "logged":
            registry.delete_checkpoint(ctx.client, run_id)
        else:  # fell out before it was ever logged
            ctx.client.set_tag(run_id, Tag.CHECKPOINT, "deleted")
