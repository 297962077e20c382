"""Where a result came from: the code (git commit, dirty or not), the library versions, the
device, the CPU model, its kernel path and thread count; logged as tags with every run."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import mlflow

from harness.config.tags import Tag

_REPO = Path(__file__).resolve().parents[2]  # the repository whose commit is logged


@functools.cache
def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=_REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@functools.cache
def cpu_model() -> str:
    """The CPU's model name ('AMD EPYC 7B13', 'Intel(R) Xeon(R) ...'): bit-for-bit results
    hold within one model. The architecture alone when the OS does not say."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model Name", "Hardware")) and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


KERNEL_SETTINGS = ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR")


def cpu_kernels() -> str:
    """The CPU code paths torch computes on ('AVX512'; 'DEFAULT, ONEDNN_MAX_CPU_ISA=AVX2'):
    torch's vectorised kernels (`ATEN_CPU_CAPABILITY` caps them) and any setting that makes
    MKL or oneDNN take another path. One CPU model gives other last bits on another path."""
    import torch

    kernels = [torch.backends.cpu.get_cpu_capability()]
    kernels += [f"{k}={os.environ[k]}" for k in KERNEL_SETTINGS if os.environ.get(k)]
    return ", ".join(kernels)


def provenance_tags(device: str, threads: int) -> dict[str, str]:
    """Where a result came from: code, libraries, device, CPU threads (CPU results depend on it)."""
    import torch
    import torchvision

    dirty = _git("status", "--porcelain", "--untracked-files=no")
    tags = {
        Tag.GIT_COMMIT: _git("rev-parse", "HEAD"),
        Tag.GIT_DIRTY: str(dirty not in ("", "unknown")).lower(),
        Tag.VERSION + "python": platform.python_version(),
        Tag.VERSION + "torch": torch.__version__,
        Tag.VERSION + "torchvision": torchvision.__version__,
        Tag.VERSION + "optuna": importlib.metadata.version("optuna"),  # the study's layer's
        Tag.VERSION + "mlflow": mlflow.__version__,
        Tag.DEVICE: device,
        Tag.THREADS: str(threads),
        Tag.CPU: cpu_model(),
        Tag.CPU_KERNELS: cpu_kernels(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        tags[Tag.DEVICE] = f"{device} ({torch.cuda.get_device_name()})"
    return tags
