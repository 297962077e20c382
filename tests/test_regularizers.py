"""Tests of harness.core.regularizers and of their use in the core: penalties (value and direction),
MixUp/CutMix (soft targets, convex mixtures), label smoothing, and the EMA of the weights
(closed form, trailing the raw weights, used for evaluation and for the kept state)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import fresh_model, make_config
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from harness.config.spec import RegSpec
from harness.core import finetune, models, strategies
from harness.core import regularizers as R
from harness.data import datasets as hdata


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys) -> float:
    return sum(float((a[k] - b[k]).pow(2).sum()) for k in keys) ** 0.5


@pytest.fixture(scope="module")
def task() -> hdata.TaskData:
    return hdata.load_target(make_config().data, 0)


# --- penalties -------------------------------------------------------------------------------
def _sgd_step(params: list[nn.Parameter], loss: torch.Tensor, lr: float) -> None:
    loss.backward()
    with torch.no_grad():
        for p in params:
            p -= lr * p.grad
            p.grad = None


def test_l1_l2_are_zero_at_zero_and_pull_toward_zero():
    zeros = [nn.Parameter(torch.zeros(3, 4)), nn.Parameter(torch.zeros(5))]
    assert R.l1_penalty(zeros).item() == 0.0 and R.l2_penalty(zeros).item() == 0.0
    g = torch.Generator().manual_seed(0)
    for penalty in (R.l1_penalty, R.l2_penalty):
        values = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
        # away from 0, so that one L1 step of 0.01 cannot overshoot
        params = [nn.Parameter(v + 0.1 * torch.sign(v)) for v in values]
        start = [p.detach().clone() for p in params]
        assert penalty(params).item() > 0
        _sgd_step(params, penalty(params), lr=0.01)
        for p, p0 in zip(params, start, strict=True):
            assert (p.detach().abs() < p0.abs()).all()  # every weight moved toward 0
            assert (torch.sign(p.detach()) == torch.sign(p0)).all()  # without overshooting
    # values: sum |w| and 1/2 sum w^2 (gradient w)
    w = [torch.tensor([3.0, -4.0])]
    assert R.l1_penalty(w).item() == 7.0 and R.l2_penalty(w).item() == 12.5


def test_l2_sp_is_zero_at_the_anchor_and_pulls_toward_it():
    g = torch.Generator().manual_seed(1)
    anchors = [torch.randn(4, 3, generator=g), torch.randn(6, generator=g)]
    params = [nn.Parameter(a.clone()) for a in anchors]
    assert R.l2_sp_penalty(params, anchors).item() == 0.0
    with torch.no_grad():
        for p in params:
            p += torch.randn(p.shape, generator=g)
    before = [(p.detach() - a).abs() for p, a in zip(params, anchors, strict=True)]
    assert R.l2_sp_penalty(params, anchors).item() > 0
    _sgd_step(params, R.l2_sp_penalty(params, anchors), lr=0.5)  # halves every distance
    for p, a, d0 in zip(params, anchors, before, strict=True):
        assert torch.allclose((p.detach() - a).abs(), d0 / 2, atol=1e-6)


def _grads(model: nn.Module, loss: torch.Tensor) -> tuple[list, list]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    head = {id(p) for p in models.head_module(model).parameters()}
    nonzero = [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters()]
    in_head = [id(p) in head for p in model.parameters()]
    return nonzero, in_head


def test_make_penalty_terms_touch_only_their_parameters():
    config = make_config()
    model = fresh_model(config)
    units = strategies.model_units(model)
    backbone = [p for u in units[1:] for p in u.params]
    head = list(units[0].params)
    anchors = [p.detach().clone() for p in backbone]
    kw = {"decayed": [], "backbone": backbone, "anchors": anchors, "head": head}
    assert R.make_penalty(RegSpec(), **kw) is None  # all zero: nothing to add
    # the L2-SP head term: only the head, with gradient beta * w
    only_head = R.make_penalty(RegSpec(l2_sp_head=0.3), **kw)
    nonzero, in_head = _grads(model, only_head())
    assert nonzero == in_head
    for p in head:
        assert torch.allclose(p.grad, 0.3 * p.detach())
    # the L2-SP backbone term: zero at the start of fit, then only the backbone
    sp = R.make_penalty(RegSpec(l2_sp=2.0), **kw)
    assert sp().item() == 0.0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    nonzero, in_head = _grads(model, sp())
    assert nonzero == [not h for h in in_head]
    for p, a in zip(backbone, anchors, strict=True):
        assert torch.allclose(p.grad, 2.0 * (p.detach() - a), atol=1e-6)


def test_l2_sp_in_fit_keeps_the_backbone_near_its_start(task):
    def drift(l2_sp: float) -> tuple[float, dict[str, float]]:
        config = make_config(train={"epochs": 2, "lr": 0.1}, reg={"l2_sp": l2_sp})
        model = fresh_model(config)
        start = state(model)
        result = finetune.fit(config, model, task)
        keys = [k for k, _ in model.named_parameters() if not k.startswith("net.head.")]
        return distance(start, state(model), keys), result.history[-1]

    free, m_free = drift(0.0)
    held, m_held = drift(5.0)  # lr x alpha < 1: a contraction
    assert held < 0.5 * free
    assert "train_penalty_running" not in m_free and m_held["train_penalty_running"] > 0


@pytest.mark.parametrize("reg", [{"l1": 0.05}, {"l2": 5.0}])
def test_l1_l2_in_fit_shrink_weights_not_norms_or_biases(task, reg):
    """A large penalty shrinks the weights; norm parameters and biases only with
    decay_norm_bias."""

    def run(reg: dict) -> dict[str, torch.Tensor]:
        config = make_config(train={"epochs": 1, "lr": 0.05}, reg=reg)
        model = fresh_model(config)
        finetune.fit(config, model, task)
        return dict(model.named_parameters())

    names = dict(fresh_model(make_config()).named_modules())
    plain, weights_only, everything = run({}), run(reg), run({**reg, "decay_norm_bias": True})
    norm_bias = [
        k
        for k in plain
        if k.endswith(".bias") or isinstance(names[k.rsplit(".", 1)[0]], nn.BatchNorm2d)
    ]
    weights = [k for k in plain if k not in norm_bias]
    assert norm_bias and weights

    def size(params, keys):
        return sum(float(params[k].detach().abs().sum()) for k in keys)

    assert size(weights_only, weights) < 0.9 * size(plain, weights)
    assert size(everything, norm_bias) < 0.99 * size(weights_only, norm_bias)


# --- MixUp / CutMix --------------------------------------------------------------------------
N = 15


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images whose pixels are i (mod 15) in image i, so that no pixel of an image equals
    the same pixel of its neighbour; labels i % 5, so that neighbours' labels differ."""
    g = torch.Generator().manual_seed(0)
    k = torch.randint(0, 17, (N, 1, 8, 8), generator=g)
    x = (15 * k + torch.arange(N).view(-1, 1, 1, 1)).to(torch.uint8)
    return x, torch.arange(N) % 5


