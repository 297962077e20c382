"""The sections of an experiment file (data, model, train, strategy, reg, aug, objective,
task, meta, multitask, search) as strict, frozen pydantic models: unknown keys and wrong
types fail. `spec` builds the whole file and each trial's config from them. Imports no
torch, Optuna or MLflow.
"""

from __future__ import annotations

import difflib
import math
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    model_validator,
)

from harness.config.metrics import KINDS, OBJECTIVES
from harness.config.metrics import direction as better_direction


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
FLIP_POLICIES = {"flip_crop", "random_resized_crop_flip"}


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
    # imagefolder: the side decoded and cached (>= image_size), so that random-resized-crop
    # augmentation crops from more pixels than the network sees; evaluation takes the center
    # image_size/cache_size of it. None: decode at image_size.
    cache_size: Annotated[int, Field(ge=8, le=2048)] | None = None

    @model_validator(mode="after")
    def _cache_size(self) -> DataSpec:
        if self.cache_size is None:
            return self
        if self.dataset != "imagefolder":
            raise ValueError(f"cache_size: for imagefolder data only, not {self.dataset}")
        if self.image_size is None or self.cache_size < self.image_size:
            raise ValueError(
                f"cache_size: {self.cache_size} needs an image_size at most that large "
                f"(image_size is {self.image_size})"
            )
        return self

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
    # data-parallel ranks of one trial (DistributedDataParallel; harness.core.distributed): GPUs of
    # the node on CUDA (nccl), processes splitting the CPU threads on the CPU (gloo)
    devices_per_trial: Annotated[int, Field(ge=1, le=64)] = 1


class StrategySpec(_Section):
    kind: Literal["full", "linear_probe", "partial", "lp_ft", "gradual_unfreeze"] = "full"
    freeze_stages: Annotated[int, Field(ge=0)] = 1  # partial: the first k backbone stages frozen
    lp_epochs: Annotated[int, Field(ge=1)] = 2  # lp_ft: linear-probe epochs, then full FT
    ft_lr_scale: Annotated[float, Field(gt=0.0, le=1.0)] = 0.1  # lp_ft: FT lr = train.lr x this
    unfreeze_every: Annotated[int, Field(ge=1)] = 1  # gradual_unfreeze: a stage every n epochs
    layer_decay: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0  # stage lr x decay^depth
    head_lr_mult: Annotated[float, Field(gt=0.0, le=100.0)] = 1.0
    # frozen: BatchNorm in eval mode, statistics kept; sync (devices_per_trial > 1): batch
    # statistics over the global batch (SyncBatchNorm); train: each rank's own batch statistics
    bn: Literal["train", "frozen", "sync"] = "train"


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
    # SWA (torch.optim.swa_utils): 0: off; else the epochs from `swa_first_epoch` are averaged
    swa_start: Probability = 0.0
    swa_lr: NonNegative = 0.0  # SWALR's target lr; 0: the schedule's at the SWA start

    @model_validator(mode="after")
    def _one_average(self) -> RegSpec:
        if self.swa_start > 0 and self.ema_decay > 0:
            raise ValueError(
                "reg.swa_start and reg.ema_decay: SWA and the EMA each replace the evaluated "
                "and kept weights; set one of them to 0"
            )
        return self

    def swa_first_epoch(self, epochs: int) -> int | None:
        """SWA's first epoch, ceil(swa_start x epochs) + 1 (the product rounded to 9 decimals,
        so 0.3 x 10 is 3); None when SWA is off."""
        if self.swa_start == 0:
            return None
        return math.ceil(round(self.swa_start * epochs, 9)) + 1


class AugSpec(_Section):
    policy: Literal[
        "none",
        "crop",  # pad, then crop at a random offset
        "flip_crop",  # crop, and a horizontal flip with probability 0.5
        "randaugment",
        "trivialaugment",
        "autoaugment",
        "random_erasing",
        "random_resized_crop",  # a random area (8-100 %) and aspect (3/4-4/3), resized back
        "random_resized_crop_flip",  # and a horizontal flip with probability 0.5
    ] = "none"
    crop_padding: Annotated[int, Field(ge=1, le=32)] = 1
    magnitude: Annotated[int, Field(ge=0, le=30)] = 9  # randaugment
    num_ops: Annotated[int, Field(ge=1, le=5)] = 2  # randaugment
    erasing_p: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5  # random_erasing


# The core's metrics a study can optimise (harness.config.metrics); meta-learning's are meta_*.
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


# Class counts of the standard meta-learning splits (harness.core.meta: DIGITS_SPLIT, CIFAR-FS),
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
    # per-epoch metrics are written to MLflow at most every this many seconds from the run's
    # start (and when the trial ends), the resume state and the heartbeat with them, the params
    # with the first write or this long after the start: a 1 s trial makes one write,
    # a 10 min trial still shows live curves. 0: every epoch. At most 300 s: the heartbeat goes
    # with the writes, and another host counts a trial silent for 600 s as dead.
    flush_seconds: Annotated[float, Field(ge=0.0, le=300.0)] = 2.0
    # After the study, a weight average of its complete trials (a model soup, Wortsman et al.
    # 2022): greedy (trials in order of the objective, each kept only if the soup's val
    # objective does not get worse) or uniform (the mean of all), or none. Unset: greedy, but
    # none for meta-learning and multi-objective studies (which cannot set it).
    soup: Literal["greedy", "uniform", "none"] | None = None
    # the best trials by the objective whose best weights are kept until the soup is made
    soup_candidates: Annotated[int, Field(ge=2)] = 10
    # Trials to run first, each a mapping of searched keys to values (the other keys are
    # sampled), e.g. one trial per algorithm: Optuna's enqueue_trial, once per study.
    enqueue: Annotated[
        tuple[dict[str, Scalar], ...],
        BeforeValidator(lambda v: tuple(v) if isinstance(v, list) else v),
    ] = ()
    # Earlier studies whose complete trials the sampler starts from (`harness.study.warm`):
    # STUDY (this results folder's storage), STUDY@RESULTS_DIR or STUDY@STORAGE_URL. Applied
    # when the study is created; its own budget, runs and report count only its own trials.
    warm_start: Annotated[
        tuple[Annotated[str, Field(min_length=1, pattern=r"^[^@\s,]+(@\S+)?$")], ...],
        BeforeValidator(lambda v: tuple(v) if isinstance(v, list) else v),
    ] = ()
