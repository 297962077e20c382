"""Meta-learning core: episodic N-way K-shot sampling over a class split, and `meta_fit` with
Reptile, first-order MAML, second-order MAML and Prototypical Networks; `meta_test` once.

Knows neither Optuna nor MLflow. Like `finetune.fit`, `meta_fit` runs on the epoch kernel
(`harness.core.kernel`): it reports each meta-epoch through callbacks (`on_epoch_end(epoch,
metrics)`; an exception from one, a pruner's decision, propagates), reads the device once per
meta-epoch, keeps the best meta-epoch's weights (by the objective's metric and direction,
`shared.BestEpoch`), offers its resume state and resumes from it, and is deterministic under
the trial's seed on the CPU for a thread count. It reads the trial's `meta:` section
(`MetaSpec`), and of `train:` the device, threads and max_loss; meta-learning runs in fp32 (the
spec refuses the other `train:` keys in a meta study).

Classes are split three ways, disjoint (`ClassSplit`): meta-train classes (the episodes that
train), meta-val classes (a fixed seeded set of episodes scores every meta-epoch: selection and
pruning) and meta-test classes (`meta_test`, reported once). `DIGITS_SPLIT` is 0-3 / 4-6 / 7-9
(3-way tasks); `CIFAR_FS_SPLIT` is CIFAR-100's 64/16/20 split of Bertinetto et al. (2019), by
class name. `load_pool` reads any data set of the harness as one (x uint8, y) pool. The splits
and the episode sampler are `harness.data.episodes`.

Decisions:
- BatchNorm uses the batch statistics (train mode) everywhere: in the inner loop, on the query
  and in evaluation, as MAML does (transductive over each batch). MAML and Reptile adapt on the
  support batch and predict the query as one batch; ProtoNets embed support and query together
  as one batch. Running statistics are never read while meta-learning; at the end they are
  recomputed for the kept weights (`recalibrate_bn`: a cumulative average over up to 2,048
  meta-train images) so that the exported initialization is right in eval mode too.
- Every trainable parameter is adapted in the inner loop (plain SGD at `inner_lr`, full batch
  on the support set); MAML's and Reptile's head has `ways` outputs (labels 0..ways-1 are
  assigned per episode, in a random class order). The head is part of the meta-learned init.
- ProtoNets embed with the backbone's pooled features: the input of `models.head_module`
  (before the head's dropout), taken by a forward pre-hook, so any `ImageModel` works. Logits
  are negative squared Euclidean distances to the class means of the support embeddings.
- Reptile's meta-gradient is `init - mean(adapted)` over the meta-batch, given to the meta
  optimizer: with `meta_optimizer="sgd"` the step is `init += meta_lr * mean(adapted - init)`
  (Nichol et al. 2018); with Adam it is Adam on that direction.
- The meta-learned initialization is the model's `state_dict()`: for an `ImageModel` every key
  is `net.*` (its Preprocess has no persistent buffers), which is a harness weights file.
  `checkpoints.save_init(result.best_state, "init.pt")` (or `torch.save(model.state_dict(),
  path)`) writes it; `models.build_model(spec, k, pretrained="init.pt")` (or
  `model.pretrained: init.pt` in an experiment file) loads every weight but the head's, for
  any number of target classes. For ProtoNets the head is unused (its random init is saved and
  dropped on load).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from harness.config.spec import MetaSpec, TrialConfig
from harness.core import kernel, models, resume_state, shared
from harness.core.kernel import Result
from harness.core.shared import Callback, Schedule
from harness.data.episodes import (  # noqa: F401 (the class splits and episodes, re-exported)
    CIFAR100_CLASSES,
    CIFAR_FS_SPLIT,
    DIGITS_SPLIT,
    ClassSplit,
    Episode,
    EpisodeSampler,
    fixed_episodes,
    load_pool,
)

VAL_STREAM, TEST_STREAM = 1_000_003, 2_000_003  # seed offsets of the val and test episodes


# --- Result ----------------------------------------------------------------------------------
METRICS = (
    "meta_train_acc",
    "meta_train_loss",
    "meta_val_acc",
    "meta_val_loss",
    "meta_val_ci95",
    "adaptation_gap",
    "lr",
)


MetaResult = Result  # every core's result (`harness.core.kernel`); best_state: the init


# --- The algorithms' pieces (pure functions of a module and its parameters) ----------------
def adapt(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    inner_lr: float,
    steps: int,
    create_graph: bool = False,
) -> dict[str, torch.Tensor]:
    """`steps` full-batch SGD steps on (x, y) from `params`, functionally (the module's own
    parameters are untouched). `create_graph=True` keeps the graph through the inner loop, so a
    loss of the result differentiates to `params` with second-order terms (MAML); False
    treats the inner gradients as constants (first-order MAML). Parameters of the module not
    in `params` are used as they are and not adapted."""
    fast = dict(params)
    for _ in range(steps):
        loss = F.cross_entropy(functional_call(model, fast, (x,)), y)
        grads = torch.autograd.grad(loss, tuple(fast.values()), create_graph=create_graph)
        fast = {n: w - inner_lr * g for (n, w), g in zip(fast.items(), grads, strict=True)}
    return fast


def maml_loss(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    episode: Episode,
    inner_lr: float,
    steps: int,
    first_order: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(query loss after adapting on the support, query logits); `loss.backward()` gives the
    MAML meta-gradient in `params` (first-order: without the inner loop's Hessian terms)."""
    sx, sy, qx, qy = episode
    fast = adapt(model, params, sx, sy, inner_lr, steps, create_graph=not first_order)
    logits = functional_call(model, fast, (qx,))
    return F.cross_entropy(logits, qy), logits


