"""Episodic sampling for meta-learning: the three-way class split (`ClassSplit`: meta-train,
meta-val, meta-test; digits 0-3 / 4-6 / 7-9, CIFAR-FS's 64/16/20 of CIFAR-100 by class name),
one pool of a data set's images (`load_pool`), and seeded N-way K-shot episodes
(`EpisodeSampler`, `fixed_episodes`). Used by `harness.core.meta`; knows neither Optuna nor MLflow.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from harness.config.spec import DataSpec
from harness.data.datasets import TaskData, load_source


# --- Class splits --------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassSplit:
    """Disjoint meta-train, meta-val and meta-test classes (indices, or names where the data
    set has them: `load_pool` resolves names)."""

    train: tuple[int | str, ...]
    val: tuple[int | str, ...]
    test: tuple[int | str, ...]

    def __post_init__(self) -> None:
        for name in ("train", "val", "test"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
            if not getattr(self, name):
                raise ValueError(f"ClassSplit.{name}: no classes")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"ClassSplit: the splits are not disjoint: {self}")

    @property
    def classes(self) -> tuple[int | str, ...]:
        return self.train + self.val + self.test


DIGITS_SPLIT = ClassSplit((0, 1, 2, 3), (4, 5, 6), (7, 8, 9))

# CIFAR-100's fine classes (torchvision's order) and the CIFAR-FS split (Bertinetto et al.
# 2019; the lists of torchmeta's cifar-fs assets): 16 val, 20 test, the other 64 train.
# fmt: off
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom",
    "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle",
    "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)
_CIFAR_FS_VAL = (
    "beaver", "otter", "flatfish", "shark", "lamp", "television", "beetle", "butterfly", "sea",
    "camel", "cattle", "crab", "crocodile", "maple_tree", "motorcycle", "tractor",
)
_CIFAR_FS_TEST = (
    "whale", "poppy", "rose", "sweet_pepper", "telephone", "bed", "table", "wardrobe", "leopard",
    "plain", "chimpanzee", "fox", "snail", "worm", "baby", "man", "woman", "bicycle",
    "pickup_truck", "rocket",
)
# fmt: on
CIFAR_FS_SPLIT = ClassSplit(
    tuple(c for c in CIFAR100_CLASSES if c not in _CIFAR_FS_VAL + _CIFAR_FS_TEST),
    _CIFAR_FS_VAL,
    _CIFAR_FS_TEST,
)


def load_pool(
    spec: DataSpec, split: ClassSplit, size_hint: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, ClassSplit, TaskData]:
    """Every train-split image of the split's classes of `spec.dataset` (`data.root`,
    `data.download`, `data.image_size` apply; `size_hint` sizes image-folder images when it
    is unset) as uint8 (N, C, H, W) and int64 labels, and the data set's task it came from
    (its `data_hash`, `mean`, `std` and `report`).

    Labels are positions in `split.classes` (train, then val, then test classes); the returned
    split names those labels. For `DIGITS_SPLIT` they are the digits themselves. Duplicate
    images are not refused here (a meta-learning pool has no train/test boundary inside it).
    """
    pool_spec = spec.model_copy(update={"source_classes": split.classes, "allow_duplicates": True})
    task = load_source(pool_spec, seed=0, size_hint=size_hint)
    x = torch.cat([task.x_train, task.x_val])
    y = torch.cat([task.y_train, task.y_val])
    a, b = len(split.train), len(split.train) + len(split.val)
    labels = ClassSplit(tuple(range(a)), tuple(range(a, b)), tuple(range(b, len(split.classes))))
    return x, y, labels, task


# --- Episodes ------------------------------------------------------------------------------
class Episode(NamedTuple):
    support_x: torch.Tensor  # (ways * shots, C, H, W), class-major
    support_y: torch.Tensor  # 0..ways-1
    query_x: torch.Tensor  # (ways * queries, C, H, W)
    query_y: torch.Tensor


class EpisodeSampler:
    """Seeded N-way K-shot episodes over `classes` of (x, y).

    Each episode draws `ways` of the classes (in random order: episode label i is the i-th
    drawn class), then `shots + queries` distinct images of each: the first `shots` are the
    support, the rest the query, so support and query never share an image. Draws come from a
    CPU generator seeded with `seed`: the same seed gives the same sequence of episodes.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        classes: Sequence[int],
        ways: int,
        shots: int,
        queries: int,
        seed: int,
    ):
        if any(isinstance(c, str) for c in classes):
            raise ValueError(
                f"EpisodeSampler: class names {list(classes)[:3]}...: labels are integers "
                "(`load_pool` turns a split of names into one of labels)"
            )
        classes = tuple(int(c) for c in classes)
        if len(set(classes)) != len(classes):
            raise ValueError(f"EpisodeSampler: classes {classes} names one twice")
        if not 1 <= ways <= len(classes):
            raise ValueError(f"EpisodeSampler: {ways}-way tasks from {len(classes)} classes")
        if shots < 1 or queries < 1:
            raise ValueError(f"EpisodeSampler: shots ({shots}) and queries ({queries}) >= 1")
        if len(x) != len(y):
            raise ValueError(f"EpisodeSampler: {len(x)} images but {len(y)} labels")
        self.x, self.y = x, y
        self.classes, self.ways, self.shots, self.queries = classes, ways, shots, queries
        y_cpu = y.detach().cpu()
        self._by_class = [torch.nonzero(y_cpu == c).flatten() for c in classes]
        for c, idx in zip(classes, self._by_class, strict=True):
            if len(idx) < shots + queries:
                raise ValueError(
                    f"EpisodeSampler: class {c} has {len(idx)} images; shots + queries = "
                    f"{shots + queries}"
                )
        self.generator = torch.Generator().manual_seed(seed)

    def sample_indices(self) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        """(support indices into x, query indices into x, the classes drawn in label order)."""
        g, k = self.generator, self.shots + self.queries
        chosen = torch.randperm(len(self.classes), generator=g)[: self.ways].tolist()
        support, query = [], []
        for c in chosen:
            idx = self._by_class[c]
            pick = idx[torch.randperm(len(idx), generator=g)[:k]]
            support.append(pick[: self.shots])
            query.append(pick[self.shots :])
        return torch.cat(support), torch.cat(query), tuple(self.classes[c] for c in chosen)

    def sample(self) -> Episode:
        s, q, _ = self.sample_indices()
        device = self.x.device
        labels = torch.arange(self.ways, device=device)
        return Episode(
            self.x[s.to(device)],
            labels.repeat_interleave(self.shots),
            self.x[q.to(device)],
            labels.repeat_interleave(self.queries),
        )

    def episodes(self, n: int) -> list[Episode]:
        return [self.sample() for _ in range(n)]

    def __iter__(self) -> Iterator[Episode]:
        while True:
            yield self.sample()


def fixed_episodes(x, y, classes, ways, shots, queries, seed, n) -> list[Episode]:
    """A fixed seeded set of `n` episodes (evaluation): the same arguments, the same set."""
    return EpisodeSampler(x, y, classes, ways, shots, queries, seed).episodes(n)
