"""A split that stays in host memory and reaches the device one batch at a time.

Small data keeps the core's path: the whole split on the device as one uint8 tensor, indexed
per batch, no per-step host work. A split decoded into the disk cache (`harness.data.datacache`)
arrives as `HostImages` (its memory-mapped rows, nothing read yet: a process that loads a
task reads no pixels until they go to the device); `HostImages.to(device)`
(called by `TaskData.to`) decides:

- its bytes <= the budget (`data.device_budget_gb`; default half of the device's free memory,
  on the CPU half of the available RAM): a plain tensor on the device, as before;
- else it stays a `HostImages` bound to the device: each batch's rows are gathered from the
  memory-mapped cache (`np.take`) into pinned host memory (on CUDA; a plain tensor on the CPU)
  and copied with `non_blocking=True`. The loop does not wait for the device, so the gather of
  the next batch overlaps the step running on it; two pinned buffers alternate, each reused
  only after a CUDA event says its previous copy is done.

`batch(x, idx, host_idx)` is the training loop's hook: `x[idx]`, but a streamed split gathers
the host copy of the indices (no device-to-host sync per step). Indexing a `HostImages` with a
slice or an index tensor (evaluation, the clean-train subset, the compile warm-up) works too.
On the CPU both paths give the same batches, so the same results bit for bit.
"""

from __future__ import annotations

import os

import numpy as np
import torch

BUDGET_SHARE = 0.5  # of the device's free memory (or the host's available RAM)


def default_budget(device: torch.device) -> int:
    """Bytes of uint8 images a split may take on `device` when data.device_budget_gb is unset."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * BUDGET_SHARE)
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not POSIX: keep today's path
        return 1 << 62
    return int(available * BUDGET_SHARE)


class HostImages:
    """Rows `rows` of the uint8 (N, C, H, W) host array `source` (a memory-mapped cache)."""

    def __init__(
        self,
        source: np.ndarray,
        rows: np.ndarray,
        budget_gb: float | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.source = source
        self.rows = np.ascontiguousarray(rows, dtype=np.int64)
        self.budget_gb = budget_gb
        self.device = torch.device(device)
        self._buffers: list[torch.Tensor] = []
        self._events: list = []
        self._turn = 0

    # --- what the core reads of a tensor ---
    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.rows), *self.source.shape[1:]))

    @property
    def dtype(self) -> torch.dtype:
        return torch.uint8

    @property
    def nbytes(self) -> int:
        return len(self.rows) * int(np.prod(self.source.shape[1:]))

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return f"HostImages({tuple(self.shape)}, streamed to {self.device})"

    def resident(self) -> torch.Tensor:
        """Every row, as one host tensor (a copy)."""
        return torch.from_numpy(np.take(self.source, self.rows, axis=0))

    def to(self, device: torch.device | str) -> torch.Tensor | HostImages:
        """All on `device` when it fits the budget, else streamed to it batch by batch."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        budget = default_budget(device) if self.budget_gb is None else self.budget_gb * 1e9
        if self.nbytes <= budget:
            return self.resident().to(device)
        return HostImages(self.source, self.rows, self.budget_gb, device)

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, int):
            return self.gather(torch.arange(len(self))[index : index + 1 or None])[0]
        if isinstance(index, slice):
            return self.gather(torch.arange(len(self))[index])
        if isinstance(index, torch.Tensor):  # on CUDA a device index waits for the device
            return self.gather(index.cpu())
        raise TypeError(f"HostImages: index with a slice or an index tensor, not {index!r}")

    def gather(self, host_idx: torch.Tensor) -> torch.Tensor:
        """The rows `host_idx` (positions in this split, a CPU tensor) on the device."""
        rows = self.rows[host_idx.numpy()]
        if self.device.type != "cuda":
            return torch.from_numpy(np.take(self.source, rows, axis=0))
        return self._to_cuda(rows)

    def _to_cuda(self, rows: np.ndarray) -> torch.Tensor:
        n = len(rows)
        if not self._buffers or self._buffers[0].shape[0] < n:
            shape = (n, *self.source.shape[1:])
            self._buffers = [torch.empty(shape, dtype=torch.uint8).pin_memory() for _ in range(2)]
            self._events = [None, None]
        k = self._turn
        self._turn ^= 1
        if self._events[k] is not None:
            self._events[k].synchronize()  # the copy out of this buffer two batches ago
        buf = self._buffers[k][:n]
        np.take(self.source, rows, axis=0, out=buf.numpy())
        out = buf.to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._events[k] = event
        return out


def batch(x, idx: torch.Tensor, host_idx: torch.Tensor) -> torch.Tensor:
    """`x[idx]` for a batch; a streamed split (`HostImages`) gathers `host_idx` on the host."""
    return x.gather(host_idx) if isinstance(x, HostImages) else x[idx]
