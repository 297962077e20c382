"""Experiment file -> validated ExperimentSpec; spec + sampled values -> frozen TrialConfig.

Reads top to bottom: the YAML loader, the whole trial config and experiment spec (their
sections are `harness.config.sections`), the search-space checks, loading with `--set` overrides,
then building one trial's config. Imports no torch, Optuna
or MLflow, so `run_study.py check` stays fast and reads no data.
"""

from __future__ import annotations

import difflib
import re
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    model_validator,
)

from harness.config.metrics import KINDS
from harness.config.sections import (  # noqa: F401 (the sections are part of the spec's names)
    ARCHS,
    FLIP_POLICIES,
    FLIP_UNSAFE,
    META_METRICS,
    META_SPLIT_SIZES,
    NUM_CLASSES,
    STOCHASTIC_DEPTH_ARCHS,
    TORCHVISION_ARCHS,
    AugSpec,
    AuxTaskSpec,
    ClassId,
    ClassList,
    Count,
    DataSpec,
    Direction,
    MetaSpec,
    Metric,
    ModelSpec,
    MultiTaskSpec,
    NonNegative,
    ObjectiveSpec,
    ParamSpec,
    Probability,
    RegSpec,
    Scalar,
    SearchSpec,
    StrategySpec,
    TaskSpec,
    TrainSpec,
    _Section,
)

# The config sections each task kind reads, by task kind: a run's params show these (the whole
# config is in config.yaml) and `check` prints these; meta-learning reads only a few keys of
# train:. One home, read by `harness.tracking.runs` and `harness.cli`.
SECTIONS = {
    "finetune": ("data", "model", "train", "strategy", "reg", "aug", "objective", "task"),
    "multitask": ("data", "model", "train", "reg", "aug", "objective", "task", "multitask"),
    "meta": ("data", "model", "objective", "task", "meta"),
}
META_TRAIN_KEYS = ("device", "threads", "max_loss")  # what meta-learning reads of train:


class SpecError(ValueError):
    """A bad experiment file or override; the message names the file, the key and the problem."""


