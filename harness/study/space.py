"""The search space and its pruning: Optuna's sampler and pruner for a study, the values a
trial samples, and the core callback that reports each epoch to the pruner."""

from __future__ import annotations

from typing import Any

import optuna

from harness.config.spec import ExperimentSpec, active, fixed_values


def make_sampler(spec: ExperimentSpec, salt: int = 0) -> optuna.samplers.BaseSampler:
    """The file's sampler, seeded with `seed + salt` (each worker of a study has its own salt,
    or every worker would propose the same parameters)."""
    seed = spec.seed + salt
    return {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed, n_startup_trials=5),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False),
        "gp": lambda: optuna.samplers.GPSampler(seed=seed, n_startup_trials=5),
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed),
        "grid": lambda: optuna.samplers.GridSampler(
            {k: p.categorical for k, p in spec.search.space.items()}, seed=seed
        ),
    }[spec.search.sampler]()


def make_pruner(spec: ExperimentSpec) -> optuna.pruners.BasePruner:
    s = spec.search
    if s.pruner == "median":
        # n_min_trials: a warm start's trials count as complete but report no epochs; the
        # median waits for 5 of the study's own curves, as it does without them
        return optuna.pruners.MedianPruner(
            n_startup_trials=5,
            n_warmup_steps=s.pruner_warmup_epochs,
            n_min_trials=5 if s.warm_start else 1,
        )
    if s.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=spec.epochs)
    return optuna.pruners.NopPruner()


def suggest(trial: optuna.Trial, spec: ExperimentSpec) -> dict[str, Any]:
    """Sample the space in file order; a conditional key is sampled only when its `when` holds."""
    known = fixed_values(spec)
    sampled: dict[str, Any] = {}
    for key, p in spec.search.space.items():
        if not active(p, known):
            continue
        if p.kind == "categorical":
            value = trial.suggest_categorical(key, p.categorical)
        elif p.kind == "int":
            step = int(p.step) if p.step else 1
            value = trial.suggest_int(key, p.int_[0], p.int_[1], step=step, log=p.log)
        else:
            value = trial.suggest_float(key, p.float_[0], p.float_[1], step=p.step, log=p.log)
        sampled[key] = known[key] = value
    return sampled


def distribution(p) -> optuna.distributions.BaseDistribution:
    """The Optuna distribution that `suggest` samples a key of the space from."""
    if p.kind == "categorical":
        return optuna.distributions.CategoricalDistribution(p.categorical)
    if p.kind == "int":
        step = int(p.step) if p.step else 1
        return optuna.distributions.IntDistribution(p.int_[0], p.int_[1], log=p.log, step=step)
    return optuna.distributions.FloatDistribution(p.float_[0], p.float_[1], log=p.log, step=p.step)


class PruneOnEpoch:
    """Reports the objective metric each epoch; raises TrialPruned when the pruner says so."""

    def __init__(self, trial: optuna.Trial, metric: str, enabled: bool = True, report=True):
        self.trial, self.metric, self.pruned_at = trial, metric, None
        self.enabled, self.report = enabled and report, report

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        if not self.report:
            return
        self.trial.report(metrics[self.metric], epoch)
        if self.enabled and self.trial.should_prune():
            self.pruned_at = epoch
            raise optuna.TrialPruned(f"pruned at epoch {epoch}")
