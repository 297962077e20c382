"""The metric names of each task kind, in one table: what every epoch logs, what a study may
optimise and in which direction, the (accuracy, gap) headline, the (train, val) curves, the
trial's summary attributes and what a reproduction compares. The spec's objective check, the
study, the report, the seed re-runs and `reproduce` all read it here.

Imports nothing: `check` and `--help` use it without torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KindMetrics:
    objectives: tuple[str, ...]  # what a study of this kind may optimise
    headline: tuple[str, str]  # (accuracy, gap): a trial's row, progress line, seed re-runs
    curves: tuple[str, str]  # (train, val) learning curves of the report
    summary: tuple[str, ...]  # the best epoch's values kept as the trial's user attributes
    epoch: tuple[str, ...]  # logged every epoch and compared by `reproduce`


FINETUNE_EPOCH = (
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "overfit_gap",
    "overfit_gap_loss",
    "lr",
    "train_loss_running",
    "train_acc_running",
)
# logged only by some trials (regularizers with a penalty, lp_ft, gradual_unfreeze): compared
# where the record or the re-run has them
OPTIONAL_EPOCH = ("train_penalty_running", "phase", "trainable_stages")
_SUPERVISED = dict(
    objectives=("val_acc", "val_loss", "overfit_gap", "overfit_gap_loss", "train_acc"),
    headline=("val_acc", "overfit_gap"),
    curves=("train_acc", "val_acc"),
    summary=("val_acc", "val_loss", "train_acc", "overfit_gap", "overfit_gap_loss"),
)
KINDS = {
    "finetune": KindMetrics(**_SUPERVISED, epoch=FINETUNE_EPOCH),
    # multi-task: the target task's metrics under the plain names, per task `T_*` besides
    # (`multitask_epoch` lists them for a trial's tasks)
    "multitask": KindMetrics(**_SUPERVISED, epoch=(*FINETUNE_EPOCH[:8],)),
    "meta": KindMetrics(
        objectives=("meta_val_acc", "meta_val_loss", "adaptation_gap", "meta_train_acc"),
        headline=("meta_val_acc", "adaptation_gap"),
        curves=("meta_train_acc", "meta_val_acc"),
        summary=(
            "meta_val_acc",
            "meta_val_ci95",
            "meta_val_loss",
            "meta_train_acc",
            "adaptation_gap",
        ),
        epoch=(
            "meta_train_loss",
            "meta_train_acc",
            "meta_val_loss",
            "meta_val_acc",
            "meta_val_ci95",
            "adaptation_gap",
            "lr",
        ),
    ),
}
OBJECTIVES = tuple(dict.fromkeys(m for k in KINDS.values() for m in k.objectives))
MAXIMIZED = frozenset({"val_acc", "train_acc", "meta_val_acc", "meta_train_acc"})
MULTITASK_PER_TASK = ("train_loss", "train_acc", "val_loss", "val_acc", "overfit_gap", "weight")


def direction(metric: str) -> str:
    """The direction in which `metric` is better."""
    return "maximize" if metric in MAXIMIZED else "minimize"


def multitask_epoch(tasks: list[str], uncertainty: bool) -> tuple[str, ...]:
    """The per-epoch metrics of a multi-task trial with these task names (the target first)."""
    per_task = (*MULTITASK_PER_TASK, *(("log_var",) if uncertainty else ()))
    return (*KINDS["multitask"].epoch, *(f"{t}_{k}" for t in tasks for k in per_task))


PRUNED_AT = "pruned_epoch"  # a pruned trial run's metric: the epoch at which it was pruned


def best_name(metric: str) -> str:
    """The run metric holding a finished run's value of `metric` at its chosen epoch."""
    return f"best_{metric}"


# --- The one rule for ranking trials ------------------------------------------------------------

TIE_RULE = (
    "trials are ranked by the objective; equal values: the lower validation loss at the kept "
    "epoch first (the higher validation accuracy when the objective is a loss), then the "
    "earlier trial"
)


def _tie_metric(objective: str) -> str:
    loss = "meta_val_loss" if objective.startswith("meta_") else "val_loss"
    if objective == loss:
        return "meta_val_acc" if objective.startswith("meta_") else "val_acc"
    return loss


def rank_key(value: float, attrs: dict, number: int, objective: str, maximize: bool) -> tuple:
    """The sort key of a complete trial under `TIE_RULE` (ascending: rank 1 first). `attrs`:
    the trial's user attributes (its kept epoch's summary); `objective`: the first objective's
    name. The CLI table, the report, the registry's `best`, retention and the `rank` metric on
    each trial run all sort with it."""
    tie = _tie_metric(objective)
    second = attrs.get(tie)
    second = float("inf") if second is None else float(second)
    if direction(tie) == "maximize":
        second = -second
    return (-value if maximize else value, second, number)
