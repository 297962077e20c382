"""Experiment file -> validated ExperimentSpec; spec + sampled values -> frozen TrialConfig.

Reads top to bottom: the YAML loader, the sections of a file, the search-space syntax,
loading with `--set` overrides, then building one trial's config. Imports no torch, Optuna
or MLflow, so `run_study.py check` stays fast and reads no data.
"""

from __future__ import annotations

import difflib
import hashlib
import json
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

from harness.metrics import KINDS, OBJECTIVES
from harness.metrics import direction as better_direction


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


ClassId = Annotated[int, Field(ge=0)] | str  # an index, or a folder name (imagefolder)
# A YAML list, held as a tuple so that a frozen config is frozen all the way down.
ClassList = Annotated[
    tuple[ClassId, ...], BeforeValidator(lambda v: tuple(v) if isinstance(v, list) else v)
]
Probability = Annotated[float, Field(ge=0.0, lt=1.0)]
NonNegative = Annotated[float, Field(ge=0.0)]
NUM_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100, "mnist": 10, "fashionmnist": 10}
FLIP_UNSAFE = {"digits", "mnist"}  # a mirrored 2 is not a 2
FLIP_POLICIES = {"flip_crop"}


class DataSpec(_Section):
    dataset: Literal["digits", "cifar10", "cifar100", "mnist", "fashionmnist", "imagefolder"] = (
        "digits"
    )
    root: str = "data"  # folder of torchvision data sets and of an imagefolder
    download: bool = False  # torchvision data sets: download into root when missing
    source_classes: ClassList = (0, 1, 2, 3, 4)
    target_classes: ClassList = (5, 6, 7, 8, 9)
    shots_per_class: Annotated[int, Field(ge=1)] | None = 20  # None: every train image
    val_per_class: Annotated[int, Field(ge=1)] = 30
    # digits and imagefolder without a test/ folder: test images per class (None: the rest);
    # torchvision data sets use their official test split, restricted to the target classes.
    test_per_class: Annotated[int, Field(ge=1)] | None = None
    image_size: Annotated[int, Field(ge=8, le=1024)] | None = None  # None: the model's own
    allow_duplicates: bool = False  # exact duplicates across train/val/test: error unless true
    split_seed: Annotated[int, Field(ge=0)] | None = None  # seeds the split; None: `seed`
    eval_train_max: Annotated[int, Field(ge=1)] = 512  # clean-train subset for the gap
    # a train split bigger than this (GB of uint8 pixels) streams from the host to the device
    # batch by batch; None: half of the device's free memory (the CPU: of the available RAM)
    device_budget_gb: Annotated[float, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _classes(self) -> DataSpec:
        n = NUM_CLASSES.get(self.dataset)
        for key in ("source_classes", "target_classes"):
            values = getattr(self, key)
            if len(set(values)) != len(values):
                raise ValueError(f"{key}: classes repeat in {list(values)}")
            if n is None:
                continue
            names = [c for c in values if isinstance(c, str)]
            if names:
                raise ValueError(f"{key}: {names}: {self.dataset} classes are indices 0..{n - 1}")
            bad = [c for c in values if c >= n]
            if bad:
                raise ValueError(f"{key}: {bad} out of range for {self.dataset} (0..{n - 1})")
        if len(self.target_classes) < 2:
            raise ValueError("target_classes: need at least 2 classes")
        return self


# torchvision's classification models (torchvision.models.list_models(module=torchvision.models)
# for 0.29; a test keeps this in step), so that `check` needs no torchvision import.
# fmt: off
TORCHVISION_ARCHS = (
    "alexnet", "convnext_base", "convnext_large", "convnext_small", "convnext_tiny",
    "densenet121", "densenet161", "densenet169", "densenet201", "efficientnet_b0",
    "efficientnet_b1", "efficientnet_b2", "efficientnet_b3", "efficientnet_b4",
    "efficientnet_b5", "efficientnet_b6", "efficientnet_b7", "efficientnet_v2_l",
    "efficientnet_v2_m", "efficientnet_v2_s", "googlenet", "inception_v3", "maxvit_t",
    "mnasnet0_5", "mnasnet0_75", "mnasnet1_0", "mnasnet1_3", "mobilenet_v2",
    "mobilenet_v3_large", "mobilenet_v3_small", "regnet_x_16gf", "regnet_x_1_6gf",
    "regnet_x_32gf", "regnet_x_3_2gf", "regnet_x_400mf", "regnet_x_800mf", "regnet_x_8gf",
    "regnet_y_128gf", "regnet_y_16gf", "regnet_y_1_6gf", "regnet_y_32gf", "regnet_y_3_2gf",
    "regnet_y_400mf", "regnet_y_800mf", "regnet_y_8gf", "resnet101", "resnet152", "resnet18",
    "resnet34", "resnet50", "resnext101_32x8d", "resnext101_64x4d", "resnext50_32x4d",
    "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0",
    "squeezenet1_0", "squeezenet1_1", "swin_b", "swin_s", "swin_t", "swin_v2_b", "swin_v2_s",
    "swin_v2_t", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19",
    "vgg19_bn", "vit_b_16", "vit_b_32", "vit_h_14", "vit_l_16", "vit_l_32", "wide_resnet101_2",
    "wide_resnet50_2",
)
# fmt: on
ARCHS = ("small_cnn", *TORCHVISION_ARCHS)
# torchvision's models with stochastic depth (ConvNeXt, EfficientNet, Swin, MaxViT).
STOCHASTIC_DEPTH_ARCHS = tuple(
    a for a in TORCHVISION_ARCHS if a.startswith(("convnext_", "efficientnet_", "swin_", "maxvit_"))
)


class ModelSpec(_Section):
    arch: str = "small_cnn"  # small_cnn, or a torchvision classification model by name
    width: Annotated[int, Field(ge=4, le=512)] = 32  # small_cnn only
    # none | source | imagenet (torchvision weights, `weights`) | a local state_dict file |
    # an MLflow model URI (models:/NAME/VERSION or runs:/RUN_ID/PATH)
    pretrained: str = "source"
    weights: Annotated[str, Field(pattern=r"^[A-Z0-9_]+$")] = "IMAGENET1K_V1"  # enum member
    # How the source model is pretrained (its cache key): SGD, cosine, momentum 0.9.
    source_epochs: Annotated[int, Field(ge=1)] = 15
    source_lr: Annotated[float, Field(gt=0.0)] = 0.05
    source_batch_size: Annotated[int, Field(ge=2)] = 64

    @model_validator(mode="after")
    def _known(self) -> ModelSpec:
        if self.arch not in ARCHS:
            close = difflib.get_close_matches(self.arch, ARCHS, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(f"arch: unknown model {self.arch!r}{hint}")
        if self.pretrained == "imagenet" and self.arch == "small_cnn":
            raise ValueError("pretrained: imagenet weights exist for torchvision models only")
        if not self.pretrained:
            raise ValueError("pretrained: give none, source, imagenet, a file or a model URI")
        return self

    @property
    def pretrained_kind(self) -> str:
        """none, source, imagenet, file or mlflow."""
        if self.pretrained in ("none", "source", "imagenet"):
            return self.pretrained
        return "mlflow" if self.pretrained.startswith(("models:/", "runs:/")) else "file"


class TrainSpec(_Section):
    epochs: Annotated[int, Field(ge=1)] = 10
    batch_size: Annotated[int, Field(ge=2)] = 32
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: Annotated[float, Field(gt=0.0, le=10.0)] = 0.001
    momentum: Probability = 0.9
    schedule: Literal["constant", "cosine"] = "constant"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: Annotated[int, Field(ge=1)] | None = None  # CPU threads; None: torch's default
    max_loss: Annotated[float, Field(gt=0.0)] = 1.0e4  # a running train loss above: diverged
    amp: bool = True  # bf16 autocast on CUDA; the CPU always computes in fp32
    channels_last: bool = True  # CUDA: channels_last memory format for convolutional models
    compile: bool = False  # torch.compile the model; its compile time is `compile_seconds`


class StrategySpec(_Section):
    kind: Literal["full", "linear_probe", "partial", "lp_ft", "gradual_unfreeze"] = "full"
    freeze_stages: Annotated[int, Field(ge=0)] = 1  # partial: the first k backbone stages frozen
    lp_epochs: Annotated[int, Field(ge=1)] = 2  # lp_ft: linear-probe epochs, then full FT
    ft_lr_scale: Annotated[float, Field(gt=0.0, le=1.0)] = 0.1  # lp_ft: FT lr = train.lr x this
    unfreeze_every: Annotated[int, Field(ge=1)] = 1  # gradual_unfreeze: a stage every n epochs
    layer_decay: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0  # stage lr x decay^depth
    head_lr_mult: Annotated[float, Field(gt=0.0, le=100.0)] = 1.0
    bn: Literal["train", "frozen"] = "train"  # frozen: BatchNorm in eval mode, statistics kept


class RegSpec(_Section):
    weight_decay: NonNegative = 0.0  # the optimizer's (decoupled for AdamW)
    decay_norm_bias: bool = False  # false: norm and bias parameters get no weight decay
    l1: NonNegative = 0.0  # L1 penalty added to the loss
    l2: NonNegative = 0.0  # L2 penalty added to the loss (coupled)
    l2_sp: NonNegative = 0.0  # L2-SP: penalty toward the pretrained backbone weights
    l2_sp_head: NonNegative = 0.0  # L2-SP's plain L2 term on the new head
    dropout: Probability = 0.0  # before the head
    stochastic_depth: Probability = 0.0  # where the torchvision architecture supports it
    label_smoothing: Probability = 0.0
    mixup_alpha: NonNegative = 0.0  # 0: off
    cutmix_alpha: NonNegative = 0.0  # 0: off
    ema_decay: Probability = 0.0  # 0: off; else EMA weights are evaluated and kept


class AugSpec(_Section):
    policy: Literal[
        "none",
        "crop",  # pad, then crop at a random offset
        "flip_crop",  # crop, and a horizontal flip with probability 0.5
        "randaugment",
        "trivialaugment",
        "autoaugment",
        "random_erasing",
    ] = "none"
    crop_padding: Annotated[int, Field(ge=1, le=32)] = 1
    magnitude: Annotated[int, Field(ge=0, le=30)] = 9  # randaugment
    num_ops: Annotated[int, Field(ge=1, le=5)] = 2  # randaugment
    erasing_p: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5  # random_erasing


# The core's metrics a study can optimise (harness.metrics); meta-learning's are meta_*.
META_METRICS = KINDS["meta"].objectives
Metric = Literal[OBJECTIVES]
Direction = Literal["maximize", "minimize"]


class ObjectiveSpec(_Section):
    """One metric (`metric`, `direction`), or several (`metrics`, `directions`): a
    multi-objective study, whose first metric picks each trial's best epoch."""

    metric: Metric = "val_acc"
    direction: Direction = "maximize"
    metrics: tuple[Metric, ...] | None = None
    directions: tuple[Direction, ...] | None = None

    @model_validator(mode="before")
    @classmethod
    def _primary(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
            if data.get("metrics") and "metric" not in data and data.get("directions"):
                data["metric"], data["direction"] = data["metrics"][0], data["directions"][0]
        return data

    @model_validator(mode="after")
    def _sense(self) -> ObjectiveSpec:
        if (self.metrics is None) != (self.directions is None):
            raise ValueError("metrics and directions: give both, one direction per metric")
        pairs = [(self.metric, self.direction)]
        if self.metrics is not None:
            if len(self.metrics) != len(self.directions) or len(self.metrics) < 2:
                raise ValueError("metrics and directions: two or more, one direction per metric")
            if len(set(self.metrics)) != len(self.metrics):
                raise ValueError(f"metrics: repeated in {list(self.metrics)}")
            if (self.metric, self.direction) != (self.metrics[0], self.directions[0]):
                raise ValueError("metric: with metrics, leave it out (the first metric is used)")
            pairs = list(zip(self.metrics, self.directions, strict=True))
        for metric, direction in pairs:
            wanted = better_direction(metric)
            if direction != wanted:
                raise ValueError(f"direction: {metric} should be {wanted}d, not {direction}d")
        return self

    @property
    def all_metrics(self) -> tuple[str, ...]:
        return self.metrics or (self.metric,)

    @property
    def all_directions(self) -> tuple[str, ...]:
        return self.directions or (self.direction,)


class TaskSpec(_Section):
    # finetune: `fit` on the target task; meta: episodic meta-learning (`meta:`); multitask:
    # the target task plus auxiliary heads on one backbone (`multitask:`)
    kind: Literal["finetune", "meta", "multitask"] = "finetune"


# Class counts of the standard meta-learning splits (harness.meta: DIGITS_SPLIT, CIFAR-FS),
# used when `meta.train_classes` and friends are not given.
META_SPLIT_SIZES = {"digits": (4, 3, 3), "cifar100": (64, 16, 20)}
Count = Annotated[int, Field(ge=1)]


class MetaSpec(_Section):
    """Episodic meta-learning (task.kind: meta): what `meta.meta_fit` reads."""

    algorithm: Literal["maml", "fomaml", "reptile", "protonet"] = "protonet"
    ways: Annotated[int, Field(ge=2)] = 3  # meta-train tasks: N-way
    shots: Count = 1  # K-shot
    queries: Count = 5  # query images per class
    eval_ways: Annotated[int, Field(ge=2)] | None = None  # meta-val and meta-test; None: ways
    eval_shots: Count | None = None  # meta-val episodes; None: shots
    eval_queries: Count | None = None  # None: queries
    inner_lr: Annotated[float, Field(gt=0.0, le=10.0)] = 0.4  # MAML/Reptile inner SGD step
    inner_steps: Annotated[int, Field(ge=0, le=100)] = 5
    eval_inner_steps: Annotated[int, Field(ge=0, le=100)] | None = None  # None: inner_steps
    meta_lr: Annotated[float, Field(gt=0.0, le=10.0)] = 1e-3
    meta_optimizer: Literal["adam", "sgd"] = "adam"
    meta_batch_size: Count = 4  # tasks per meta-step
    meta_epochs: Count = 10
    episodes_per_epoch: Count = 40  # meta-train tasks per meta-epoch
    val_episodes: Count = 50  # the fixed seeded meta-val episodes scored every meta-epoch
    schedule: Literal["constant", "cosine"] = "constant"
    recalibrate_bn: bool = True  # BatchNorm statistics recomputed for the kept init
    # The class split; None: the data set's standard one (digits 0-3 / 4-6 / 7-9, CIFAR-100:
    # CIFAR-FS's 64/16/20). Give all three for other data sets.
    train_classes: ClassList | None = None
    val_classes: ClassList | None = None
    test_classes: ClassList | None = None
    test_episodes: Count = 600  # meta-test episodes, scored once for the chosen trial
    test_shots: Annotated[
        tuple[Count, ...], BeforeValidator(lambda v: tuple(v) if isinstance(v, list) else v)
    ] = (1, 5)

    @property
    def val_shape(self) -> tuple[int, int, int]:
        """(ways, shots, queries) of evaluation episodes."""
        return (
            self.eval_ways or self.ways,
            self.eval_shots or self.shots,
            self.eval_queries or self.queries,
        )

    @property
    def test_inner_steps(self) -> int:
        return self.inner_steps if self.eval_inner_steps is None else self.eval_inner_steps

    @model_validator(mode="after")
    def _split(self) -> MetaSpec:
        given = [self.train_classes, self.val_classes, self.test_classes]
        if any(g is not None for g in given) and any(g is None for g in given):
            raise ValueError("train_classes, val_classes, test_classes: give all three or none")
        if all(g is not None for g in given):
            every = [c for g in given for c in g]
            if len(set(every)) != len(every):
                raise ValueError("train_classes, val_classes, test_classes: must be disjoint")
        if not self.test_shots:
            raise ValueError("test_shots: give at least one shot count")
        return self

    def split_sizes(self, dataset: str) -> tuple[int, int, int] | None:
        if self.train_classes is not None:
            return (len(self.train_classes), len(self.val_classes), len(self.test_classes))
        return META_SPLIT_SIZES.get(dataset)


class AuxTaskSpec(_Section):
    """An auxiliary task: each target class belongs to one group; the group is its label."""

    groups: Annotated[
        tuple[ClassList, ...], BeforeValidator(lambda v: tuple(v) if isinstance(v, list) else v)
    ]
    weight: NonNegative = 1.0  # its loss weight under fixed weighting


class MultiTaskSpec(_Section):
    """Multi-task learning (task.kind: multitask): the target task (the model's head) plus a
    head per auxiliary task on the shared backbone."""

    weighting: Literal["fixed", "uncertainty"] = "fixed"  # uncertainty: Kendall et al. 2018
    target_weight: NonNegative = 1.0  # the target task's loss weight under fixed weighting
    tasks: dict[str, AuxTaskSpec] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _names(self) -> MultiTaskSpec:
        for name in self.tasks:
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name) or name == "target":
                raise ValueError(
                    f"tasks: {name!r}: a name of letters, digits and _ (from a letter), not target"
                )
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


class SearchSpec(_Section):
    n_trials: Annotated[int, Field(ge=1)] = 20
    sampler: Literal["tpe", "random", "cmaes", "gp", "nsga2", "grid"] = "tpe"
    pruner: Literal["median", "hyperband", "none"] = "median"
    pruner_warmup_epochs: Annotated[int, Field(ge=0)] = 2
    baseline: bool = True  # the founding document's recipe runs as trial 0
    space: dict[str, ParamSpec]
    # Best weights of complete trials: the top_k best (and the baseline) keep theirs, or all, or
    # none. Pruned and failed trials keep none.
    keep_checkpoints: Literal["top_k", "all", "none"] = "top_k"
    top_k: Annotated[int, Field(ge=1)] = 3
    system_metrics_interval: Annotated[float, Field(gt=0.0)] = 5.0  # seconds; MLflow's sampler
    # true: per-epoch metrics go through MLflow's async logging queue. Measured on the local
    # SQLite store it costs more (the queue's flush adds ~0.9 s a run): off by default.
    async_logging: bool = False
    # Trials to run first, each a mapping of searched keys to values (the other keys are
    # sampled), e.g. one trial per algorithm: Optuna's enqueue_trial, once per study.
    enqueue: Annotated[
        tuple[dict[str, Scalar], ...],
        BeforeValidator(lambda v: tuple(v) if isinstance(v, list) else v),
    ] = ()


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
        metrics = self.objective.all_metrics
        if self.task.kind == "meta":
            self._check_meta()
        elif any(m in META_METRICS for m in metrics):
            raise ValueError(f"objective: {list(metrics)}: meta_* metrics need task.kind: meta")
        if self.task.kind == "multitask":
            self._check_multitask()
        return self

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

    @model_validator(mode="after")
    def _multi_objective(self) -> ExperimentSpec:
        if self.task.kind == "meta" and self.search.baseline:
            raise ValueError(
                "search.baseline: the founding recipe is a fine-tuning baseline; a meta-learning "
                "study sets search.baseline: false (compare it in a transfer study instead)"
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
    **{f"reg.{k}": 0.0 for k in ("cutmix_alpha", "ema_decay")},
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


def _check_space(spec: ExperimentSpec, where: str) -> None:
    if not spec.search.space:
        raise SpecError(f"{where}: search.space: empty; give at least one key to search")
    known = (set(leaf_keys()) | set(fixed_values(spec))) - {"name"}
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
    if spec.search.sampler == "grid":
        _check_grid(spec, where)
    for i, values in enumerate(spec.search.enqueue):
        at = f"{where}: search.enqueue[{i}]"
        for key, value in values.items():
            param = spec.search.space.get(key)
            if param is None:
                raise SpecError(f"{at}: {key} is not a key of search.space")
            if param.kind == "categorical" and value not in param.categorical:
                raise SpecError(f"{at}: {key}={value!r} is not one of {param.categorical}")
            if param.kind != "categorical" and not (
                isinstance(value, int | float)
                and param.candidates()[0] <= value <= param.candidates()[1]
            ):
                raise SpecError(f"{at}: {key}={value!r} is outside {param.candidates()}")
        try:
            trial_config(spec, dict(values))
        except SpecError as err:
            raise SpecError(f"{at}: {err}") from None


def grid_points(spec: ExperimentSpec) -> int:
    n = 1
    for param in spec.search.space.values():
        n *= len(param.categorical or ())
    return n


def _check_grid(spec: ExperimentSpec, where: str) -> None:
    for key, param in spec.search.space.items():
        if param.kind != "categorical" or param.when:
            raise SpecError(
                f"{where}: search.space.{key}: the grid sampler needs categorical keys with no "
                "`when` (list the values to try)"
            )
    most = grid_points(spec) + int(spec.search.baseline)
    if spec.search.n_trials > most:
        raise SpecError(
            f"{where}: search.n_trials: {spec.search.n_trials}, but the grid has "
            f"{grid_points(spec)} points" + (" (+ the baseline)" if spec.search.baseline else "")
        )


# --- Loading a file with overrides. ---
def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentSpec:
    """Read, override (`key=value`, YAML-typed) and validate; raise SpecError naming the problem."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such experiment file")
    try:
        tree = parse_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise SpecError(
            f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); "
            "save the experiment file as UTF-8"
        ) from None
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


def safe_name(text: str) -> str:
    """A file-name-safe form of a name or URI: no separators, no `..`."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._")
    return cleaned.replace("..", "_") or "unnamed"