def test_mixup_soft_labels_and_convex_images():
    torch.manual_seed(0)
    x, y = _batch()
    mixer = R.make_mixer(RegSpec(mixup_alpha=0.4), num_classes=5)
    xm, t = R.mix_batch(mixer, x, y)
    assert xm.dtype == torch.float32 and xm.min() >= 0.0 and xm.max() <= 1.0
    assert t.shape == (N, 5) and torch.allclose(t.sum(1), torch.ones(N))
    xf = x.float() / 255.0
    lam = t[0, y[0]].item()  # y[0] != y[-1]: the weight of image 0 in mixture 0
    assert 0.0 < lam < 1.0
    for i in range(N):
        j = (i - 1) % N  # the partner: the batch rolled by one
        assert torch.allclose(xm[i], lam * xf[i] + (1 - lam) * xf[j], atol=1e-6)
        assert t[i, y[i]].item() == pytest.approx(lam) and t[i, y[j]].item() == pytest.approx(
            1 - lam
        )


def _cutmix_like(xm, xf, t, y) -> bool:
    """Every pixel of every image is its own or its partner's, in the soft label's shares."""
    for i in range(len(xm)):
        j = (i - 1) % len(xm)
        own, other = xm[i] == xf[i], xm[i] == xf[j]
        if not (own | other).all():
            return False
        if other.float().mean().item() != pytest.approx(t[i, y[j]].item()):
            return False
    return True


def test_cutmix_and_random_choice():
    torch.manual_seed(0)
    x, y = _batch()
    xf = x.float() / 255.0
    mixer = R.make_mixer(RegSpec(cutmix_alpha=1.0), num_classes=5)
    for _ in range(5):
        xm, t = R.mix_batch(mixer, x, y)
        assert torch.allclose(t.sum(1), torch.ones(N))
        assert _cutmix_like(xm, xf, t, y)
    both = R.make_mixer(RegSpec(mixup_alpha=1.0, cutmix_alpha=1.0), num_classes=5)
    kinds = set()
    for _ in range(12):
        xm, t = R.mix_batch(both, x, y)
        assert torch.allclose(t.sum(1), torch.ones(N))
        lam = t[0, y[0]].item()
        if _cutmix_like(xm, xf, t, y):
            kinds.add("cutmix")
        else:
            assert torch.allclose(xm, lam * xf + (1 - lam) * xf.roll(1, 0), atol=1e-6)
            kinds.add("mixup")
    assert kinds == {"mixup", "cutmix"}
    assert R.make_mixer(RegSpec(), num_classes=5) is None


