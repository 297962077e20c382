"""Tests of the meta-learning core (harness.core.meta): the episodic sampler, the algorithms'
gradients against hand and finite-difference values, small end-to-end meta_fit runs on the
digits for every algorithm, and the meta-learned init as `pretrained` weights. CPU only."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from harness.config.spec import DataSpec, ModelSpec, TrialConfig
from harness.core import checkpoints, meta, models, shared

SPLIT = meta.DIGITS_SPLIT


@pytest.fixture(scope="module")
def pool():
    x, y, split, _ = meta.load_pool(DataSpec(), SPLIT)
    assert split == SPLIT  # digits: the labels are the digits themselves
    return x, y


def meta_config(seed: int = 0, objective: dict | None = None, **keys) -> TrialConfig:
    """A meta-learning TrialConfig on the CPU: its `meta:` section is `keys`."""
    tree = {"name": "t", "seed": seed, "task": {"kind": "meta"}, "meta": keys}
    tree |= {"model": {"pretrained": "none", "width": 8}, "train": {"device": "cpu"}}
    return TrialConfig.model_validate(tree | ({"objective": objective} if objective else {}))


def small_model(ways: int = 3, seed: int = 0) -> models.ImageModel:
    shared.seed_everything(seed)
    return models.build_model(ModelSpec(pretrained="none", width=8), ways)


# --- The sampler ---------------------------------------------------------------------------
def test_load_pool_is_every_digit(pool):
    x, y = pool
    assert x.dtype == torch.uint8 and x.shape == (1797, 1, 8, 8)
    assert torch.bincount(y).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


@pytest.mark.parametrize("part", ["train", "val", "test"])
def test_episodes_stay_in_their_split_with_exact_sizes(pool, part):
    x, y = pool
    classes = getattr(SPLIT, part)
    ways, shots, queries = 3, 2, 4
    sampler = meta.EpisodeSampler(x, y, classes, ways, shots, queries, seed=1)
    seen = set()
    for _ in range(30):
        s, q, chosen = sampler.sample_indices()
        assert len(s) == ways * shots and len(q) == ways * queries
        both = torch.cat([s, q])
        assert len(set(both.tolist())) == len(both)  # no image twice, none in support and query
        assert set(y[both].tolist()) <= set(classes) and set(chosen) <= set(classes)
        # episode label i is the i-th class drawn, class-major
        assert y[s].tolist() == [c for c in chosen for _ in range(shots)]
        assert y[q].tolist() == [c for c in chosen for _ in range(queries)]
        seen |= set(chosen)
    assert seen == set(classes)
    ep = sampler.sample()
    assert ep.support_x.shape == (ways * shots, 1, 8, 8) and ep.support_x.dtype == torch.uint8
    assert ep.support_y.tolist() == [0, 0, 1, 1, 2, 2]
    assert ep.query_y.tolist() == [i for i in range(3) for _ in range(queries)]


def test_sampler_is_seeded(pool):
    x, y = pool

    def draw(seed):
        return meta.EpisodeSampler(x, y, SPLIT.train, 3, 1, 5, seed).episodes(5)

    a, b, c = draw(0), draw(0), draw(1)
    assert all(
        torch.equal(u, v) for ea, eb in zip(a, b, strict=True) for u, v in zip(ea, eb, strict=True)
    )
    assert any(not torch.equal(u.support_x, v.support_x) for u, v in zip(a, c, strict=True))
    fixed = meta.fixed_episodes(x, y, SPLIT.val, 3, 1, 5, seed=7, n=3)
    again = meta.fixed_episodes(x, y, SPLIT.val, 3, 1, 5, seed=7, n=3)
    assert all(torch.equal(u.query_x, v.query_x) for u, v in zip(fixed, again, strict=True))


def test_splits_must_be_disjoint_and_classes_big_enough(pool):
    x, y = pool
    with pytest.raises(ValueError, match="not disjoint"):
        meta.ClassSplit((0, 1, 2), (2, 3), (4,))
    with pytest.raises(ValueError, match="shots \\+ queries"):
        meta.EpisodeSampler(x, y, SPLIT.test, 3, 100, 100, seed=0)
    with pytest.raises(ValueError, match="4-way"):
        meta.EpisodeSampler(x, y, SPLIT.test, 4, 1, 1, seed=0)
    with pytest.raises(ValueError, match="load_pool"):
        meta.EpisodeSampler(x, y, meta.CIFAR_FS_SPLIT.test, 3, 1, 1, seed=0)
    fs = meta.CIFAR_FS_SPLIT
    assert (len(fs.train), len(fs.val), len(fs.test)) == (64, 16, 20)
    assert set(fs.classes) == set(meta.CIFAR100_CLASSES) and len(meta.CIFAR100_CLASSES) == 100


# --- The algorithms' gradients -------------------------------------------------------------
def tiny_task(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    sx, qx = (torch.randn(n, 3, generator=g, dtype=torch.float64) for n in (4, 6))
    ep = meta.Episode(sx, torch.tensor([0, 1, 0, 1]), qx, torch.tensor([0, 1, 1, 0, 0, 1]))
    return net, ep


def meta_gradient(net, ep, first_order: bool) -> torch.Tensor:
    params = dict(net.named_parameters())
    loss, _ = meta.maml_loss(net, params, ep, inner_lr=0.5, steps=2, first_order=first_order)
    grads = torch.autograd.grad(loss, tuple(params.values()))
    return torch.cat([g.flatten() for g in grads])


def test_maml_second_order_gradient_matches_finite_differences():
    net, ep = tiny_task()
    analytic = meta_gradient(net, ep, first_order=False)
    flat = torch.cat([p.detach().flatten() for p in net.parameters()])

    def objective(vector: torch.Tensor) -> float:
        params, i = {}, 0
        for name, p in net.named_parameters():
            params[name] = vector[i : i + p.numel()].view_as(p).requires_grad_()
            i += p.numel()
        with torch.enable_grad():
            return meta.maml_loss(net, params, ep, 0.5, 2, first_order=False)[0].item()

    eps = 1e-6
    numeric = torch.zeros_like(flat)
    for i in range(len(flat)):
        e = torch.zeros_like(flat)
        e[i] = eps
        numeric[i] = (objective(flat + e) - objective(flat - e)) / (2 * eps)
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-7)
    first = meta_gradient(net, ep, first_order=True)
    assert (first - numeric).abs().max() > 1e-3  # the Hessian terms matter here
    # first order: the query loss's gradient at the adapted weights
    params = dict(net.named_parameters())
    fast = {
        n: w.detach().requires_grad_() for n, w in meta.adapt(net, params, *ep[:2], 0.5, 2).items()
    }
    q_loss = nn.functional.cross_entropy(
        torch.func.functional_call(net, fast, (ep.query_x,)), ep.query_y
    )
    at_fast = torch.cat([g.flatten() for g in torch.autograd.grad(q_loss, tuple(fast.values()))])
    torch.testing.assert_close(first, at_fast)


def test_reptile_moves_the_init_toward_the_adapted_weights():
    net, ep = tiny_task(1)
    init = {n: p.detach().clone() for n, p in net.named_parameters()}
    delta, _ = meta.reptile_delta(net, dict(net.named_parameters()), ep, inner_lr=0.5, steps=3)
    adapted = {n: init[n] + delta[n] for n in init}
    assert all(torch.equal(p, init[n]) for n, p in net.named_parameters())  # adapt is functional
    optimizer = torch.optim.SGD(net.parameters(), lr=0.25)
    meta.reptile_step(net, [delta], optimizer)
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.detach(), init[n] + 0.25 * (adapted[n] - init[n]))
    before = sum(((init[n] - adapted[n]) ** 2).sum() for n in init)
    after = sum(((p.detach() - adapted[n]) ** 2).sum() for n, p in net.named_parameters())
    assert before > 0 and math.isclose(after, 0.75**2 * before, rel_tol=1e-9)


def test_prototypical_loss_by_hand():
    f64 = torch.float64
    support = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, 4.0]], dtype=f64)
    query = torch.tensor([[1.0, 1.0], [0.0, 3.0]], dtype=f64)  # prototypes (1, 0) and (0, 3)
    loss, logits = meta.prototypical_loss(
        support, torch.tensor([0, 0, 1, 1]), query, torch.tensor([0, 1]), ways=2
    )
    # squared distances: (1,1) -> 1 and 5; (0,3) -> 10 and 0
    assert logits.tolist() == [[-1.0, -5.0], [-10.0, 0.0]]
    expected = (math.log1p(math.exp(-4.0)) + math.log1p(math.exp(-10.0))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_embedding_is_the_pooled_backbone_feature():
    model = small_model()
    model.eval()
    x = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    with torch.no_grad():
        expected = model.net.pool(model.net.stages(model.prep(x)))
        assert torch.equal(meta.embed(model, x), expected)


# --- End to end on the digits --------------------------------------------------------------
CONFIGS = {
    "protonet": dict(meta_lr=1e-3),
    "maml": dict(inner_lr=0.4, inner_steps=2),
    "fomaml": dict(inner_lr=0.4, inner_steps=2),
    "reptile": dict(inner_lr=0.4, inner_steps=3, meta_optimizer="sgd", meta_lr=0.5),
}


class Recorder:
    def __init__(self):
        self.calls = []

    def on_epoch_end(self, epoch, metrics):
        self.calls.append((epoch, dict(metrics)))


@pytest.mark.parametrize("algorithm", list(CONFIGS))
def test_meta_fit_end_to_end(pool, algorithm):
    x, y = pool
    config = meta_config(
        seed=3,
        algorithm=algorithm,
        meta_epochs=2,
        episodes_per_epoch=6,
        meta_batch_size=3,
        val_episodes=12,
        queries=4,
        **CONFIGS[algorithm],
    )
    runs = []
    for _ in range(2):
        model, rec = small_model(), Recorder()
        start = {k: v.clone() for k, v in model.state_dict().items()}
        result = meta.meta_fit(config, model, x, y, SPLIT, [rec])
        runs.append((result, rec, model))
    (a, rec_a, model_a), (b, _, _) = runs
    assert [e for e, _ in rec_a.calls] == [1, 2]
    for _, m in rec_a.calls:
        assert set(m) == set(meta.METRICS)
        assert m["adaptation_gap"] == pytest.approx(m["meta_train_acc"] - m["meta_val_acc"])
        assert 0 < m["meta_val_ci95"] < 0.5
    assert a.history == b.history == [m for _, m in rec_a.calls]  # deterministic
    assert all(torch.equal(a.best_state[k], b.best_state[k]) for k in a.best_state)
    assert a.best["meta_val_acc"] == max(m["meta_val_acc"] for m in a.history)
    assert any(not torch.equal(start[k], a.best_state[k]) for k in start if "running" not in k)
    assert a.best["meta_val_acc"] > 0.5  # chance is 1/3
    mean, ci = meta.meta_test(config, model_a, x, y, SPLIT, shots=1, queries=5, episodes=20)
    before = {k: v.clone() for k, v in model_a.state_dict().items()}
    assert (mean, ci) == meta.meta_test(
        config, model_a, x, y, SPLIT, shots=1, queries=5, episodes=20
    )
    assert all(torch.equal(before[k], v) for k, v in model_a.state_dict().items())
    assert 1 / 3 < mean <= 1 and 0 < ci < 0.5


def test_protonet_learns_and_callbacks_can_stop_it(pool):
    x, y = pool
    config = meta_config(meta_epochs=3, episodes_per_epoch=12, val_episodes=5, queries=5)
    result = meta.meta_fit(config, small_model(), x, y, SPLIT)
    losses = [m["meta_train_loss"] for m in result.history]
    assert losses[-1] < losses[0]

    class Prune:
        def on_epoch_end(self, epoch, metrics):
            raise RuntimeError(f"pruned at {epoch}")

    with pytest.raises(RuntimeError, match="pruned at 1"):
        meta.meta_fit(config, small_model(), x, y, SPLIT, [Prune()])


def test_maml_needs_a_head_of_ways_outputs(pool):
    x, y = pool
    with pytest.raises(ValueError, match="head with 3 outputs"):
        meta.meta_fit(meta_config(algorithm="maml"), small_model(2), x, y, SPLIT)


def test_meta_learned_init_loads_as_pretrained(pool, tmp_path):
    x, y = pool
    config = meta_config(algorithm="fomaml", meta_epochs=1, episodes_per_epoch=2, val_episodes=2)
    model = small_model()
    result = meta.meta_fit(config, model, x, y, SPLIT)
    assert all(k.startswith("net.") for k in result.best_state)
    path = checkpoints.save_init(result.best_state, tmp_path / "init.pt")
    target = models.build_model(ModelSpec(pretrained="none", width=8), 5, pretrained=path)
    assert models.head_module(target)[-1].out_features == 5
    loaded = target.state_dict()
    for key, value in result.best_state.items():
        if not key.startswith("net.head."):
            assert torch.equal(loaded[key], value), key
    # the running statistics were recomputed for the kept weights on the meta-train images
    with torch.no_grad():
        conv = model.net.stages[0][0][0](model.prep(x[torch.isin(y, torch.tensor(SPLIT.train))]))
    mean, var = conv.mean((0, 2, 3)), conv.var((0, 2, 3))
    torch.testing.assert_close(loaded["net.stages.0.0.1.running_mean"], mean, atol=0.01, rtol=0)
    torch.testing.assert_close(loaded["net.stages.0.0.1.running_var"], var, atol=0, rtol=0.05)
