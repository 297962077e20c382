"""Streaming a train split from the memory-mapped cache (harness.data.stream): the same training,
bit for bit on the CPU, as the split all in memory; small splits keep the resident path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_config
from PIL import Image

from harness.core import finetune, models, shared
from harness.data import datasets as hdata
from harness.data import sources
from harness.data.stream import HostImages, batch


def make_folder(root, counts, size=(14, 12), seed=0):
    rng = np.random.default_rng(seed)
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")


@pytest.fixture
def folder_config(tmp_path):
    sources.clear_cache()
    root = tmp_path / "pets"
    make_folder(root, {"a": 30, "b": 30, "c": 30})
    data = {
        "dataset": "imagefolder",
        "root": str(root),
        "source_classes": ["c"],
        "target_classes": ["a", "b"],
        "shots_per_class": 20,
        "val_per_class": 5,
        "image_size": 12,
        "eval_train_max": 16,  # the clean-train subset is indexed too
    }
    train = {"epochs": 2, "batch_size": 8, "threads": 1}
    yield lambda **extra: make_config(
        data={**data, **extra},
        model={"pretrained": "none", "width": 8},
        train=train,
        aug={"policy": "crop"},
    )
    sources.clear_cache()


def fit_on(config, task):
    shared.seed_everything(config.seed)
    model = models.model_for(config, task)
    return finetune.fit(config, model, task)


def test_streamed_training_equals_resident_training_bit_for_bit(folder_config, tmp_path):
    cache = tmp_path / "results" / "cache" / "data"
    resident_cfg = folder_config()
    streamed_cfg = folder_config(device_budget_gb=1e-6)  # 1 kB: the split cannot fit
    task = hdata.load_target(resident_cfg.data, 0, cache_dir=cache)
    assert isinstance(task.x_train, HostImages)  # nothing read yet
    assert isinstance(task.to("cpu").x_train, torch.Tensor)  # fits the default budget
    streamed = hdata.load_target(streamed_cfg.data, 0, cache_dir=cache)
    moved = streamed.to("cpu")
    assert isinstance(moved.x_train, HostImages) and moved.x_train.device.type == "cpu"
    assert torch.equal(moved.x_train.resident(), task.to("cpu").x_train)
    a = fit_on(resident_cfg, task)
    b = fit_on(streamed_cfg, streamed)
    assert a.history == b.history
    for k, v in a.best_state.items():
        assert torch.equal(v, b.best_state[k]), k


def test_host_images_index_like_a_tensor(tmp_path):
    source = np.random.default_rng(0).integers(0, 256, (10, 3, 4, 4), dtype=np.uint8)
    path = tmp_path / "x.npy"
    np.save(path, source)
    mapped = np.load(path, mmap_mode="r")
    rows = np.array([7, 2, 5, 0])
    x = HostImages(mapped, rows, budget_gb=1e-9).to("cpu")
    want = torch.from_numpy(source[rows])
    assert x.shape == want.shape and len(x) == 4 and x.nbytes == want.numel()
    assert torch.equal(x[1:3], want[1:3])
    assert torch.equal(x[torch.tensor([3, 0])], want[[3, 0]])
    assert torch.equal(x[2], want[2])
    idx = torch.tensor([2, 1])
    assert torch.equal(batch(x, idx, idx), want[idx])
    assert torch.equal(batch(want, idx, idx), want[idx])
    assert torch.equal(HostImages(mapped, rows).to("cpu"), want)  # fits: a plain tensor


def test_device_budget_is_validated():
    from pydantic import ValidationError

    from harness.config.spec import DataSpec

    assert DataSpec.model_validate({"device_budget_gb": 0.5}).device_budget_gb == 0.5
    assert DataSpec().device_budget_gb is None
    for bad in (0, -1, "lots"):
        with pytest.raises(ValidationError, match="device_budget_gb"):
            DataSpec.model_validate({"device_budget_gb": bad})


def test_stream_imports_neither_optuna_nor_mlflow():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import harness.data.stream, harness.data.datacache, harness.data.datasets\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('optuna', 'mlflow')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"
