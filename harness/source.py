"""The pretrained source model: trained once per source setting, cached under the results folder.

The cache key is a hash of everything that decides the weights (data set, source classes,
architecture, width, pretraining recipe, seed). A file lock makes a second process that needs
the same model wait for the first instead of training it again; the file is written to a
temporary name and renamed, so a reader never sees half a checkpoint.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.data import load_source
from harness.finetune import fit, seed_everything
from harness.models import data_size_hint, model_for
from harness.spec import TrialConfig


@dataclass(frozen=True)
class SourceModel:
    key: str
    path: Path  # the state_dict file
    settings: dict
    metrics: dict  # the source model's own val metrics at its best epoch
    trained_now: bool  # False when it came from the cache


def source_settings(config: TrialConfig) -> dict:
    d, m = config.data, config.model
    return {
        "dataset": d.dataset,
        "source_classes": list(d.source_classes),
        "arch": m.arch,
        "width": m.width,
        "epochs": m.source_epochs,
        "lr": m.source_lr,
        "batch_size": m.source_batch_size,
        "root": str(Path(d.root).resolve()) if d.dataset == "imagefolder" else None,
        "image_size": d.image_size,
        "seed": config.seed,
        "split_seed": config.split_seed,
    }


def source_key(config: TrialConfig) -> str:
    blob = json.dumps(source_settings(config), sort_keys=True)
    return (
        f"{config.model.arch}-{config.data.dataset}-"
        + hashlib.sha256(blob.encode()).hexdigest()[:12]
    )


def pretrain_config(config: TrialConfig) -> TrialConfig:
    """The source task's recipe: full training from scratch, SGD with momentum, cosine schedule."""
    m = config.model
    return config.model_copy(
        update={
            "train": config.train.model_copy(
                update={
                    "epochs": m.source_epochs,
                    "lr": m.source_lr,
                    "optimizer": "sgd",
                    "momentum": 0.9,
                    "batch_size": m.source_batch_size,
                    "schedule": "cosine",
                }
            ),
            "strategy": config.strategy.model_copy(update={"kind": "full"}),
            "reg": config.reg.model_copy(
                update={"weight_decay": 5e-4, "dropout": 0.0, "stochastic_depth": 0.0}
            ),
            "aug": config.aug.model_copy(update={"policy": "none"}),
        }
    )


def atomic_write(path: Path, write) -> None:
    """`write(file)` into a temporary file beside `path`, fsync, then rename over `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def get_source_model(
    config: TrialConfig, cache_dir: Path, fetch=None, data_cache: Path | None = None
) -> SourceModel:
    """The cached source model for this config's settings; trains and caches it when missing.

    `fetch(key) -> (path, metrics) | None` is asked first when the cache misses (the study
    passes one that downloads the model registry's version, so another node's model is used
    rather than trained again). `data_cache`: where the source data's image folder is decoded
    once (`harness.datacache`)."""
    key = source_key(config)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path, meta_path = cache_dir / f"{key}.pt", cache_dir / f"{key}.json"
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
        size = data_size_hint(config)
        data = load_source(config.data, config.split_seed, size_hint=size, cache_dir=data_cache)
        seed_everything(pre.seed)
        model = model_for(pre, data)
        result = fit(pre, model, data)
        metrics = {k: result.best[k] for k in ("val_acc", "val_loss", "train_acc")}
        metrics["best_epoch"] = result.best_epoch
        atomic_write(path, lambda f: torch.save(result.best_state, f))
        meta = {"settings": source_settings(config), "metrics": metrics}
        atomic_write(meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode()))
        return SourceModel(key, path, meta["settings"], metrics, trained_now=True)