def test_mixing_and_label_smoothing_in_fit(task):
    base = make_config(train={"epochs": 2})
    plain = finetune.fit(base, fresh_model(base), task).history
    for reg in ({"mixup_alpha": 0.4}, {"cutmix_alpha": 1.0}, {"label_smoothing": 0.2}):
        config = make_config(train={"epochs": 2}, reg=reg)
        history = finetune.fit(config, fresh_model(config), task).history
        assert history != plain, reg
        for m in history:  # accuracies still count whole images (argmax of the soft target)
            assert m["train_acc_running"] * 100 == pytest.approx(
                round(m["train_acc_running"] * 100)
            )


def test_soft_target_loss_with_label_smoothing():
    logits = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3])
    hard = F.cross_entropy(logits, y, label_smoothing=0.1)
    soft = F.cross_entropy(logits, F.one_hot(y, 5).float(), label_smoothing=0.1)
    assert torch.allclose(hard, soft)


# --- EMA -------------------------------------------------------------------------------------
def test_ema_update_follows_the_closed_form_and_torch():
    decay = 0.8
    toy = nn.Linear(3, 1)
    with torch.no_grad():
        toy.weight.fill_(0.0)
        toy.bias.fill_(0.0)
    ema = R.ema_model(toy, decay)
    reference = AveragedModel(toy, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    reference.update_parameters(toy)
    expected = 0.0
    for k in range(1, 6):
        with torch.no_grad():  # the raw weight climbs: 1, 2, 3, ...
            toy.weight.fill_(float(k))
            toy.bias.fill_(float(k))
        R.ema_update(ema, toy)
        reference.update_parameters(toy)
        expected = decay * expected + (1 - decay) * k
        w = ema.module.weight.detach()
        assert torch.allclose(w, torch.full_like(w, expected), atol=1e-6)
        assert torch.equal(w, reference.module.weight.detach())  # torch's own EMA, bit for bit
        assert w.min() > 0.0 and w.max() < k  # trails: between the start and the raw weight
    assert int(ema.n_averaged) == 6


def test_fit_evaluates_and_keeps_the_ema_weights(task):
    config = make_config(train={"epochs": 3, "lr": 0.1}, reg={"ema_decay": 0.9})
    model = fresh_model(config)
    start = state(model)
    raw: dict[int, dict[str, torch.Tensor]] = {}

    class Raw:
        def on_epoch_end(self, epoch, metrics):
            raw[epoch] = state(model)

    result = finetune.fit(config, model, task, callbacks=[Raw()])
    best = result.best_state
    assert all(torch.equal(v, best[k]) for k, v in state(model).items())  # restored
    raw_best = raw[result.best_epoch]
    keys = [k for k, _ in model.named_parameters()]
    assert any(not torch.equal(best[k], raw_best[k]) for k in keys)
    # the EMA trails: closer to the start than the raw weights are
    assert 0 < distance(start, best, keys) < distance(start, raw_best, keys)

    def measured(weights):
        probe = fresh_model(config)
        probe.load_state_dict(weights)
        tr_loss, tr_correct = finetune.evaluate(probe, task.x_train, task.y_train)
        va_loss, va_correct = finetune.evaluate(probe, task.x_val, task.y_val)
        n, v = len(task.x_train), len(task.x_val)
        return [
            tr_loss.item() / n,
            tr_correct.item() / n,
            va_loss.item() / v,
            va_correct.item() / v,
        ]

    m = result.best
    logged = [m["train_loss"], m["train_acc"], m["val_loss"], m["val_acc"]]
    assert logged == pytest.approx(measured(best), abs=1e-6)
    assert logged != pytest.approx(measured(raw_best), abs=1e-6)


def test_regularized_fit_has_no_per_batch_host_sync(task, host_reads):
    """EMA, penalties and label smoothing add no tensor -> host read per batch."""

    def syncs(batch_size: int) -> int:
        reg = {"ema_decay": 0.9, "l1": 1e-4, "l2": 1e-3, "l2_sp": 0.1, "l2_sp_head": 0.01}
        config = make_config(
            train={"epochs": 2, "batch_size": batch_size},
            strategy={"kind": "gradual_unfreeze"},
            reg={**reg, "label_smoothing": 0.1},
        )
        model = fresh_model(config)
        return host_reads(lambda: finetune.fit(config, model, task))

    few, many = syncs(50), syncs(10)
    assert many == few
