"""What one trial trains, by `task.kind`: its data, its model and the core that runs it.

- `finetune`: the target task's k-shot split (`data.load_target`), `finetune.fit`.
- `meta`: a pool of every image of the meta-learning class split (`meta.load_pool`),
  `meta.meta_fit` on episodes; the trial's weights are the meta-learned initialization.
- `multitask`: the target task's split, `multitask.multitask_fit` with the target task (the
  model's head) and the auxiliary tasks of `multitask.tasks`; the weights are the target model.

Every core runs on the epoch kernel (`harness.core.kernel`): it returns the same result
(`kernel.Result`: `best`, `best_epoch`, `history`, `best_state`, `seconds`), reports through
the same callbacks, offers its resume state and resumes from it, and knows neither Optuna nor
MLflow; the study and `reproduce` call `load_data`, `build` and `train` and need not know
which core ran.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from harness.config.spec import TrialConfig
from harness.core import meta, models, multitask, ranks
from harness.core.finetune import evaluate, fit, predict
from harness.core.shared import resolve_device, seed_everything
from harness.data.datasets import DataReport, TaskData, load_target


@dataclass(frozen=True)
class MetaPool:
    """The images of a meta-learning class split: labels are positions in `split.classes`."""

    x: torch.Tensor
    y: torch.Tensor
    split: meta.ClassSplit  # meta-train / meta-val / meta-test labels
    classes: tuple  # the split's classes as the data set names them, in label order
    data_hash: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    report: DataReport = field(default_factory=DataReport)

    @property
    def channels(self) -> int:
        return self.x.shape[1]

    @property
    def image_size(self) -> int:
        return self.x.shape[-1]


def class_split(config: TrialConfig) -> meta.ClassSplit:
    m = config.meta
    if m.train_classes is not None:
        return meta.ClassSplit(m.train_classes, m.val_classes, m.test_classes)
    standard = {"digits": meta.DIGITS_SPLIT, "cifar100": meta.CIFAR_FS_SPLIT}
    if config.data.dataset not in standard:  # the spec refuses this before anything runs
        raise ValueError(f"meta: {config.data.dataset} has no standard class split")
    return standard[config.data.dataset]


def load_data(config: TrialConfig, cache_dir: Path | None = None) -> TaskData | MetaPool:
    """The trial's data: the target task's split, or the meta-learning pool. `cache_dir`: where
    an image folder is decoded once and memory-mapped from (`harness.data.datacache`; the target
    task only; the meta pool is decoded in the process)."""
    size = models.data_size_hint(config)
    if config.task.kind != "meta":
        return load_target(config.data, config.split_seed, size_hint=size, cache_dir=cache_dir)
    split = class_split(config)
    x, y, labels, source = meta.load_pool(config.data, split, size_hint=size)
    digest = hashlib.sha256(source.data_hash.encode())
    digest.update(repr(split.classes).encode())
    return MetaPool(
        x, y, labels, split.classes, digest.hexdigest()[:16], source.mean, source.std, source.report
    )


def aux_tasks(config: TrialConfig) -> tuple[multitask.Task, ...]:
    """The target task (labels: the data's), then one task per `multitask.tasks` entry."""
    mt, target = config.multitask, list(config.data.target_classes)
    tasks = [multitask.Task("target", len(target), None, mt.target_weight)]
    for name, aux in mt.tasks.items():
        group_of = {c: i for i, g in enumerate(aux.groups) for c in g}
        lookup = torch.tensor([group_of[c] for c in target])
        tasks.append(multitask.Task(name, len(aux.groups), lookup, aux.weight))
    return tuple(tasks)


def head_size(config: TrialConfig, data: TaskData | MetaPool) -> int:
    """Outputs of the model's head: the target's classes, or the most ways a meta trial uses."""
    if config.task.kind != "meta":
        return data.num_classes
    m = config.meta
    return max(m.ways, m.eval_ways or m.ways)


def build(
    config: TrialConfig,
    data: TaskData | MetaPool,
    pretrained: str | Path | None = None,
    load_weights: bool = True,
) -> models.ImageModel:
    """The trial's model (`models.model_for` with the head `head_size` says)."""
    return models.build_model(
        config.model,
        head_size(config, data),
        config.reg.dropout,
        pretrained,
        models.Inputs.of(data),
        stochastic_depth=config.reg.stochastic_depth,
        image_size=config.data.image_size,
        load_weights=load_weights,
        eval_crop=models.eval_crop(config.data),
    )


def rank_trial(config: TrialConfig, cache_dir: Path | None) -> tuple[TaskData, torch.nn.Module]:
    """What rank r > 0 of a K-device trial trains (`harness.core.ranks`): the same data split
    and the same architecture, without weights (rank 0's are broadcast to it)."""
    data = load_data(config, cache_dir)
    seed_everything(config.seed)
    return data, build(config, data, None, load_weights=False)


def train(
    config: TrialConfig,
    model,
    data,
    callbacks=(),
    resume: dict | None = None,
    cache_dir: Path | None = None,
):
    """Run the trial's core; its result has best, best_epoch, history, best_state, seconds.

    Every core resumes from a resume state that it offered (`resume`: it continues at the
    state's epoch + 1). `train.devices_per_trial` > 1: fine-tuning on that many data-parallel
    ranks, this process rank 0 (`harness.core.ranks`; the others load `data` again, from
    `cache_dir`)."""
    kind = config.task.kind
    if config.train.devices_per_trial > 1:
        return ranks.train(config, model, data, rank_trial, callbacks, resume, cache_dir)
    if kind == "meta":
        return meta.meta_fit(config, model, data.x, data.y, data.split, callbacks, resume)
    if kind == "multitask":
        return multitask.multitask_fit(config, model, aux_tasks(config), data, callbacks, resume)
    return fit(config, model, data, callbacks, resume=resume)


def meta_test(config: TrialConfig, model, data: MetaPool) -> dict[str, float]:
    """The meta-test score of a meta-learned init, once per shot count of `meta.test_shots`:
    `meta_test_acc_{k}shot` and `meta_test_ci95_{k}shot` over `meta.test_episodes` episodes."""
    out = {}
    for shots in config.meta.test_shots:
        acc, ci95 = meta.meta_test(
            config,
            model,
            data.x,
            data.y,
            data.split,
            shots=shots,
            episodes=config.meta.test_episodes,
        )
        out[f"meta_test_acc_{shots}shot"] = acc
        out[f"meta_test_ci95_{shots}shot"] = ci95
    return out


def test_metrics(config: TrialConfig, model, data: TaskData | MetaPool) -> dict[str, float]:
    """A trained model's score on the held-out test data: fine-tuning and multi-task, the test
    split (`test_acc`, `test_loss`); meta-learning, `meta_test` at each shot count."""
    if config.task.kind == "meta":
        return meta_test(config, model, data)
    return split_scores(config, model, data, "test")[0]


def split_scores(
    config: TrialConfig, model, data: TaskData, split: str
) -> tuple[dict[str, float], torch.Tensor]:
    """({split}_acc, {split}_loss) of a fine-tuning or multi-task model on `split` (val or
    test), and its predicted class per example (for paired comparisons on the same examples)."""
    device = resolve_device(config.train.device)
    model.to(device)
    x, y = getattr(data, f"x_{split}").to(device), getattr(data, f"y_{split}").to(device)
    loss, correct = evaluate(model, x, y)
    pred = predict(model, x).argmax(1)
    n = len(y)
    return {f"{split}_acc": correct.item() / n, f"{split}_loss": loss.item() / n}, pred
