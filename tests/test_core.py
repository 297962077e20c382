"""Tests of the fine-tuning core (fit, evaluate), the data splits and augmentation, the model
builder, and the cached source model. Everything runs on the CPU on the real digits data, with
tiny fits (a few epochs of 100 images)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_config
from torch import nn

from harness.config.spec import TrialConfig
from harness.core import augment, finetune, models, shared
from harness.data import datasets as hdata
from harness.data import sources

METRIC_KEYS = {
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "overfit_gap",
    "overfit_gap_loss",
    "lr",
    "train_loss_running",
    "train_acc_running",
}


# --- helpers ---------------------------------------------------------------------------------
def fresh_model(config: TrialConfig, num_classes: int = 5, pretrained=None) -> nn.Module:
    shared.seed_everything(config.seed)
    return models.build_model(config.model, num_classes, config.reg.dropout, pretrained=pretrained)


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


class Recorder:
    """Records each on_epoch_end call and, given a model, a snapshot of its state_dict."""

    def __init__(self, model: nn.Module | None = None):
        self.model = model
        self.calls: list[tuple[int, dict[str, float]]] = []
        self.states: dict[int, dict[str, torch.Tensor]] = {}

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        self.calls.append((epoch, dict(metrics)))
        if self.model is not None:
            self.states[epoch] = cpu_state(self.model)


class Stop(Exception):
    pass


class RaiseAt:
    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        if epoch == self.epoch:
            raise Stop(f"stop at {epoch}")


# --- the core imports neither Optuna nor MLflow ----------------------------------------------
# Every module of the layers below tracking (config, infra, data, core), and the classical
# reference, imported in a fresh process: no Optuna, no MLflow among what they bring in.
# (envfaults classifies Optuna's and MLflow's errors by name, importing neither.)
CORE_LAYERS = ("config", "infra", "data", "core")


def test_core_imports_neither_optuna_nor_mlflow():
    code = (
        "import importlib, pkgutil, sys\n"
        "import harness\n"
        f"for layer in {CORE_LAYERS!r}:\n"
        "    pkg = importlib.import_module(f'harness.{layer}')\n"
        "    for m in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + '.'):\n"
        "        importlib.import_module(m.name)\n"
        "import harness.reports.classical\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('optuna', 'mlflow')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


# --- 1. per-epoch metrics --------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_history_metrics(task, schedule):
    config = make_config(train={"epochs": 3, "schedule": schedule})
    result = finetune.fit(config, fresh_model(config), task)
    history = result.history
    assert len(history) == 3
    for m in history:
        assert m.keys() >= METRIC_KEYS
        assert m["overfit_gap"] == m["train_acc"] - m["val_acc"]
        assert m["overfit_gap_loss"] == m["val_loss"] - m["train_loss"]
        for key in ("train_acc", "val_acc", "train_acc_running"):
            assert 0.0 <= m[key] <= 1.0, key
        for key in ("train_loss", "val_loss", "train_loss_running"):
            assert m[key] >= 0.0, key
        # accuracies are fractions of the 100 train / 150 val images
        assert m["train_acc"] * 100 == pytest.approx(round(m["train_acc"] * 100), abs=1e-9)
        assert m["val_acc"] * 150 == pytest.approx(round(m["val_acc"] * 150), abs=1e-9)
    lrs = [m["lr"] for m in history]
    if schedule == "constant":
        assert lrs == [0.05, 0.05, 0.05]
    else:
        assert lrs[0] == 0.05
        assert all(b < a for a, b in zip(lrs, lrs[1:], strict=False)), lrs
        assert lrs[-1] > 0.0
    assert result.best == history[result.best_epoch - 1]
    assert result.device == "cpu"


# --- 2. metrics are measured in eval mode on the clean train split ---------------------------
def test_metrics_measured_in_eval_mode_on_clean_split(task):
    # dropout and crop augmentation make train-mode or augmented measurements differ visibly
    config = make_config(train={"epochs": 3}, reg={"dropout": 0.3}, aug={"policy": "crop"})
    model = fresh_model(config)
    recorder = Recorder(model)
    result = finetune.fit(config, model, task, callbacks=[recorder])
    assert sorted(recorder.states) == [1, 2, 3]
    for epoch in (1, 3):
        snapshot = models.build_model(config.model, 5, config.reg.dropout)
        snapshot.load_state_dict(recorder.states[epoch])
        snapshot.train()  # evaluate must switch to eval mode itself
        tr_loss, tr_correct = finetune.evaluate(snapshot, task.x_train, task.y_train)
        va_loss, va_correct = finetune.evaluate(snapshot, task.x_val, task.y_val)
        m = result.history[epoch - 1]
        assert m["train_acc"] == pytest.approx(tr_correct.item() / len(task.x_train), abs=1e-6)
        assert m["val_acc"] == pytest.approx(va_correct.item() / len(task.x_val), abs=1e-6)
        assert m["train_loss"] == pytest.approx(tr_loss.item() / len(task.x_train), abs=1e-5)
        assert m["val_loss"] == pytest.approx(va_loss.item() / len(task.x_val), abs=1e-5)
    # the running (augmented, train-mode) metrics are a different measurement
    assert any(m["train_loss_running"] != m["train_loss"] for m in result.history), (
        "running and clean train loss coincide"
    )


# --- 3. callbacks ----------------------------------------------------------------------------
def test_callbacks_get_every_epoch_in_order(task):
    config = make_config(train={"epochs": 4})
    first, second = Recorder(), Recorder()
    result = finetune.fit(config, fresh_model(config), task, callbacks=[first, second])
    for rec in (first, second):
        assert [e for e, _ in rec.calls] == [1, 2, 3, 4]
        assert [m for _, m in rec.calls] == result.history


def test_callback_exception_propagates_and_stops_training(task):
    config = make_config(train={"epochs": 5})
    model = fresh_model(config)
    recorder = Recorder(model)
    with pytest.raises(Stop, match="stop at 2"):
        finetune.fit(config, model, task, callbacks=[recorder, RaiseAt(2)])
    assert [e for e, _ in recorder.calls] == [1, 2]
    # no training happened after the raising epoch: the weights are those of epoch 2
    assert states_equal(cpu_state(model), recorder.states[2])


# --- 4. determinism --------------------------------------------------------------------------
def _run(seed: int) -> finetune.FitResult:
    config = make_config(
        seed=seed, train={"epochs": 2}, reg={"dropout": 0.2}, aug={"policy": "crop"}
    )
    return finetune.fit(config, fresh_model(config), hdata.load_target(config.data, seed))


def test_fit_is_deterministic_on_cpu():
    a, b = _run(0), _run(0)
    assert a.history == b.history
    assert a.best_epoch == b.best_epoch
    assert states_equal(a.best_state, b.best_state)
    c = _run(1)
    assert c.history != a.history


# --- 5. best-epoch restore -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("metric", "direction", "lr", "epochs"),
    [
        ("val_acc", "maximize", 0.05, 3),  # non-monotone val_acc, best is not the last epoch
        ("val_loss", "minimize", 0.5, 5),  # non-monotone val_loss
        ("val_acc", "maximize", 2.0, 6),  # val_acc ties: the first best epoch wins
    ],
)
def test_best_epoch_weights_are_restored(task, metric, direction, lr, epochs):
    config = make_config(
        train={"epochs": epochs, "lr": lr}, objective={"metric": metric, "direction": direction}
    )
    model = fresh_model(config)
    recorder = Recorder(model)
    result = finetune.fit(config, model, task, callbacks=[recorder])
    values = [m[metric] for m in result.history]
    best_value = max(values) if direction == "maximize" else min(values)
    assert result.best_epoch == values.index(best_value) + 1
    assert result.best == result.history[result.best_epoch - 1]
    assert all(v.device.type == "cpu" for v in result.best_state.values())
    assert states_equal(cpu_state(model), result.best_state)
    assert states_equal(result.best_state, recorder.states[result.best_epoch])
    if result.best_epoch != epochs:  # the restore actually changed the weights
        assert not states_equal(result.best_state, recorder.states[epochs])


def test_best_epoch_cases_are_informative(task):
    """Guards the parametrization above: non-monotone curves, and a tie at lr 2.0."""
    config = make_config(train={"epochs": 3, "lr": 0.05})
    acc = [m["val_acc"] for m in finetune.fit(config, fresh_model(config), task).history]
    assert acc.index(max(acc)) + 1 != 3
    config = make_config(train={"epochs": 5, "lr": 0.5})
    loss = [m["val_loss"] for m in finetune.fit(config, fresh_model(config), task).history]
    assert loss.index(min(loss)) + 1 != 5
    config = make_config(train={"epochs": 6, "lr": 2.0})
    acc = [m["val_acc"] for m in finetune.fit(config, fresh_model(config), task).history]
    assert acc.count(max(acc)) > 1 and acc.index(max(acc)) + 1 != 6


# --- 6. linear probe -------------------------------------------------------------------------
def _split_state(model: nn.Module):
    state = cpu_state(model)
    head = {k: v for k, v in state.items() if k.startswith("net.head.")}
    backbone = {k: v for k, v in state.items() if not k.startswith("net.head.")}
    return backbone, head


@pytest.mark.parametrize("kind", ["linear_probe", "full"])
def test_linear_probe_freezes_backbone_and_batchnorm(task, kind):
    config = make_config(
        train={"epochs": 2, "lr": 0.1}, strategy={"kind": kind}, reg={"weight_decay": 0.01}
    )
    model = fresh_model(config)
    backbone0, head0 = _split_state(model)
    assert any(k.endswith("running_mean") for k in backbone0)
    assert any(k.endswith("running_var") for k in backbone0)
    finetune.fit(config, model, task)
    backbone1, head1 = _split_state(model)
    assert not states_equal(head0, head1)
    if kind == "linear_probe":
        changed = [k for k in backbone0 if not torch.equal(backbone0[k], backbone1[k])]
        assert changed == []
    else:
        params = [k for k, _ in model.named_parameters() if not k.startswith("net.head.")]
        assert any(not torch.equal(backbone0[k], backbone1[k]) for k in params)
        stats = [k for k in backbone0 if k.endswith("running_mean")]
        assert any(not torch.equal(backbone0[k], backbone1[k]) for k in stats)


# --- 7. dropout before the head --------------------------------------------------------------
def test_dropout_sits_before_the_head_linear():
    model = models.build_model(make_config().model, 5, dropout=0.5)
    layers = list(models.head_module(model))
    dropouts = [i for i, m in enumerate(layers) if isinstance(m, nn.Dropout)]
    linears = [i for i, m in enumerate(layers) if isinstance(m, nn.Linear)]
    assert len(dropouts) == 1 and layers[dropouts[0]].p == 0.5
    assert linears and dropouts[0] < linears[0]
    assert models.head_module(model) is model.net.head


# --- 8. pretrained loading -------------------------------------------------------------------
def _saved_source_state(tmp_path: Path, width: int = 32, num_classes: int = 5) -> Path:
    spec = make_config(model={"width": width}).model
    torch.manual_seed(123)
    model = models.build_model(spec, num_classes)
    with torch.no_grad():  # non-default BatchNorm statistics, so loading them shows
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
                module.num_batches_tracked.fill_(7)
    path = tmp_path / f"w{width}.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.parametrize("num_classes", [5, 3])
def test_pretrained_loads_backbone_and_keeps_fresh_head(tmp_path, num_classes):
    path = _saved_source_state(tmp_path)
    saved = torch.load(path, weights_only=True)
    spec = make_config().model
    torch.manual_seed(7)
    fresh = models.build_model(spec, num_classes)
    torch.manual_seed(7)
    loaded = models.build_model(spec, num_classes, pretrained=path)
    state = loaded.state_dict()
    assert state.keys() == saved.keys()
    for k, v in state.items():
        if k.startswith("net.head."):
            assert torch.equal(v, fresh.state_dict()[k]), k  # the fresh head, untouched
        else:
            assert torch.equal(v, saved[k]), k
    assert models.head_module(loaded)[-1].weight.shape == (num_classes, 64)
    head_weight = models.head_module(loaded)[-1].weight[:1]
    assert not torch.equal(head_weight, saved["net.head.1.weight"][:1])


def test_pretrained_missing_key_raises_value_error(tmp_path):
    path = _saved_source_state(tmp_path)
    state = torch.load(path, weights_only=True)
    del state["net.stages.0.0.0.weight"]
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="model.pretrained"):
        models.build_model(make_config().model, 5, pretrained=tmp_path / "partial.pt")


def test_pretrained_of_other_width_raises_value_error(tmp_path):
    path = _saved_source_state(tmp_path, width=16)
    with pytest.raises(ValueError, match="model.pretrained"):
        models.build_model(make_config().model, 5, pretrained=path)


# --- 9. data ---------------------------------------------------------------------------------
def _image_ids(task: hdata.TaskData) -> dict[str, list[bytes]]:
    """Each split's images as bytes (the digits images within one class may repeat)."""
    return {
        part: [x.numpy().tobytes() for x in getattr(task, f"x_{part}")]
        for part in ("train", "val", "test")
    }


