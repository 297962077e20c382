"""The pretrained source model: trained once per source recipe, cached under the results folder.

The recipe is built from exactly what decides the weights (`source_settings`: data set and
where it is read, source classes, image size, split seed, architecture and width, the
`model.source_*` recipe, seed) and from nothing else of the trial, and the cache key is the hash
of those settings: two studies that differ anywhere else (regularizers, strategy, objective,
target classes, ...) share one model, and they provably would train the same one. Where the
training runs (`train.device`, `train.threads`) is not part of the recipe: it changes the last
bits, not the recipe. A file lock makes a second process that needs the same model wait for the
first instead of training it again; the file is written to a temporary name and renamed, so a
reader never sees half a checkpoint.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from harness.config.spec import TrialConfig
from harness.core import checkpoints
from harness.core.finetune import fit
from harness.core.models import data_size_hint, model_for
from harness.core.shared import seed_everything
from harness.data.datasets import load_source
from harness.infra.files import atomic_write


@dataclass(frozen=True)
class SourceModel:
    key: str
    path: Path  # the state_dict file
    settings: dict
    metrics: dict  # the source model's own val metrics at its best epoch
    trained_now: bool  # False when it came from the cache


def source_settings(config: TrialConfig) -> dict:
    """Everything that decides the source model's weights, and nothing else."""
    d, m = config.data, config.model
    return {
        "dataset": d.dataset,
        "root": None if d.dataset == "digits" else str(Path(d.root).resolve()),
        "download": d.download,
        "allow_duplicates": d.allow_duplicates,
        "source_classes": list(d.source_classes),
        "image_size": d.image_size,
        "arch": m.arch,
        "width": m.width,
        "epochs": m.source_epochs,
        "lr": m.source_lr,
        "batch_size": m.source_batch_size,
        "seed": config.seed,
        "split_seed": config.split_seed,
    }


def source_key(config: TrialConfig) -> str:
    blob = json.dumps(source_settings(config), sort_keys=True)
    return (
        f"{config.model.arch}-{config.data.dataset}-"
        + hashlib.sha256(blob.encode()).hexdigest()[:12]
    )


def recipe(settings: dict, device: str = "auto", threads: int | None = None) -> TrialConfig:
    """The source task's training config, from `source_settings` alone: full training from
    scratch, SGD with momentum 0.9, a cosine schedule, weight decay 5e-4, no augmentation or
    other regularizer, the best epoch by val_acc; every other key at its default."""
    s = settings
    if len(s["source_classes"]) < 2:
        raise ValueError(
            f"data.source_classes: {s['source_classes']}: the source task needs 2 or more classes"
        )
    data = {k: s[k] for k in ("dataset", "download", "allow_duplicates", "source_classes")}
    data |= {"image_size": s["image_size"], "split_seed": s["split_seed"]}
    data |= {"target_classes": s["source_classes"]}  # unused by the source task; valid
    if s["root"] is not None:
        data["root"] = s["root"]
    return TrialConfig.model_validate(
        {
            "name": "source",
            "seed": s["seed"],
            "data": data,
            "model": {"arch": s["arch"], "width": s["width"], "pretrained": "none"},
            "train": {
                "epochs": s["epochs"],
                "lr": s["lr"],
                "batch_size": s["batch_size"],
                "optimizer": "sgd",
                "momentum": 0.9,
                "schedule": "cosine",
                "device": device,
                "threads": threads,
            },
            "reg": {"weight_decay": 5e-4},
        }
    )


def pretrain_config(config: TrialConfig) -> TrialConfig:
    """The source recipe of `config`'s study, run where `config` runs."""
    return recipe(source_settings(config), config.train.device, config.train.threads)


def get_source_model(
    config: TrialConfig, cache_dir: Path, fetch=None, data_cache: Path | None = None
) -> SourceModel:
    """The cached source model for this config's settings; trains and caches it when missing.

    `fetch(key) -> (path, metrics) | None` is asked first when the cache misses (the study
    passes one that downloads the model registry's version, so another node's model is used
    rather than trained again). `data_cache`: where the source data's image folder is decoded
    once (`harness.data.datacache`)."""
    key = source_key(config)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path, meta_path = checkpoints.source_paths(cache_dir, key)
    with open(cache_dir / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits here, then finds the file
        if path.is_file() and meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            return SourceModel(key, path, meta["settings"], meta["metrics"], trained_now=False)
        fetched = fetch(key) if fetch is not None else None
        if fetched is not None:
            src, metrics = fetched
            atomic_write(path, lambda f: f.write(Path(src).read_bytes()))
            meta = {"settings": source_settings(config), "metrics": metrics, "fetched": True}
            atomic_write(meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode()))
            return SourceModel(key, path, meta["settings"], metrics, trained_now=False)
        pre = pretrain_config(config)
        data = load_source(
            pre.data, pre.split_seed, size_hint=data_size_hint(pre), cache_dir=data_cache
        )
        seed_everything(pre.seed)
        model = model_for(pre, data)
        result = fit(pre, model, data)
        metrics = {k: result.best[k] for k in ("val_acc", "val_loss", "train_acc")}
        metrics["best_epoch"] = result.best_epoch
        checkpoints.save_weights(result.best_state, path)
        meta = {"settings": source_settings(config), "metrics": metrics}
        atomic_write(meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode()))
        return SourceModel(key, path, meta["settings"], metrics, trained_now=True)
