#!/usr/bin/env bash
# The GPU checks, in one go (about 5-8 minutes on one H100), for a machine with no network:
#   1. the CUDA-only tests (and the cache/stream tests) on the GPU;
#   2. bench.py's GPU configurations (resnet50 at 224 px, batch 32 and 256);
#   3. streaming on CUDA: an image folder's train split streamed from the memory-mapped cache
#      against the same split all on the device (resnet18, 224 px): equal histories (under
#      deterministic algorithms) and the throughput ratio;
#   4. a two-trial study of experiments/cifar10_resnet50.yaml on generated CIFAR-10-format data
#      (the files are not the official ones: only torchvision's md5 check is bypassed, as the
#      tests do), then `reproduce` of its first complete trial;
#   5. with 2 GPUs or more: a trial on 2 data-parallel ranks (nccl) against 1, `ratio k2/k1`
#      for resnet50 at 224 px (benchmarks/dp_bench.py; the goal is >= 1.8); skipped on one GPU.
# Prints one line per figure (`gpu_check NAME VALUE`) and ends with `gpu_check done`.
#
#   bash benchmarks/gpu_check.sh            # from the repository root
#   PY=.venv/bin/python STEPS="tests bench" bash benchmarks/gpu_check.sh   # some steps only
#   ALLOW_CPU=1 DEVICE=cpu STREAM_ARCH=small_cnn STREAM_N=240 STREAM_SIZE=32 STEPS="stream study" \
#       STUDY_SETS="model.arch=small_cnn train.device=cpu" bash benchmarks/gpu_check.sh  # dry run
#
# ImageNet weights: read from $TORCH_HOME/hub/checkpoints/resnet50-0676ba61.pth when there;
# else the study uses model.pretrained=none (said in its line).
set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python
STEPS=${STEPS:-"tests bench stream study dp"}
WORK=$(mktemp -d /tmp/gpu-check-XXXXXX)
trap 'rm -rf "$WORK"' EXIT
status=0
figure() { echo "gpu_check $*"; }
has() { [[ " $STEPS " == *" $1 "* ]]; }
step_start() { T0=$SECONDS; }
step_seconds() { echo $((SECONDS - T0)); }

DEVICE=${DEVICE:-cuda}
export DEVICE STREAM_ARCH=${STREAM_ARCH:-resnet18} STREAM_N=${STREAM_N:-1200} STREAM_SIZE=${STREAM_SIZE:-224}
if [ -z "${ALLOW_CPU:-}" ]; then
    "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('gpu_check device', torch.cuda.get_device_name(0), 'torch', torch.__version__)" || exit 1
fi

# --- 1. tests that need CUDA, and the cache/stream tests, on this machine ---
if has tests; then
    step_start
    files=$(grep -l "cuda.is_available" tests/test_*.py | tr '\n' ' ')
    if timeout 240 "$PY" -m pytest -q -x -m "not slow" $files tests/test_stream.py tests/test_datacache.py \
        >"$WORK/tests.log" 2>&1; then
        figure tests_passed "$(grep -Eo '[0-9]+ passed' "$WORK/tests.log" | tail -1)"
    else
        figure tests_FAILED "$(tail -1 "$WORK/tests.log")"; tail -30 "$WORK/tests.log"; status=1
    fi
    figure tests_seconds "$(step_seconds)"
fi

# --- 2. the core's speed: resnet50 at 224 px ---
if has bench; then
    step_start
    if timeout 300 "$PY" benchmarks/bench.py --device cuda --epochs 3 --steps 20 >"$WORK/bench.log" 2>&1; then
        grep -E "^(ratio|device)" "$WORK/bench.log" | sed 's/^/gpu_check bench /'
        grep -E "img/s|resnet50" "$WORK/bench.log" | sed 's/^/gpu_check bench_table /'
    else
        figure bench_FAILED "$(tail -1 "$WORK/bench.log")"; tail -30 "$WORK/bench.log"; status=1
    fi
    figure bench_seconds "$(step_seconds)"
