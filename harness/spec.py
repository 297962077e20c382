"""Experiment file -> validated ExperimentSpec; spec + sampled values -> frozen TrialConfig.

Reads top to bottom: the YAML loader, the sections of a file, the search-space syntax,
loading with `--set` overrides, then building one trial's config. Imports no torch, Optuna
or MLflow, so `run_study.py check` stays fast and reads no data.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)


class SpecError(ValueError):
    """A bad experiment file or override; the message names the file, the key and the problem."""


# --- YAML: PyYAML reads `1e-3` as a string (YAML 1.1); an experiment file means a float. ---
class _Loader(yaml.SafeLoader):
    pass


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


# --- The sections of an experiment file. Unknown keys and wrong types fail (strict). ---
class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


ClassIndex = Annotated[int, Field(ge=0)]
# A YAML list, held as a tuple so that a frozen config is frozen all the way down.
ClassList = Annotated[
    tuple[ClassIndex, ...], BeforeValidator(lambda v: tuple(v) if isinstance(v, list) else v)
]
Probability = Annotated[float, Field(ge=0.0, lt=1.0)]
NUM_CLASSES = {"digits": 10}


class DataSpec(_Section):
    dataset: Literal["digits"] = "digits"
    source_classes: ClassList = (0, 1, 2, 3, 4)
    target_classes: ClassList = (5, 6, 7, 8, 9)
    shots_per_class: Annotated[int, Field(ge=1)] = 20
    val_per_class: Annotated[int, Field(ge=1)] = 30
    eval_train_max: Annotated[int, Field(ge=1)] = 2048  # clean-train subset for the gap

    @model_validator(mode="after")
    def _classes(self) -> DataSpec:
        n = NUM_CLASSES[self.dataset]
        for key in ("source_classes", "target_classes"):
            values = getattr(self, key)
            if len(set(values)) != len(values):
                raise ValueError(f"{key}: classes repeat in {values}")
            bad = [c for c in values if c >= n]
            if bad:
                raise ValueError(f"{key}: {bad} out of range for {self.dataset} (0..{n - 1})")
        if len(self.target_classes) < 2:
            raise ValueError("target_classes: need at least 2 classes")
        overlap = set(self.source_classes) & set(self.target_classes)
        if overlap:
            raise ValueError(f"source_classes and target_classes share {sorted(overlap)}")
        return self


class ModelSpec(_Section):
    arch: Literal["small_cnn"] = "small_cnn"
    width: Annotated[int, Field(ge=4, le=512)] = 32
    pretrained: Literal["source", "none"] = "source"
    # How the source model is pretrained (its cache key): SGD, cosine, momentum 0.9.
    source_epochs: Annotated[int, Field(ge=1)] = 15
    source_lr: Annotated[float, Field(gt=0.0)] = 0.05
    source_batch_size: Annotated[int, Field(ge=2)] = 64


class TrainSpec(_Section):
    epochs: Annotated[int, Field(ge=1)] = 10
    batch_size: Annotated[int, Field(ge=2)] = 32
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: Annotated[float, Field(gt=0.0, le=10.0)] = 0.001
    momentum: Probability = 0.9
    schedule: Literal["constant", "cosine"] = "constant"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: Annotated[int, Field(ge=1)] | None = None  # CPU threads; None: torch's default


class StrategySpec(_Section):
    kind: Literal["full", "linear_probe"] = "full"


class RegSpec(_Section):
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0
    dropout: Probability = 0.0


class AugSpec(_Section):
    policy: Literal["none", "crop"] = "none"  # crop: pad, then crop at a random offset
    crop_padding: Annotated[int, Field(ge=1, le=8)] = 1


EPOCH_METRICS = ("val_acc", "val_loss", "overfit_gap", "overfit_gap_loss", "train_acc")
_MAXIMIZED = {"val_acc", "train_acc"}


class ObjectiveSpec(_Section):
    metric: Literal["val_acc", "val_loss", "overfit_gap", "overfit_gap_loss", "train_acc"] = (
        "val_acc"
    )
    direction: Literal["maximize", "minimize"] = "maximize"

    @model_validator(mode="after")
    def _sense(self) -> ObjectiveSpec:
        wanted = "maximize" if self.metric in _MAXIMIZED else "minimize"
        if self.direction != wanted:
            raise ValueError(f"direction: {self.metric} should be {wanted}d, not {self.direction}d")
        return self


Scalar = bool | int | float | str


class ParamSpec(_Section):
    """One searched key: exactly one of `float: [lo, hi]`, `int: [lo, hi]`, `categorical: [...]`."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True)
    float_: list[float] | None = Field(None, alias="float")
    int_: list[int] | None = Field(None, alias="int")
    categorical: list[Scalar] | None = None
    log: bool = False
    step: float | None = None
    when: dict[str, Scalar | list[Scalar]] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> ParamSpec:
        kinds = [k for k in ("float", "int", "categorical") if self.bounds_of(k) is not None]
        if len(kinds) != 1:
            raise ValueError(
                "give exactly one of float: [lo, hi], int: [lo, hi], categorical: [...]"
            )
        if kinds[0] == "categorical":
            if not self.categorical:
                raise ValueError("categorical: needs at least one choice")
            if self.log or self.step is not None:
                raise ValueError("log and step apply to float and int ranges only")
            return self
        bounds = self.bounds_of(kinds[0])
        if len(bounds) != 2 or not bounds[0] < bounds[1]:
            raise ValueError(f"{kinds[0]}: needs [low, high] with low < high, got {bounds}")
        if self.log and bounds[0] <= 0:
            raise ValueError(f"log: needs a positive low bound, got {bounds[0]}")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined")
        if self.step is not None and self.step <= 0:
            raise ValueError(f"step: must be positive, got {self.step}")
        if self.step is not None and kinds[0] == "int" and not float(self.step).is_integer():
            raise ValueError(f"step: an int range needs a whole-number step, got {self.step}")
        return self

    def bounds_of(self, kind: str) -> list | None:
        return {"float": self.float_, "int": self.int_, "categorical": self.categorical}[kind]

    @property
    def kind(self) -> str:
        return next(k for k in ("float", "int", "categorical") if self.bounds_of(k) is not None)

    def candidates(self) -> list:
        """The values that must all be valid for the key: both ends of a range, or every choice."""
        return list(self.bounds_of(self.kind))

    def condition(self) -> dict[str, list]:
        return {k: v if isinstance(v, list) else [v] for k, v in (self.when or {}).items()}


