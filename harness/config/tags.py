"""The names of the tags the harness writes on MLflow runs and of the user attributes it keeps
on Optuna trials (one name for both where a value is in both), in one table: every module that
writes or reads one takes its name from here.

Imports nothing: `check` and `--help` use it without torch.
"""

from __future__ import annotations


class Tag:
    """`Tag.BASELINE` is the name "harness.baseline"; values are strings, as MLflow stores them."""

    # What a run is
    ROLE = "harness.role"  # study (the parent), trial runs have none; rerun, ablation, reproduce
    STUDY = "harness.study"  # on a study's parent run: the study's name
    EXPERIMENT = "harness.experiment"  # the experiment file
    SPEC_HASH = "harness.spec_hash"
    TASK_KIND = "harness.task_kind"
    OBJECTIVES = "harness.objectives"
    BASELINE = "harness.baseline"  # the baseline trial (also a trial user attribute)
    SAMPLED = "harness.sampled"
    TEST = "harness.test"  # how the test split was used
    # A model soup (role soup): its kind, its ingredients; on the study: the soup it makes
    SOUP = "harness.soup"  # greedy or uniform
    SOUP_INGREDIENTS = "harness.soup_ingredients"  # trial numbers, in the order they were tried
    SOUP_INGREDIENT_RUNS = "harness.soup_ingredient_runs"  # their run ids
    SOUP_PLAN = "harness.soup_plan"  # study attribute: {"kind": ..., "candidates": N}
    # Warm start (harness.study.warm): a trial handed over from an earlier study (a trial user
    # attribute, "STUDY@WHERE trial N"); on the parent run and the study: the studies it came from
    WARM_START = "harness.warm_start"
    WARM_START_FROM = "harness.warm_start_from"
    # `report --compare` (role compare): + a compared study's name, its parent run id
    COMPARED = "harness.compared."
    # Where it came from
    GIT_COMMIT = "harness.git_commit"
    GIT_DIRTY = "harness.git_dirty"
    VERSION = "harness.version."  # + python, torch, torchvision, optuna, mlflow
    DEVICE = "harness.device"
    THREADS = "harness.threads"
    CPU = "harness.cpu"
    CPU_KERNELS = "harness.cpu_kernels"
    DEVICES_PER_TRIAL = "harness.devices_per_trial"
    DATA_HASH = "harness.data_hash"
    PRETRAINED = "harness.pretrained"
    SOURCE_MODEL = "harness.source_model"
    KEY = "harness.key"  # a source model's cache key
    FORMAT = "harness.format"  # a registered model version's format
    # How a trial went
    PRUNED_EPOCH = "harness.pruned_epoch"
    BEST_EPOCH = "harness.best_epoch"
    FAULT = "harness.fault"  # nan, diverged, oom, rank, killed, interrupted, disk_full, store
    ERROR = "harness.error"
    CHECKPOINT = "harness.checkpoint"  # where the best weights are (or that they were deleted)
    RESUME = "harness.resume"  # where a retry's state came from, or why it restarted at epoch 1
    RESUMED_FROM_EPOCH = "harness.resumed_from_epoch"
    RETRY_OF = "harness.retry_of"  # a retried attempt: the run (tag) or trial (attribute) retried
    RETRY_OF_TRIAL = "harness.retry_of_trial"
    # A trial's process (trial user attributes)
    PID = "harness.pid"
    HOST = "harness.host"
    HEARTBEAT = "harness.heartbeat"
    # Seed re-runs, ablations, reproductions
    RERUN_OF = "harness.rerun_of"
    SEED_INDEX = "harness.seed_index"
    ABLATION = "harness.ablation"
    ABLATION_OF = "harness.ablation_of"
    ABLATION_CONFIG = "harness.ablation_config"
    REPRODUCES = "harness.reproduces"
    REPRODUCE_RESULT = "harness.reproduce_result"
    REPRODUCE_TOLERANCE = "harness.reproduce_tolerance"
    REPRODUCE_FIRST_DIFFERENCE = "harness.reproduce_first_difference"
    REPRODUCE_LARGEST_REL_DIFFERENCE = "harness.reproduce_largest_rel_difference"
    # Optuna's and MLflow's own names the harness writes or reads
    OPTUNA_STUDY = "optuna.study"
    OPTUNA_TRIAL_NUMBER = "optuna.trial_number"
    OPTUNA_STATE = "optuna.state"
    PARENT_RUN = "mlflow.parentRunId"
    DESCRIPTION = "mlflow.note.content"  # the run's description in the UI
    EXPERIMENT_KIND = "mlflow.experimentKind"
    # + a key: a saved view of the runs table (filter, sort, columns), an experiment tag the UI
    # opens with `?viewStateShareKey=KEY` (its "Share" button writes the same)
    SHARED_VIEW = "mlflow.sharedViewState."