def adapt_and_predict(
    model: nn.Module, params: dict[str, torch.Tensor], episode: Episode, inner_lr, steps
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(adapted parameters, their query logits), with no graph back to `params`: evaluation,
    and Reptile's inner loop."""
    init = {n: p.detach().requires_grad_() for n, p in params.items()}
    with torch.enable_grad():
        fast = adapt(model, init, episode.support_x, episode.support_y, inner_lr, steps)
    with torch.no_grad():
        logits = functional_call(model, fast, (episode.query_x,))
    return {n: w.detach() for n, w in fast.items()}, logits


def reptile_delta(
    model: nn.Module, params: dict[str, torch.Tensor], episode: Episode, inner_lr, steps
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(adapted - init per parameter, the adapted model's query logits): Reptile's direction."""
    fast, logits = adapt_and_predict(model, params, episode, inner_lr, steps)
    return {n: fast[n] - params[n].detach() for n in fast}, logits


def reptile_step(
    model: nn.Module,
    deltas: Sequence[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
) -> None:
    """One meta-step: each parameter's gradient is `-mean(adapted - init)` over the tasks."""
    optimizer.zero_grad(set_to_none=True)
    for n, p in model.named_parameters():
        if n in deltas[0]:
            p.grad = -torch.stack([d[n] for d in deltas]).mean(0)
    optimizer.step()


def embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The backbone's pooled features: the input of the head (`models.head_module`)."""
    store: list[torch.Tensor] = []
    hook = models.head_module(model).register_forward_pre_hook(
        lambda _m, args: store.append(args[0])
    )
    try:
        model(x)
    finally:
        hook.remove()
    return store[0].flatten(1)


def prototypical_loss(
    support: torch.Tensor,
    support_y: torch.Tensor,
    query: torch.Tensor,
    query_y: torch.Tensor,
    ways: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy of the query, logits): logits are minus the squared Euclidean distances
    of each query embedding to each class's prototype (the mean of its support embeddings)."""
    sums = torch.zeros(ways, support.shape[1], dtype=support.dtype, device=support.device)
    sums = sums.index_add(0, support_y, support)
    counts = torch.bincount(support_y, minlength=ways).clamp(min=1).to(support.dtype)
    prototypes = sums / counts[:, None]
    logits = -((query[:, None, :] - prototypes[None, :, :]) ** 2).sum(-1)
    return F.cross_entropy(logits, query_y), logits


def protonet_loss(model: nn.Module, episode: Episode, ways: int):
    sx, sy, qx, qy = episode
    emb = embed(model, torch.cat([sx, qx]))  # one batch: one set of BatchNorm statistics
    return prototypical_loss(emb[: len(sx)], sy, emb[len(sx) :], qy, ways)


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _check_head(m: MetaSpec, model: nn.Module) -> None:
    if m.algorithm == "protonet":
        return
    head = [x for x in models.head_module(model).modules() if isinstance(x, nn.Linear)]
    ways = max(m.ways, m.val_shape[0])
    if not head or head[-1].out_features < ways:
        out = head[-1].out_features if head else None
        raise ValueError(
            f"meta_fit: {m.algorithm} needs a head with {ways} outputs (build the model "
            f"with num_classes = ways); this one has {out}"
        )


# --- Episodes in, (loss, correct) out ------------------------------------------------------
def _batch_stats_mode(model: nn.Module) -> None:
    """Train mode (BatchNorm on batch statistics), but dropout off: evaluation."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.eval()


def evaluate_episode(config: MetaSpec, model: nn.Module, episode: Episode, ways: int):
    """(query loss, query correct count) after adaptation, on the device. BatchNorm uses batch
    statistics (train mode), dropout is off; the model's parameters are unchanged."""
    _batch_stats_mode(model)
    if config.algorithm == "protonet":
        with torch.no_grad():
            loss, logits = protonet_loss(model, episode, ways)
    else:
        steps = config.test_inner_steps
        _, logits = adapt_and_predict(model, _trainable(model), episode, config.inner_lr, steps)
        loss = F.cross_entropy(logits, episode.query_y)
    return loss.detach(), (logits.argmax(1) == episode.query_y).sum()


def evaluate_episodes(config, model, episodes: Sequence[Episode], ways: int):
    """Per-episode query accuracies and losses (device tensors)."""
    accs, losses = [], []
    for ep in episodes:
        loss, correct = evaluate_episode(config, model, ep, ways)
        accs.append(correct.float() / len(ep.query_y))
        losses.append(loss)
    return torch.stack(accs), torch.stack(losses)


def _mean_ci95(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = len(values)
    std = values.std(correction=1 if n > 1 else 0)
    return values.mean(), 1.96 * std / math.sqrt(n)


def _meta_step(config, model, batch: list[Episode], optimizer):
    """One meta-update on a meta-batch; (query loss sum, correct, query count) of the batch."""
    model.train()
    loss_sum = torch.zeros((), device=batch[0].query_y.device)
    correct = torch.zeros((), dtype=torch.long, device=loss_sum.device)
    n_query = sum(len(ep.query_y) for ep in batch)
    algo = config.algorithm
    if algo == "reptile":
        deltas = []
        for ep in batch:
            delta, logits = reptile_delta(
                model, _trainable(model), ep, config.inner_lr, config.inner_steps
            )
            deltas.append(delta)
            loss_sum += F.cross_entropy(logits, ep.query_y)
            correct += (logits.argmax(1) == ep.query_y).sum()
        reptile_step(model, deltas, optimizer)
        return loss_sum, correct, n_query
    optimizer.zero_grad(set_to_none=True)
    for ep in batch:  # one backward per task: memory of one inner loop at a time
        if algo == "protonet":
            loss, logits = protonet_loss(model, ep, config.ways)
        else:
            loss, logits = maml_loss(
                model,
                _trainable(model),
                ep,
                config.inner_lr,
                config.inner_steps,
                first_order=algo == "fomaml",
            )
        (loss / len(batch)).backward()
        loss_sum += loss.detach()
        correct += (logits.detach().argmax(1) == ep.query_y).sum()
    optimizer.step()
    return loss_sum, correct, n_query


@torch.no_grad()
def recalibrate_bn(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> None:
    """Recompute every BatchNorm's running statistics for the current weights: a cumulative
    average over the batches of `x` (train-mode forward passes, nothing else changes)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    norms = [m for m in norms if m.track_running_stats]
    if not norms:
        return
    saved = [(m, m.momentum) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    try:
        for start in range(0, len(x), batch_size):
            if len(x[start : start + batch_size]) >= 2:
                model(x[start : start + batch_size])
    finally:
        for m, momentum in saved:
            m.momentum = momentum


def _subset_of_classes(x, y, classes, limit: int, seed: int) -> torch.Tensor:
    idx = torch.nonzero(torch.isin(y.cpu(), torch.tensor([int(c) for c in classes]))).flatten()
    if len(idx) > limit:
        g = torch.Generator().manual_seed(seed)
        idx = idx[torch.randperm(len(idx), generator=g)[:limit]].sort().values
    return x[idx.to(x.device)]


# --- meta_fit and meta_test ----------------------------------------------------------------
def _make_optimizer(config: MetaSpec, model: nn.Module) -> torch.optim.Optimizer:
    groups = [{"params": list(_trainable(model).values()), "base_lr": config.meta_lr}]
    if config.meta_optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.meta_lr)
    return torch.optim.Adam(groups, lr=config.meta_lr)


def meta_fit(
    config: TrialConfig,
    model: nn.Module,
    data_x: torch.Tensor,
    data_y: torch.Tensor,
    split: ClassSplit,
    callbacks: Iterable[Callback] = (),
    resume: dict | None = None,
) -> MetaResult:
    """Meta-train `model` on episodes of `split.train` classes; score each meta-epoch on the
    fixed meta-val episodes of `split.val`; end with the best meta-epoch's weights loaded.

    `data_x` uint8 (N, C, H, W), `data_y` the labels `split` names (see `load_pool`). Per
    meta-epoch the callbacks get `METRICS`: meta_train_acc and meta_train_loss (query, after
    adaptation, over the epoch's meta-train episodes), meta_val_acc, meta_val_loss and
    meta_val_ci95 (1.96 std / sqrt(n) over the val episodes), adaptation_gap = meta_train_acc
    - meta_val_acc, and lr (the meta lr at the epoch's start).

    Resume as `finetune.fit`: callbacks with `on_checkpoint` get the resume state after each
    meta-epoch (`harness.core.resume_state`), and `meta_fit(..., resume=state)` on a model
    built the same way continues at the next meta-epoch as an uninterrupted run would.
    """
    return kernel.run(
        config,
        lambda device: _setup(config, model, data_x, data_y, split, device),
        callbacks,
        resume,
        resume_state.OWN["meta"],
    )


def _setup(config: TrialConfig, model, data_x, data_y, split: ClassSplit, device) -> kernel.Core:
    """meta_fit's parts for the epoch kernel."""
    m = config.meta
    _check_head(m, model)
    model.to(device)
    x, y = data_x.to(device), data_y.to(device)
    sampler = EpisodeSampler(x, y, split.train, m.ways, m.shots, m.queries, config.seed)
    v_ways, v_shots, v_queries = m.val_shape
    val = fixed_episodes(
        x, y, split.val, v_ways, v_shots, v_queries, config.seed + VAL_STREAM, m.val_episodes
    )
    mb = m.meta_batch_size
    steps_per_epoch = math.ceil(m.episodes_per_epoch / mb)
    schedule = Schedule(_make_optimizer(m, model), m.schedule, m.meta_epochs * steps_per_epoch)

    def train(epoch: int):
        lr = schedule.optimizer.param_groups[0]["lr"]  # the meta lr at the epoch's start
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        n_query, left = 0, m.episodes_per_epoch
        while left > 0:
            batch = sampler.episodes(min(mb, left))
            left -= len(batch)
            schedule.set_lr()
            b_loss, b_correct, b_n = _meta_step(m, model, batch, schedule.optimizer)
            schedule.step += 1
            loss_sum += b_loss
            correct += b_correct
            n_query += b_n
        return lr, loss_sum, correct, n_query

    def measure(epoch: int, trained) -> dict[str, float]:
        lr, loss_sum, correct, n_query = trained
        accs, losses = evaluate_episodes(m, model, val, v_ways)
        val_acc, ci95 = _mean_ci95(accs)
        n_train_eps = m.episodes_per_epoch
        sums = [loss_sum / n_train_eps, correct.float() / n_query, val_acc, losses.mean(), ci95]
        tr_loss, tr_acc, va_acc, va_loss, va_ci = torch.stack(sums).tolist()  # the one sync
        return {
            "meta_train_acc": tr_acc,
            "meta_train_loss": tr_loss,
            "meta_val_acc": va_acc,
            "meta_val_loss": va_loss,
            "meta_val_ci95": va_ci,
            "adaptation_gap": tr_acc - va_acc,
            "lr": lr,
        }

    def finish(best_state) -> dict[str, torch.Tensor]:
        model.load_state_dict(best_state)
        if m.recalibrate_bn:
            recalibrate_bn(model, _subset_of_classes(x, y, split.train, 2048, config.seed))
        model.eval()
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    return kernel.Core(
        model=model,
        schedule=schedule,
        generator=sampler.generator,
        epochs=m.meta_epochs,
        train=train,
        measure=measure,
        keep=lambda: shared.copy_state(model),
        finish=finish,
        loss="meta_train_loss",
        loss_name="meta-train loss",
    )


def meta_test(
    config: TrialConfig,
    model: nn.Module,
    data_x: torch.Tensor,
    data_y: torch.Tensor,
    split: ClassSplit,
    ways: int | None = None,
    shots: int | None = None,
    queries: int | None = None,
    episodes: int = 600,
    classes: Sequence[int] | None = None,
) -> tuple[float, float]:
    """(mean query accuracy, 95% half-width) over `episodes` seeded meta-test episodes of
    `split.test` (or `classes`) after adaptation as the trial's `meta:` says; ways/shots/queries
    default to its evaluation shape. Reported once, after the study picked its trial."""
    m = config.meta
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    device = shared.resolve_device(config.train.device)
    d_ways, d_shots, d_queries = m.val_shape
    ways, shots, queries = ways or d_ways, shots or d_shots, queries or d_queries
    _check_head(m.model_copy(update={"ways": ways, "eval_ways": ways}), model)
    model.to(device)
    x, y = data_x.to(device), data_y.to(device)
    test = fixed_episodes(
        x,
        y,
        split.test if classes is None else classes,
        ways,
        shots,
        queries,
        config.seed + TEST_STREAM,
        episodes,
    )
    state = shared.copy_state(model)
    try:
        accs, _ = evaluate_episodes(m, model, test, ways)
    finally:  # train-mode forwards moved the running statistics: put them back
        model.load_state_dict(state)
        model.eval()
    mean, ci95 = _mean_ci95(accs)
    return tuple(torch.stack([mean, ci95]).tolist())