class TrialConfig(_Section):
    """Everything one trial needs; frozen. The fine-tuning core reads only this."""

    name: Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][\w.-]*$")]
    seed: Annotated[int, Field(ge=0)] = 0
    data: DataSpec = DataSpec()
    model: ModelSpec = ModelSpec()
    train: TrainSpec = TrainSpec()
    strategy: StrategySpec = StrategySpec()
    reg: RegSpec = RegSpec()
    aug: AugSpec = AugSpec()
    objective: ObjectiveSpec = ObjectiveSpec()
    task: TaskSpec = TaskSpec()
    meta: MetaSpec = MetaSpec()
    multitask: MultiTaskSpec = MultiTaskSpec()

    @model_validator(mode="before")
    @classmethod
    def _meta_objective(cls, data: Any) -> Any:
        """A meta-learning file without an objective optimises meta_val_acc."""
        if isinstance(data, dict) and "objective" not in data:
            task = data.get("task")
            if isinstance(task, dict) and task.get("kind") == "meta":
                data = {**data, "objective": {"metric": KINDS["meta"].headline[0]}}
        return data

    @property
    def epochs(self) -> int:
        """Epochs of the trial's core: meta-epochs for meta-learning."""
        return self.meta.meta_epochs if self.task.kind == "meta" else self.train.epochs

    @property
    def split_seed(self) -> int:
        """The seed of the data split (`data.split_seed`, else `seed`)."""
        return self.seed if self.data.split_seed is None else self.data.split_seed

    @model_validator(mode="after")
    def _coherent(self) -> TrialConfig:
        d = self.data
        if self.aug.policy in FLIP_POLICIES and d.dataset in FLIP_UNSAFE:
            raise ValueError(
                f"aug.policy: {self.aug.policy} flips images, and a flip changes {d.dataset} "
                "labels (a mirrored 2 is not a 2); use crop, randaugment or trivialaugment"
            )
        if self.model.pretrained == "source":
            if not d.source_classes:
                raise ValueError("data.source_classes: empty, but model.pretrained is source")
            overlap = set(d.source_classes) & set(d.target_classes)
            if overlap:
                raise ValueError(
                    f"data: source_classes and target_classes share {sorted(overlap, key=str)}"
                )
            if len(d.source_classes) < 2:
                raise ValueError(
                    f"data.source_classes: {list(d.source_classes)}: model.pretrained: source "
                    "pretrains a classifier of these classes; give 2 or more"
                )
        if self.reg.stochastic_depth > 0 and self.model.arch not in STOCHASTIC_DEPTH_ARCHS:
            raise ValueError(
                f"reg.stochastic_depth: {self.model.arch} has no stochastic depth; "
                "convnext_*, efficientnet_*, swin_* and maxvit_t have"
            )
        if self.strategy.kind == "lp_ft" and self.strategy.lp_epochs >= self.train.epochs:
            raise ValueError(
                f"strategy.lp_epochs: {self.strategy.lp_epochs} leaves no fine-tuning epoch "
                f"in train.epochs {self.train.epochs}"
            )
        self._check_devices()
        metrics = self.objective.all_metrics
        if self.task.kind == "meta":
            self._check_meta()
        elif any(m in META_METRICS for m in metrics):
            raise ValueError(f"objective: {list(metrics)}: meta_* metrics need task.kind: meta")
        if self.task.kind == "multitask":
            self._check_multitask()
        self._check_swa()
        return self

    def _check_swa(self) -> None:
        """`reg.swa_start`: SWA's first epoch within `train.epochs`, after LP-FT's linear probe
        (its switch replaces the optimizer that SWALR schedules)."""
        epochs, first = self.train.epochs, self.reg.swa_first_epoch(self.train.epochs)
        if first is None:
            return
        if first > epochs:
            raise ValueError(
                f"reg.swa_start: {self.reg.swa_start} of train.epochs {epochs} averages from "
                f"epoch {first}, after the last; give at most {(epochs - 1) / epochs:.4g}"
            )
        s = self.strategy
        if s.kind == "lp_ft" and first <= s.lp_epochs:
            raise ValueError(
                f"reg.swa_start: {self.reg.swa_start} averages from epoch {first}, within "
                f"LP-FT's linear probe (strategy.lp_epochs {s.lp_epochs}); start it after"
            )

    def _check_devices(self) -> None:
        """`train.devices_per_trial` K > 1: fine-tuning only, a global batch that splits evenly
        over the K ranks, no torch.compile (unmeasured with DDP)."""
        k = self.train.devices_per_trial
        if k == 1:
            return
        if self.task.kind != "finetune":
            raise ValueError(
                f"train.devices_per_trial: {k}: data-parallel trials are for fine-tuning only; "
                f"a {self.task.kind} study (task.kind: {self.task.kind}) runs on one device"
            )
        if self.train.batch_size % k:
            raise ValueError(
                f"train.batch_size: {self.train.batch_size} does not split over "
                f"train.devices_per_trial {k} ranks; give a multiple of {k}"
            )
        if self.train.compile:
            raise ValueError(f"train.compile: not supported with train.devices_per_trial {k} (> 1)")

    def _unused(self, section: str, allowed: tuple[str, ...] = ()) -> list[str]:
        """The keys of `section` set away from their defaults, less `allowed`."""
        value = getattr(self, section)
        default = type(value)()
        return [
            f"{section}.{k}"
            for k in type(value).model_fields
            if k not in allowed and getattr(value, k) != getattr(default, k)
        ]

    def _check_meta(self) -> None:
        bad = [m for m in self.objective.all_metrics if m not in META_METRICS]
        if bad:
            raise ValueError(
                f"objective: {bad}: a meta-learning study optimises {', '.join(META_METRICS)}"
            )
        if self.model.pretrained == "source":
            raise ValueError(
                "model.pretrained: source pretrains on data.source_classes, which meta-learning "
                "does not use; give none, imagenet, a file or a model URI"
            )
        unused = [
            *self._unused("train", ("device", "threads", "max_loss")),
            *self._unused("strategy"),
            *self._unused("reg"),
            *self._unused("aug"),
        ]
        if unused:
            raise ValueError(
                f"{', '.join(unused)}: no effect in a meta-learning study (task.kind: meta); "
                "its settings are under meta:"
            )
        m = self.meta
        sizes = m.split_sizes(self.data.dataset)
        if sizes is None:
            raise ValueError(
                f"meta.train_classes, val_classes, test_classes: {self.data.dataset} has no "
                "standard meta-learning split; give the three class lists"
            )
        eval_ways = m.eval_ways or m.ways
        for what, n, ways in (
            ("meta-train", sizes[0], m.ways),
            ("meta-val", sizes[1], eval_ways),
            ("meta-test", sizes[2], eval_ways),
        ):
            if ways > n:
                raise ValueError(
                    f"meta: {ways}-way tasks need {ways} {what} classes; the split has {n}"
                )

    def _check_multitask(self) -> None:
        mt = self.multitask
        if not mt.tasks:
            raise ValueError(
                "multitask.tasks: a multi-task study needs at least one auxiliary task"
            )
        if self.train.compile:
            raise ValueError(
                "train.compile: not supported in a multi-task study (task.kind: multitask); "
                "remove it (train.amp and train.channels_last apply on CUDA)"
            )
        unused = [
            *self._unused("strategy"),
            *self._unused("reg", ("weight_decay", "dropout")),
        ]
        if unused:
            raise ValueError(
                f"{', '.join(unused)}: not supported in a multi-task study (task.kind: "
                "multitask trains every parameter; reg.weight_decay and reg.dropout apply)"
            )
        target = list(self.data.target_classes)
        for name, aux in mt.tasks.items():
            if len(aux.groups) < 2:
                raise ValueError(f"multitask.tasks.{name}.groups: give two or more groups")
            members = [c for g in aux.groups for c in g]
            missing = [c for c in target if c not in members]
            extra = [c for c in members if c not in target]
            twice = sorted({c for c in members if members.count(c) > 1}, key=str)
            if missing or extra or twice:
                raise ValueError(
                    f"multitask.tasks.{name}.groups: every target class in exactly one group "
                    f"(missing {missing}, not target classes {extra}, repeated {twice})"
                )


