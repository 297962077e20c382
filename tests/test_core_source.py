"""The cached source model (trained once, also by concurrent processes; only its recipe decides
its weights) and the training loop's host syncs and running metrics."""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from pathlib import Path
from queue import Empty

import pytest
import torch
from conftest import make_config
from test_core import fresh_model

from harness.config.spec import TrialConfig
from harness.core import checkpoints, finetune, models, source
from harness.data import datasets as hdata


def _source_config() -> TrialConfig:
    return make_config(model={"source_epochs": 5})


def test_source_model_is_trained_once_and_cached(tmp_path):
    config = _source_config()
    first = source.get_source_model(config, tmp_path)
    assert first.trained_now is True
    assert first.path.is_file() and first.path.suffix == ".pt"
    assert first.path.parent == tmp_path
    assert first.settings == source.source_settings(config)
    assert first.metrics["val_acc"] > 0.95
    assert not list(tmp_path.glob(".*.tmp"))
    second = source.get_source_model(config, tmp_path)
    assert second.trained_now is False
    assert second.path == first.path
    assert second.metrics == first.metrics
    assert second.settings == first.settings
    assert json.loads(json.dumps(second.metrics)) == second.metrics
    # the saved weights are the reported best epoch's: re-evaluate them on the source val split
    src = hdata.load_source(config.data, config.seed)
    model = models.build_model(config.model, src.num_classes)
    model.load_state_dict(checkpoints.load_weights(first.path))
    _, correct = finetune.evaluate(model, src.x_val, src.y_val)
    assert correct.item() / len(src.x_val) == pytest.approx(first.metrics["val_acc"], abs=1e-9)
    # and the target model loads it
    target = models.build_model(config.model, 5, pretrained=first.path)
    assert torch.equal(target.net.stages[0][0][0].weight, model.net.stages[0][0][0].weight)


def _source_worker(cache_dir: str, queue) -> None:
    result = source.get_source_model(_source_config(), Path(cache_dir))
    queue.put((result.trained_now, str(result.path), result.metrics))


def test_source_model_concurrent_processes_train_once(tmp_path):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_source_worker, args=(str(tmp_path), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = []
    deadline = time.monotonic() + 900  # a guard against a hang, not a time the test expects
    try:
        while len(results) < len(procs) and time.monotonic() < deadline:
            try:  # wait for a state: both results in, or both processes gone
                results.append(queue.get(timeout=1))
            except Empty:
                if not any(p.is_alive() for p in procs) and queue.empty():
                    break
    finally:
        for p in procs:
            p.join(timeout=60)
    assert len(results) == len(procs), [p.exitcode for p in procs]
    assert all(p.exitcode == 0 for p in procs)
    assert sorted(r[0] for r in results) == [False, True]
    assert results[0][1] == results[1][1]
    assert results[0][2] == results[1][2]
    assert len(list(tmp_path.glob("*.pt"))) == 1


def test_no_per_batch_host_sync(task, host_reads):
    """Python-level tensor -> host conversions in fit do not grow with the number of batches."""

    def syncs(batch_size: int) -> int:
        config = make_config(train={"epochs": 2, "batch_size": batch_size})
        model = fresh_model(config)
        return host_reads(lambda: finetune.fit(config, model, task))

    few, many = syncs(50), syncs(10)  # 2 vs 10 batches per epoch
    assert many == few
    assert few <= 2 * 2  # about one read per epoch


def test_running_metrics_count_only_the_images_trained_on(task):
    # 100 train images in batches of 33: the last batch of one is skipped (BatchNorm), so the
    # running accuracy is a fraction of 99 images, not of 100.
    config = make_config(train={"batch_size": 33, "epochs": 2})
    result = finetune.fit(config, fresh_model(config), task)
    for m in result.history:
        assert m["train_acc_running"] * 99 == pytest.approx(round(m["train_acc_running"] * 99))
        assert m["train_acc_running"] * 100 != pytest.approx(round(m["train_acc_running"] * 100))


def test_the_source_recipe_is_only_what_decides_its_weights():
    """Two studies that differ outside the source recipe share one key and provably train the
    same model (their recipes are equal); each field of the recipe changes the key."""
    base = make_config(model={"source_epochs": 5})
    others = [
        make_config(model={"source_epochs": 5}, reg={"label_smoothing": 0.2}),
        make_config(model={"source_epochs": 5}, reg={"mixup_alpha": 0.4, "l1": 1e-4, "l2": 0.1}),
        make_config(model={"source_epochs": 5}, reg={"ema_decay": 0.9, "l2_sp": 0.1}),
        make_config(model={"source_epochs": 5}, strategy={"kind": "lp_ft", "bn": "frozen"}),
        make_config(model={"source_epochs": 5}, strategy={"layer_decay": 0.5}),
        make_config(
            model={"source_epochs": 5}, objective={"metric": "val_loss", "direction": "minimize"}
        ),
        make_config(model={"source_epochs": 5}, data={"eval_train_max": 7, "shots_per_class": 3}),
        make_config(model={"source_epochs": 5}, aug={"policy": "crop"}, train={"lr": 0.3}),
    ]
    for other in others:
        assert source.source_key(other) == source.source_key(base)
        assert source.pretrain_config(other) == source.pretrain_config(base)
    pre = source.pretrain_config(base)
    assert pre.reg == type(pre.reg)(weight_decay=5e-4)  # no regularizer of the trial's
    assert pre.strategy == type(pre.strategy)() and pre.aug == type(pre.aug)()
    assert pre.objective == type(pre.objective)()
    assert (pre.train.epochs, pre.train.optimizer, pre.train.schedule) == (5, "sgd", "cosine")
    changed = [
        make_config(model={"source_epochs": 6}),
        make_config(model={"source_epochs": 5, "source_lr": 0.1}),
        make_config(model={"source_epochs": 5, "source_batch_size": 16}),
        make_config(model={"source_epochs": 5, "width": 16}),
        make_config(model={"source_epochs": 5}, seed=1),
        make_config(model={"source_epochs": 5}, data={"split_seed": 4}),
        make_config(model={"source_epochs": 5}, data={"image_size": 16}),
        make_config(
            model={"source_epochs": 5}, data={"source_classes": [0, 1], "target_classes": [5, 6]}
        ),
    ]
    keys = {source.source_key(c) for c in changed}
    assert len(keys) == len(changed) and source.source_key(base) not in keys
