"""The core's speed settings, tested on the CPU (no timings): the bounded clean-train subset,
channels_last (CUDA only, same predictions), bf16 autocast (CUDA only), the optimizer's
implementation, and `train.compile` (its warm-up leaves the fit's result unchanged)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import fresh_model, make_config
from torch import nn

from harness.config.spec import DataSpec, SpecError, TrainSpec, TrialConfig
from harness.core import finetune, shared, strategies
from harness.data import datasets as hdata

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture(scope="module")
def task() -> hdata.TaskData:
    return hdata.load_target(make_config().data, 0)


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- the per-epoch evaluation is bounded ------------------------------------------------------
def test_default_clean_train_subset_is_bounded():
    assert DataSpec().eval_train_max == 512


def test_clean_train_subset_is_fixed_and_bounded(task):
    n = len(task.x_train)
    idx = shared.clean_subset(n, 30, seed=0, device="cpu")
    again = shared.clean_subset(n, 30, seed=0, device="cpu")
    assert len(idx) == 30 and len(set(idx.tolist())) == 30 and torch.equal(idx, again)
    assert torch.equal(shared.clean_subset(n, 10_000, 0, "cpu"), torch.arange(n))  # small: whole


def test_fit_measures_train_metrics_on_the_subset(task):
    config = make_config(train={"epochs": 2}, data={"eval_train_max": 20})
    result = finetune.fit(config, fresh_model(config), task)
    for m in result.history:  # fractions of the 20 images, not of the 100 of the split
        assert m["train_acc"] * 20 == pytest.approx(round(m["train_acc"] * 20), abs=1e-9)


def test_evaluate_under_inference_mode_matches_no_grad(task):
    config = make_config()
    model = fresh_model(config)
    loss, correct = finetune.evaluate(model, task.x_val, task.y_val, batch_size=64)
    with torch.no_grad():
        logits = model.eval()(task.x_val)
        ref = nn.functional.cross_entropy(logits, task.y_val, reduction="sum")
    assert torch.allclose(loss, ref, rtol=1e-5)
    assert correct.item() == (logits.argmax(1) == task.y_val).sum().item()
    amp_loss, amp_correct = finetune.evaluate(model, task.x_val, task.y_val, amp=True)
    assert torch.equal(amp_loss, finetune.evaluate(model, task.x_val, task.y_val)[0])  # CPU: fp32
    assert amp_correct.item() == correct.item()


# --- channels_last and autocast ------------------------------------------------------------------
def test_channels_last_only_for_convolutional_models_on_cuda():
    config = make_config()
    cnn = fresh_model(config)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.Linear(64, 5))
    patch = nn.Sequential(nn.Conv2d(1, 4, 2), nn.Flatten(), nn.Linear(4 * 7 * 7, 5000))
    assert shared.is_convolutional(cnn)
    assert not shared.is_convolutional(mlp)
    assert not shared.is_convolutional(patch)  # a patch embedding alone: not a CNN
    assert shared.uses_channels_last(config, cnn, CUDA)
    assert not shared.uses_channels_last(config, cnn, CPU)  # the CPU stays NCHW
    off = make_config(train={"channels_last": False})
    assert not shared.uses_channels_last(off, cnn, CUDA)


def test_channels_last_gives_the_same_predictions(task):
    config = make_config()
    model = fresh_model(config).eval()
    with torch.no_grad():
        ref = model(task.x_val)
        model.to(memory_format=torch.channels_last)
        out = model(task.x_val)
    assert any(
        p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last)
        for p in model.parameters()
    )
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(out.argmax(1), ref.argmax(1))


def test_autocast_is_bf16_on_cuda_and_off_on_the_cpu():
    assert isinstance(shared.autocast(CPU, True), contextlib.nullcontext)
    assert isinstance(shared.autocast(CUDA, False), contextlib.nullcontext)
    if torch.cuda.is_available():
        ctx = shared.autocast(CUDA, True)
        assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16


def test_new_train_fields_are_validated():
    t = TrainSpec()
    assert (t.amp, t.channels_last, t.compile) == (True, True, False)
    config = make_config(train={"compile": True, "amp": False, "channels_last": False})
    assert config.train.compile and not config.train.amp and not config.train.channels_last
    for bad in ({"compile": "sometimes"}, {"amp": 3}, {"compile_mode": "max"}):
        with pytest.raises((ValueError, SpecError)):
            TrialConfig.model_validate({"name": "t", "train": bad})


# --- the optimizer's implementation ----------------------------------------------------------
def test_optimizer_is_fused_on_cuda_single_tensor_on_the_cpu():
    assert shared.optimizer_options(CUDA) == {"fused": True}
    assert shared.optimizer_options(CPU) == {"foreach": False}
    for name in ("sgd", "adamw"):
        config = make_config(train={"optimizer": name})
        groups = [{"name": "all", "params": list(fresh_model(config).parameters())}]
        opt = strategies.make_optimizer(config, groups)
        assert opt.defaults["foreach"] is False and not opt.defaults.get("fused")


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_cpu_fit_is_deterministic(task, optimizer):
    config = make_config(
        train={"epochs": 2, "optimizer": optimizer, "lr": 0.01}, reg={"weight_decay": 1e-3}
    )
    a = finetune.fit(config, fresh_model(config), task)
    b = finetune.fit(config, fresh_model(config), task)
    assert a.history == b.history
    assert _states_equal(a.best_state, b.best_state)
    assert a.compile_seconds == 0.0 and "compile_seconds" not in a.history[0]


def test_foreach_sgd_matches_the_single_tensor_loop():
    """Where torch offers foreach on the CPU it computes the same update (to rounding)."""
    results = []
    for foreach in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=foreach)
        x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
        for _ in range(5):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.allclose(results[0], results[1], rtol=1e-6, atol=1e-7)


# --- train.compile ---------------------------------------------------------------------------
@pytest.fixture
def fake_compile(monkeypatch):
    """`nn.Module.compile` replaced by a stub that routes calls through the eager forward (a
    real torch.compile takes minutes on 2 cores): the test sees fit's compile path only."""
    calls = []

    def stub(self, *args, **kwargs):
        calls.append(type(self).__name__)
        self._compiled_call_impl = self._call_impl

    monkeypatch.setattr(nn.Module, "compile", stub)
    return calls