fi

# --- 3. streaming from the cache on CUDA vs all on the device ---
if has stream; then
    step_start
    timeout 180 "$PY" - "$WORK" <<'EOF' || { figure stream_FAILED "see above"; status=1; }
import os, sys, time
from pathlib import Path
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
import numpy as np, torch
from PIL import Image
sys.path.insert(0, os.getcwd())
from harness import data as hdata, finetune, models
from harness.config.spec import DataSpec, TrialConfig
from harness.data.stream import HostImages

torch.use_deterministic_algorithms(True, warn_only=True)  # as reproduce does
work = Path(sys.argv[1])
root, cache = work / "photos", work / "results" / "cache" / "data"
rng = np.random.default_rng(0)
device, arch = os.environ["DEVICE"], os.environ["STREAM_ARCH"]
n, size = int(os.environ["STREAM_N"]), int(os.environ["STREAM_SIZE"])
sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
for i in range(n):  # 4 classes, 256x192
    d = root / f"c{i % 4}"
    d.mkdir(parents=True, exist_ok=True)
    low = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    low.resize((256, 192), Image.Resampling.BICUBIC).save(d / f"{i:05d}.jpg", quality=90)
t = time.perf_counter()
hdata.load_target(DataSpec.model_validate({"dataset": "imagefolder", "root": str(root), "source_classes": [], "target_classes": ["c0", "c1", "c2", "c3"], "shots_per_class": None, "val_per_class": 20, "test_per_class": 20, "image_size": size}), 0, cache_dir=cache)
print(f"gpu_check stream_first_decode_s {time.perf_counter() - t:.2f}")

class Marks:
    def __init__(self): self.t = [time.perf_counter()]
    def on_epoch_end(self, epoch, metrics): sync(); self.t.append(time.perf_counter())

out = {}
for name, budget in (("resident", None), ("stream", 1e-6)):
    config = TrialConfig.model_validate({
        "name": "s", "seed": 0,
        "data": {"dataset": "imagefolder", "root": str(root), "source_classes": [], "target_classes": ["c0", "c1", "c2", "c3"], "shots_per_class": None, "val_per_class": 20, "test_per_class": 20, "image_size": size, "device_budget_gb": budget},
        "model": {"arch": arch, "pretrained": "none"},
        "train": {"epochs": 3, "batch_size": 64, "device": device, "lr": 0.01},
    })
    task = hdata.load_target(config.data, 0, cache_dir=cache)
    on_device = task.to(device).x_train
    finetune.seed_everything(0)
    model = models.model_for(config, task)
    marks = Marks()
    result = finetune.fit(config, model, task, [marks])
    seconds = float(np.median(np.diff(marks.t)[1:]))
    out[name] = (len(task.x_train) / seconds, result.history, isinstance(on_device, HostImages))
    print(f"gpu_check stream_{name}_img_per_s {out[name][0]:.1f} (streamed: {out[name][2]})")
print(f"gpu_check ratio stream/resident {out['stream'][0] / out['resident'][0]:.3f}")
same = out["stream"][1] == out["resident"][1]
print(f"gpu_check stream_equals_resident {same}")
if not (out["stream"][2] and not out["resident"][2]):
    sys.exit("the stream run did not stream, or the resident run did")
EOF
    figure stream_seconds "$(step_seconds)"
fi

# --- 4. a two-trial study of the founding case study, then reproduce one trial ---
if has study; then
    step_start
    DATA="$WORK/data" RESULTS="$WORK/results-study"
    "$PY" - "$DATA" <<'EOF'