class ExperimentSpec(TrialConfig):
    search: SearchSpec

    @property
    def soup(self) -> str:
        """The study's soup: `search.soup`, or when unset greedy (none for meta-learning and
        multi-objective studies)."""
        if self.search.soup is not None:
            return self.search.soup
        return "none" if self.task.kind == "meta" or self.objective.metrics else "greedy"

    @model_validator(mode="after")
    def _multi_objective(self) -> ExperimentSpec:
        if self.task.kind == "meta" and self.search.baseline:
            raise ValueError(
                "search.baseline: the founding recipe is a fine-tuning baseline; a meta-learning "
                "study sets search.baseline: false (compare it in a transfer study instead)"
            )
        if self.search.soup not in (None, "none"):
            if self.task.kind == "meta":
                raise ValueError(
                    "search.soup: a meta-learning study has no soup (its trials' weights are "
                    "initializations, not fine-tuned models to average); set it to none"
                )
            if self.objective.metrics is not None:
                raise ValueError(
                    "search.soup: a soup is chosen by one val objective; a multi-objective "
                    "study sets it to none"
                )
        if self.objective.metrics is None:
            if self.search.sampler == "nsga2":
                raise ValueError("search.sampler: nsga2 is for objective.metrics (several)")
            return self
        if self.search.pruner != "none":
            raise ValueError(
                "search.pruner: Optuna cannot prune multi-objective trials; set it to none"
            )
        if self.search.sampler == "cmaes":
            raise ValueError("search.sampler: cmaes is single-objective; use tpe, nsga2 or random")
        return self