def test_compile_warm_up_leaves_the_result_unchanged(task, fake_compile):
    # dropout, augmentation and mixup draw random numbers; BatchNorm keeps running statistics
    sections = {"reg": {"dropout": 0.3, "mixup_alpha": 0.2}, "aug": {"policy": "crop"}}
    plain = make_config(train={"epochs": 2}, **sections)
    compiled = make_config(train={"epochs": 2, "compile": True}, **sections)
    a = finetune.fit(plain, fresh_model(plain), task)
    model = fresh_model(compiled)
    b = finetune.fit(compiled, model, task)
    assert fake_compile == ["ImageModel"]
    assert b.compile_seconds > 0.0
    assert all(m["compile_seconds"] == b.compile_seconds for m in b.history)
    assert [{k: v for k, v in m.items() if k != "compile_seconds"} for m in b.history] == a.history
    assert _states_equal(a.best_state, b.best_state)
    assert model._compiled_call_impl is None  # handed back eager


def test_compile_with_resume_warms_up_once(task, fake_compile):
    config = make_config(train={"epochs": 3, "compile": True})

    class Keep:
        state = None

        def on_epoch_end(self, epoch, metrics):
            pass

        def on_checkpoint(self, epoch, state):
            if epoch == 1:
                self.state = state

    keep = Keep()
    whole = finetune.fit(config, fresh_model(config), task, [keep])
    resumed = finetune.fit(config, fresh_model(config), task, resume=keep.state)
    assert len(fake_compile) == 2
    strip = [{k: v for k, v in m.items() if k != "compile_seconds"} for m in resumed.history]
    assert strip == [{k: v for k, v in m.items() if k != "compile_seconds"} for m in whole.history]
    assert _states_equal(whole.best_state, resumed.best_state)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fit_uses_channels_last_amp_and_fused(task):
    config = make_config(train={"epochs": 2, "device": "cuda"})
    model = fresh_model(config)
    result = finetune.fit(config, model, task)
    assert result.device.startswith("cuda")
    assert all(torch.isfinite(torch.tensor(m["train_loss"])) for m in result.history)
    assert all(v.is_contiguous() for v in result.best_state.values())
    assert all(p.is_contiguous() for p in model.parameters())  # handed back NCHW