def test_load_target_splits(task):
    spec = make_config().data
    assert task.classes == (5, 6, 7, 8, 9) and task.num_classes == 5
    assert len(task.x_train) == 100 and len(task.x_val) == 150
    for y, n in ((task.y_train, spec.shots_per_class), (task.y_val, spec.val_per_class)):
        assert y.dtype == torch.long
        assert torch.bincount(y, minlength=5).tolist() == [n] * 5
    assert set(task.y_test.tolist()) == {0, 1, 2, 3, 4}
    assert task.x_train.shape[1:] == (1, 8, 8) and task.x_train.dtype == torch.uint8
    # disjoint: rebuild the index split and compare with all of digits
    from sklearn.datasets import load_digits

    digits = load_digits()
    x_all = (digits.images[:, None] / 16.0 * 255.0).round().astype("uint8")
    total = sum(int((digits.target == c).sum()) for c in task.classes)
    ids = _image_ids(task)
    counts: dict[bytes, int] = {}
    for img, c in zip(x_all, digits.target, strict=True):
        if c in task.classes:
            key = img.tobytes()
            counts[key] = counts.get(key, 0) + 1
    used: dict[bytes, int] = {}
    for part in ids.values():
        for key in part:
            used[key] = used.get(key, 0) + 1
    assert sum(used.values()) == total == len(task.x_train) + len(task.x_val) + len(task.x_test)
    assert used == counts  # every target image used exactly once over the three splits
    # labels match the images' own classes
    lookup = {
        img.tobytes(): task.classes.index(c)
        for img, c in zip(x_all, digits.target, strict=True)
        if c in task.classes
    }
    for part in ("train", "val", "test"):
        xs, ys = getattr(task, f"x_{part}"), getattr(task, f"y_{part}")
        assert all(lookup[x.numpy().tobytes()] == y for x, y in zip(xs, ys.tolist(), strict=True))