# The founding document's recipe (ResNet50 on CIFAR-10: SGD lr 0.001, momentum 0.9,
# batch 32, full fine-tuning, no regularization), with the file's own epoch budget.
BASELINE = {
    "strategy.kind": "full",
    "strategy.layer_decay": 1.0,
    "strategy.head_lr_mult": 1.0,
    "strategy.bn": "train",
    "train.optimizer": "sgd",
    "train.lr": 0.001,
    "train.momentum": 0.9,
    "train.batch_size": 32,
    "train.schedule": "constant",
    **{f"reg.{k}": 0.0 for k in ("weight_decay", "l1", "l2", "l2_sp", "l2_sp_head", "dropout")},
    **{f"reg.{k}": 0.0 for k in ("stochastic_depth", "label_smoothing", "mixup_alpha")},
    **{f"reg.{k}": 0.0 for k in ("cutmix_alpha", "ema_decay", "swa_start", "swa_lr")},
    "aug.policy": "none",
}


# --- Building configs from dotted keys. ---
def leaf_keys(model: type[BaseModel] = TrialConfig, prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += leaf_keys(ann, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def set_dotted(tree: dict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for p in parents:
        node = tree.setdefault(p, {})
        if not isinstance(node, dict):
            raise SpecError(f"{key}: {p} is not a section")
        tree = node
    tree[last] = value


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for k, v in tree.items():
        if isinstance(v, dict) and k != "space":
            flat.update(flatten(v, f"{prefix}{k}."))
        else:
            flat[prefix + k] = v
    return flat


def _fields_at(loc: tuple) -> list[str]:
    """The keys a section of an experiment file accepts, for "did you mean" hints."""
    model: type[BaseModel] = ExperimentSpec
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        if model is SearchSpec and part == "space":
            if not parts:
                return []
            parts.pop(0)  # the searched key itself
            model = ParamSpec
            continue
        field = model.model_fields.get(str(part))
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return [f.alias or name for name, f in model.model_fields.items()]


def describe_error(err: ValidationError, where: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-after"))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(e["loc"][-1]), _fields_at(e["loc"][:-1]), n=3)
            msg = "unknown key" + (f" (did you mean {', '.join(close)}?)" if close else "")
        elif "input" in e and not isinstance(e["input"], dict):
            msg += f" (got {e['input']!r})"
        lines.append(f"{where}: {key or '(top level)'}: {msg}")
    return "\n".join(lines)


def trial_config(spec: ExperimentSpec, values: dict[str, Any]) -> TrialConfig:
    """The spec with dotted-key values applied (sampled or baseline), validated and frozen."""
    tree = spec.model_dump(exclude={"search"})
    for key, value in values.items():
        set_dotted(tree, key, value)
    try:
        return TrialConfig.model_validate(tree)
    except ValidationError as err:
        raise SpecError(describe_error(err, f"trial values {values}")) from None


def baseline_config(spec: ExperimentSpec) -> TrialConfig:
    """The founding recipe on the spec's data and model; a multi-task study's baseline is the
    plain fine-tune of the target task (what the auxiliary tasks must beat)."""
    values = dict(BASELINE)
    if spec.task.kind == "multitask":
        values["task.kind"] = "finetune"
    return trial_config(spec, values)


def active(param: ParamSpec, values: dict[str, Any]) -> bool:
    """Whether a conditional parameter is sampled, given the values known so far."""
    return all(values.get(k) in allowed for k, allowed in param.condition().items())


def fixed_values(spec: ExperimentSpec) -> dict[str, Any]:
    """The spec's own value for every leaf key: what conditions see for keys not searched."""
    return flatten(spec.model_dump(exclude={"search"}))


# --- Loading a file with overrides. ---


def describe_space(spec: ExperimentSpec) -> list[str]:
    lines = []
    for key, p in spec.search.space.items():
        rng = p.candidates()
        text = f"{p.kind} {rng}" + (" log" if p.log else "") + (f" step {p.step}" if p.step else "")
        if p.when:
            text += "  when " + ", ".join(f"{k} in {v}" for k, v in p.condition().items())
        lines.append(f"  {key}: {text}")
    return lines


def safe_name(text: str) -> str:
    """A file-name-safe form of a name or URI: no separators, no `..`."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._")
    return cleaned.replace("..", "_") or "unnamed"
