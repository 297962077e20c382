"""One classification task as the cores see it (`TaskData`: train / val / test uint8 image
tensors and labels, moved to the device whole or streamed) and what the data checks found
(`DataReport`). Built by `harness.data.datasets`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from harness.data.stream import HostImages


@dataclass(frozen=True)
class DataReport:
    """What the data checks found for one task; `lines()` is what a study prints."""

    dataset: str = ""  # the data set and where it was read: "cifar10 in data"
    skipped: tuple[tuple[str, str], ...] = ()  # (path, why) of each unreadable image skipped
    duplicates: int = 0  # images of val/test equal to one of an earlier split (leakage)
    duplicate_examples: tuple[str, ...] = ()  # a few, e.g. "test cat/b.png = train cat/a.png"
    duplicates_allowed: bool = False  # data.allow_duplicates: duplicates were only reported

    @property
    def skipped_paths(self) -> tuple[str, ...]:
        return tuple(path for path, _ in self.skipped)

    def lines(self, limit: int = 10) -> list[str]:
        name = self.dataset or "data"
        out = []
        if self.skipped:
            out.append(f"data ({name}): skipped {len(self.skipped)} unreadable image(s):")
            out += [f"  {path}: {why}" for path, why in self.skipped[:limit]]
            if len(self.skipped) > limit:
                out.append(f"  ... and {len(self.skipped) - limit} more")
        if self.duplicates:
            allowed = " (kept: data.allow_duplicates is true)" if self.duplicates_allowed else ""
            out.append(
                f"data ({name}): {self.duplicates} exact duplicate image(s) across "
                f"train/val/test{allowed}, e.g. " + "; ".join(self.duplicate_examples)
            )
        if not out:
            out.append(f"data ({name}): no unreadable images, no duplicates across splits")
        return out


@dataclass(frozen=True)
class TaskData:
    """One classification task: train / val / test tensors, labels 0..num_classes-1."""

    # HostImages: rows of the memory-mapped cache (nothing read yet); `to` puts them all on the
    # device, or streams them batch by batch when larger than data.device_budget_gb
    x_train: torch.Tensor | HostImages
    y_train: torch.Tensor
    x_val: torch.Tensor | HostImages
    y_val: torch.Tensor
    x_test: torch.Tensor | HostImages
    y_test: torch.Tensor
    classes: tuple[int | str, ...]  # the class ids as the spec gives them, in label order
    data_hash: str  # identifies the exact split (indices; imagefolder: files and contents)
    mean: tuple[float, ...]  # per-channel statistics of the data set, in [0, 1]
    std: tuple[float, ...]
    report: DataReport = field(default_factory=DataReport)  # what the data checks found

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to(self, device: torch.device | str) -> TaskData:
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor | HostImages)
        }
        rest = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in moved}
        return TaskData(**moved, **rest)

    @property
    def channels(self) -> int:
        return self.x_train.shape[1]

    @property
    def image_size(self) -> int:
        return self.x_train.shape[-1]