def test_load_target_is_seeded(task):
    spec = make_config().data
    again = hdata.load_target(spec, 0)
    assert again.data_hash == task.data_hash
    for part in ("train", "val", "test"):
        assert torch.equal(getattr(again, f"x_{part}"), getattr(task, f"x_{part}"))
        assert torch.equal(getattr(again, f"y_{part}"), getattr(task, f"y_{part}"))
    other = hdata.load_target(spec, 1)
    assert other.data_hash != task.data_hash
    assert not torch.equal(other.x_train, task.x_train)


@pytest.mark.parametrize(("shots", "val"), [(160, 30), (150, 30), (20, 200)])
def test_load_target_too_many_images_raises(shots, val):
    spec = make_config(data={"shots_per_class": shots, "val_per_class": val}).data
    with pytest.raises(sources.DataError, match="shots_per_class"):
        hdata.load_target(spec, 0)


def test_random_crop_translates_each_image_on_its_own():
    g = torch.Generator().manual_seed(0)
    image = torch.randn(1, 2, 8, 8, generator=g) + 5.0  # no zeros: offsets are identifiable
    batch = image.expand(200, -1, -1, -1).contiguous()
    out = augment.random_crop(batch, 1, torch.Generator().manual_seed(1))
    assert out.shape == batch.shape and out.dtype == batch.dtype
    assert not all(torch.equal(out[0], o) for o in out[1:])
    padded = nn.functional.pad(image[0], (1, 1, 1, 1))
    crops = {(r, c): padded[:, r : r + 8, c : c + 8] for r in range(3) for c in range(3)}
    seen = set()
    for o in out:
        match = [rc for rc, crop in crops.items() if torch.equal(o, crop)]
        assert len(match) == 1, "output is not a translated copy of the input"
        seen.add(match[0])
    assert seen == set(crops)  # all nine offsets occur among 200 images
    again = augment.random_crop(batch, 1, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)


# --- 10. the cached source model -------------------------------------------------------------


# --- 11. no per-batch host sync --------------------------------------------------------------