import pickle, sys
from pathlib import Path
import numpy as np
folder = Path(sys.argv[1]) / "cifar-10-batches-py"
folder.mkdir(parents=True)
rng = np.random.default_rng(0)
def batch(n, label):
    y = np.repeat(np.arange(10), n // 10)
    rng.shuffle(y)
    x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    return {"batch_label": label, "labels": y.tolist(), "data": x, "filenames": [f"{i}.png" for i in range(n)]}
for b in range(1, 6):
    pickle.dump(batch(600, f"training batch {b} of 5"), open(folder / f"data_batch_{b}", "wb"))
pickle.dump(batch(1000, "testing batch 1 of 1"), open(folder / "test_batch", "wb"))
names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
pickle.dump({"label_names": names, "num_cases_per_batch": 600, "num_vis": 3072}, open(folder / "batches.meta", "wb"))
EOF
    WEIGHTS="${TORCH_HOME:-$HOME/.cache/torch}/hub/checkpoints/resnet50-0676ba61.pth"
    PRETRAINED=()
    if [ -f "$WEIGHTS" ]; then figure study_weights imagenet
    else figure study_weights "none (no $WEIGHTS offline)"; PRETRAINED=(--set model.pretrained=none); fi
    # harness.cli with only torchvision's md5 check of the CIFAR files bypassed
    cat >"$WORK/cli.py" <<'EOF'
import sys
import torchvision.datasets.cifar as cifar
cifar.CIFAR10._check_integrity = lambda self: True
cifar.check_integrity = lambda *a, **k: True
sys.path.insert(0, ".")
from harness.cli import main
sys.exit(main())
EOF
    if timeout 300 "$PY" "$WORK/cli.py" experiments/cifar10_resnet50.yaml --results "$RESULTS" \
        --n-trials 2 --quiet --set "data.root=$DATA" --set data.val_per_class=50 \
        --set train.epochs=4 "${PRETRAINED[@]}" $(for s in ${STUDY_SETS:-}; do echo --set "$s"; done) \
        >"$WORK/study.log" 2>&1; then
        figure study_trials_seconds "$(step_seconds)"
        grep -iE "gain|best" "$WORK/study.log" | head -5 | sed 's/^/gpu_check study_out /'
        RUN=$("$PY" - "$RESULTS" <<'EOF'
import sys
import mlflow
from pathlib import Path
mlflow.set_tracking_uri(f"sqlite:///{(Path(sys.argv[1]) / 'mlflow.db').resolve()}")
runs = mlflow.search_runs(experiment_names=["cifar10-resnet50"], filter_string="tags.`optuna.state` = 'COMPLETE'", order_by=["start_time ASC"])
print(runs["run_id"].iloc[0] if len(runs) else "")
EOF
)
        if [ -n "$RUN" ]; then
            step_start
            timeout 240 "$PY" "$WORK/cli.py" reproduce "$RUN" --results "$RESULTS" >"$WORK/repro.log" 2>&1
            rc=$?
            figure reproduce_exit "$rc ($(grep -E '^(reproduced|differs)' "$WORK/repro.log" | head -1))"
            [ "$rc" -eq 0 ] || { tail -20 "$WORK/repro.log"; status=1; }
            figure reproduce_seconds "$(step_seconds)"
        else
            figure reproduce_SKIPPED "no COMPLETE trial"; status=1
        fi
    else
        figure study_FAILED "$(tail -1 "$WORK/study.log")"; tail -30 "$WORK/study.log"; status=1
    fi
fi
# --- 5. one trial on two GPUs (train.devices_per_trial: 2, nccl) ---
if has dp; then
    gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
    if [ "${gpus:-0}" -ge 2 ]; then
        step_start
        if timeout 600 "$PY" benchmarks/dp_bench.py --device cuda --epochs 4 >"$WORK/dp.log" 2>&1; then
            grep -E "^(ratio|device| *[12] )" "$WORK/dp.log" | sed 's/^/gpu_check dp /'
        else
            figure dp_FAILED "$(tail -1 "$WORK/dp.log")"; tail -30 "$WORK/dp.log"; status=1
        fi
        figure dp_seconds "$(step_seconds)"
    else
        figure dp_SKIPPED "$gpus GPU(s): a 2-rank trial needs 2"
    fi
fi
figure done "status $status"
exit $status
