"""What a resume state in the shared store costs: its size, the time its upload to a tracking
server's artifact store takes each epoch, and what the training thread pays for it.

    python benchmarks/state_bench.py            # quickstart: size and upload time per epoch;
                                                # ResNet-50 (CPU): the size of its state

- **quickstart**: the quickstart's baseline trial (its small CNN, `model.pretrained=none`: the
  same tensors as from the source model), trained on the CPU with a callback that, each
  epoch, writes the harness's resume state and uploads it to an `mlflow server` started here
  (SQLite, its artifact store in a temporary folder) exactly as a trial on shared stores does
  (`harness.tracking.states.upload_state`: the file, its record, the superseded state deleted),
  in the training thread, timed; then the same trial with the background upload
  (`states.Uploads`, what trials use), timing what the training thread pays per epoch.
- **resnet50**: `experiments/cifar10_resnet50.yaml`'s baseline recipe (torchvision ResNet-50,
  no weights, SGD with momentum: the state holds the weights, the momentum buffers and the
  best epoch's weights) trained one short epoch on digits at 32 px on the CPU, and its
  state's size;
  also with L2-SP on (its anchors, one more copy of the backbone), the largest state its
  search space can make.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from harness.config.load import load_spec  # noqa: E402
from harness.config.spec import baseline_config  # noqa: E402
from harness.core import checkpoints, resume_state, tasks  # noqa: E402
from harness.tracking import states  # noqa: E402
from harness.tracking import store as tracking  # noqa: E402


def _server(folder: Path) -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
         f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination", str(folder / "art"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.read().strip() == b"OK":
                    return proc, uri
        except OSError:
            time.sleep(0.5)
    raise SystemExit("mlflow server did not start")


class _States:
    """A core callback: each epoch's resume state written, staged and uploaded (in this thread,
    timed; or handed to `uploads`, the background upload, timing what this thread pays)."""

    def __init__(self, folder: Path, client=None, run_id=None, uploads=None):
        self.file = folder / checkpoints.shared_state_names(0)[0]
        self.client, self.run_id, self.uploads = client, run_id, uploads
        self.rows: list[dict] = []
        self.mark = time.perf_counter()

    def on_epoch_end(self, epoch, metrics):
        pass

    def on_checkpoint(self, epoch, state):
        now = time.perf_counter()
        row = {"epoch": epoch, "epoch_s": now - self.mark}
        resume_state.save_state(state, self.file)
        row["bytes"] = self.file.stat().st_size
        started = time.perf_counter()
        if self.client is not None or self.uploads is not None:
            staged = checkpoints.stage(self.file, checkpoints.upload_staging(self.file, epoch))
            if self.uploads is not None:
                self.uploads.offer(epoch, staged)
            else:
                states.upload_state(self.client, self.run_id, staged, epoch)
                staged.unlink()
        row["upload_s"] = time.perf_counter() - started
        self.rows.append(row)
        self.mark = time.perf_counter()


def _train(config, callback) -> None:
    data = tasks.load_data(config, None)
    model = tasks.build(config, data, None)
    tasks.train(config, model, data, [callback])


def quickstart(folder: Path) -> None:
    spec = load_spec(REPO / "experiments" / "quickstart.yaml", ["model.pretrained=none"])
    config = baseline_config(spec)
    server, uri = _server(folder)
    try:
        client = tracking.connect(uri)
        exp = tracking.experiment_id(client, "state-bench", folder, uri)
        run_id = client.create_run(exp).info.run_id
        timed = _States(folder / "sync", client, run_id)
        _train(config, timed)
        uploads = states.Uploads(client, client.create_run(exp).info.run_id)
        background = _States(folder / "background", uploads=uploads)
        _train(config, background)
        stats = uploads.finish(upload=True)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    rows = timed.rows
    size = statistics.median(r["bytes"] for r in rows)
    up = statistics.median(r["upload_s"] for r in rows)
    epoch = statistics.median(r["epoch_s"] for r in rows)
    paid = statistics.median(r["upload_s"] for r in background.rows)
    epoch_bg = statistics.median(r["epoch_s"] for r in background.rows)
    print(f"quickstart: {len(rows)} epochs; state {size / 2**10:.1f} KB per epoch")
    most = max(r["upload_s"] for r in rows)
    print(
        f"quickstart: upload (file, record, superseded deleted) median {1000 * up:.1f} ms per "
        f"epoch, max {1000 * most:.1f} ms; epoch {1000 * epoch:.0f} ms"
    )
    print(
        f"quickstart: background upload: the training thread pays {1000 * paid:.2f} ms per "
        f"epoch; {stats.get('state_uploads', 0):.0f} of {len(background.rows)} states uploaded "
        "(a state offered while one uploads replaces the one waiting), "
        f"{stats.get('state_upload_seconds', 0) * 1000:.1f} ms each; "
        f"epoch {1000 * epoch_bg:.0f} ms "
        "(the uploads share the CPU with training: here the server runs on the same machine)"
    )


def resnet50(folder: Path) -> None:
    import yaml

    from harness.config.spec import TrialConfig

    tree = yaml.safe_load((REPO / "experiments" / "cifar10_resnet50.yaml").read_text())
    tree = {k: v for k, v in tree.items() if k not in ("search", "objective")}  # its recipe
    tree["model"] = {"arch": "resnet50", "pretrained": "none"}  # no weights: the same tensors
    tree["data"] = {
        "dataset": "digits",
        "source_classes": [],
        "target_classes": list(range(10)),
        "shots_per_class": 4,
        "val_per_class": 2,
        "image_size": 32,
    }
    tree["train"] |= {"epochs": 1, "device": "cpu"}
    for reg, what in (({}, "baseline recipe"), ({"l2_sp": 0.001}, "with L2-SP anchors")):
        config = TrialConfig.model_validate({**tree, "reg": reg})
        states_ = _States(folder / f"resnet50-{len(reg)}")
        _train(config, states_)
        size = states_.rows[-1]["bytes"]
        print(f"resnet50 ({what}): state {size / 2**20:.1f} MB")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="state-bench-") as tmp:
        quickstart(Path(tmp))
        resnet50(Path(tmp))