SAMPLERS = ("tpe", "random", "cmaes", "gp")
PRUNERS = ("median", "hyperband", "none")


class SearchSpec(_Section):
    n_trials: Annotated[int, Field(ge=1)] = 20
    sampler: Literal["tpe", "random", "cmaes", "gp"] = "tpe"
    pruner: Literal["median", "hyperband", "none"] = "median"
    pruner_warmup_epochs: Annotated[int, Field(ge=0)] = 2
    baseline: bool = True  # the founding document's recipe runs as trial 0
    space: dict[str, ParamSpec]


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


class ExperimentSpec(TrialConfig):
    search: SearchSpec


# The founding document's recipe (ResNet50 on CIFAR-10: SGD lr 0.001, momentum 0.9,
# batch 32, full fine-tuning, no regularization), with the file's own epoch budget.
BASELINE = {
    "strategy.kind": "full",
    "train.optimizer": "sgd",
    "train.lr": 0.001,
    "train.momentum": 0.9,
    "train.batch_size": 32,
    "train.schedule": "constant",
    "reg.weight_decay": 0.0,
    "reg.dropout": 0.0,
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


def _set_dotted(tree: dict, key: str, value: Any) -> None:
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


def _describe(err: ValidationError, where: str) -> str:
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
        _set_dotted(tree, key, value)
    try:
        return TrialConfig.model_validate(tree)
    except ValidationError as err:
        raise SpecError(_describe(err, f"trial values {values}")) from None


def baseline_config(spec: ExperimentSpec) -> TrialConfig:
    return trial_config(spec, BASELINE)


def active(param: ParamSpec, values: dict[str, Any]) -> bool:
    """Whether a conditional parameter is sampled, given the values known so far."""
    return all(values.get(k) in allowed for k, allowed in param.condition().items())


def fixed_values(spec: ExperimentSpec) -> dict[str, Any]:
    """The spec's own value for every leaf key: what conditions see for keys not searched."""
    return flatten(spec.model_dump(exclude={"search"}))


def _check_space(spec: ExperimentSpec, where: str) -> None:
    if not spec.search.space:
        raise SpecError(f"{where}: search.space: empty; give at least one key to search")
    known = set(leaf_keys()) - {"name"}
    seen: dict[str, ParamSpec] = {}
    for key, param in spec.search.space.items():
        at = f"{where}: search.space.{key}"
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise SpecError(f"{at}: not a key of the experiment file{hint}")
        for value in param.candidates():
            try:
                trial_config(spec, {key: value})
            except SpecError as err:
                raise SpecError(f"{at}: value {value!r} is invalid: {err}") from None
        for cond, allowed in param.condition().items():
            if cond == key or cond not in known:
                raise SpecError(f"{at}: when: {cond} is not a searched key or a file key")
            if cond in spec.search.space and cond not in seen:
                raise SpecError(f"{at}: when: {cond} must be listed before {key} in the space")
            if cond in seen and seen[cond].kind != "categorical":
                rng = seen[cond].candidates()
                bad = [
                    v
                    for v in allowed
                    if seen[cond].kind == "float"
                    or not (isinstance(v, int) and rng[0] <= v <= rng[1])
                ]
                if bad:
                    raise SpecError(
                        f"{at}: when: {cond}={bad[0]!r} can never hold: {cond} is searched as "
                        f"{seen[cond].kind} {rng} (conditions need a categorical, an int in range, "
                        "or a key that is not searched)"
                    )
            choices = seen[cond].categorical if cond in seen else None
            for value in allowed:
                if choices is not None and value not in choices:
                    raise SpecError(f"{at}: when: {cond}={value!r} is not one of {choices}")
                if choices is None and cond not in spec.search.space:
                    try:
                        trial_config(spec, {cond: value})
                    except SpecError as err:
                        raise SpecError(f"{at}: when: {cond}={value!r} is invalid: {err}") from None
        seen[key] = param


# --- Loading a file with overrides. ---
def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentSpec:
    """Read, override (`key=value`, YAML-typed) and validate; raise SpecError naming the problem."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such experiment file")
    try:
        tree = parse_yaml(path.read_text())
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: YAML syntax error: {err}") from None
    if not isinstance(tree, dict):
        raise SpecError(f"{path}: the file must be a mapping of sections (name, data, model, ...)")
    where = str(path)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SpecError(f"--set {item}: expected key=value, e.g. train.lr=0.01")
        if key.startswith("search.space"):
            raise SpecError(
                f"--set {item}: edit the search space in the file; --set a key to pin it"
            )
        try:
            value = parse_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise SpecError(f"--set {item}: cannot parse the value: {err}") from None
        space = (
            tree.get("search", {}).get("space") if isinstance(tree.get("search"), dict) else None
        )
        if isinstance(space, dict):
            space.pop(key, None)  # pinned: the key leaves the space
        try:
            _set_dotted(tree, key, value)
        except SpecError as err:
            raise SpecError(f"--set {item}: {err}") from None
        where = f"{path} (with --set {', '.join(overrides)})"
    try:
        spec = ExperimentSpec.model_validate(tree)
    except ValidationError as err:
        raise SpecError(_describe(err, where)) from None
    _check_space(spec, where)
    return spec


def spec_hash(spec: ExperimentSpec) -> str:
    """Hash of the resolved spec, less the trial budget (a larger budget extends a study)."""
    tree = spec.model_dump(mode="json", by_alias=True)
    tree["search"].pop("n_trials")
    blob = json.dumps(tree, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def describe_space(spec: ExperimentSpec) -> list[str]:
    lines = []
    for key, p in spec.search.space.items():
        rng = p.candidates()
        text = f"{p.kind} {rng}" + (" log" if p.log else "") + (f" step {p.step}" if p.step else "")
        if p.when:
            text += "  when " + ", ".join(f"{k} in {v}" for k, v in p.condition().items())
        lines.append(f"  {key}: {text}")
    return lines


def is_finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
