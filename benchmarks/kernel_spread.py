"""How far apart the values of every cross-way comparison in the suite are, across CPU kernel
paths: the measurement behind each tolerance (tests/recorded.py, tests/test_distributed.py,
harness/reproduce.py's cross-machine tolerance).

    .venv/bin/python benchmarks/kernel_spread.py [--out spread.jsonl] [PYTEST ARGS...]

runs the tests marked `numerics` once per kernel path below, with `HARNESS_SPREAD_LOG` set:
each comparison appends how far its two values are (tests/recorded.py's `note_spread`), failing
or not. Then prints, per comparison, the largest relative and absolute difference on each path
and overall, and the factor between the tolerance in force and that largest spread.

A path is a set of environment variables that make torch, MKL and oneDNN choose other code:
`ATEN_CPU_CAPABILITY` (torch's own vectorised kernels), `MKL_ENABLE_INSTRUCTIONS` (MKL's GEMM),
`ONEDNN_MAX_CPU_ISA` (oneDNN's convolutions), and 1 or 2 threads (`HARNESS_NUMERICS_THREADS`:
another split of every reduction). An AVX2-only CPU (e.g. an AMD EPYC of the Zen 2/3 kind) is
closest to the `avx2-cpu` path.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

PATHS: dict[str, dict[str, str]] = {
    "native-t1": {},
    "native-t2": {"HARNESS_NUMERICS_THREADS": "2"},
    "aten-default": {"ATEN_CPU_CAPABILITY": "default"},
    "aten-avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "onednn-avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    "onednn-sse41": {"ONEDNN_MAX_CPU_ISA": "SSE41"},
    "mkl-avx2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "avx2-cpu": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
    },
    "avx2-cpu-t2": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "HARNESS_NUMERICS_THREADS": "2",
    },
}


def _tolerances() -> dict[str, float]:
    """The relative tolerance in force for each comparison family."""
    sys.path[:0] = [str(REPO / "tests"), str(REPO)]
    import recorded
    import test_distributed

    from harness.reports import tolerance

    return {
        "chaotic": recorded.REL_CHAOTIC,
        "golden": recorded.REL,
        "k2_vs_k1": test_distributed.REL_TOL,
        "reproduce": tolerance.CROSS_MACHINE_REL,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="keep the raw rows (JSON lines) here")
    ap.add_argument("--paths", default=",".join(PATHS), help="comma-separated paths to run")
    args, pytest_args = ap.parse_known_args(argv)
    out = args.out or Path(tempfile.mkdtemp()) / "spread.jsonl"
    out.unlink(missing_ok=True)
    for name in args.paths.split(","):
        env = {**os.environ, **PATHS[name], "HARNESS_SPREAD_LOG": str(out)}
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-m", "numerics", "-p", "no:cacheprovider"]
            + (pytest_args or ["tests"]),
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
        )
        last = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
        print(f"{name:14s} {time.monotonic() - started:6.0f} s  {last}", flush=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    acc = {"train_acc", "val_acc", "overfit_gap", "meta_train_acc", "meta_val_acc"}
    acc |= {"train_acc_running", "parity_val_acc", "adaptation_gap", "gt4_val_acc"}
    worst: dict[str, dict] = defaultdict(lambda: {"rel": 0.0, "abs": 0.0, "path": "", "key": ""})
    per_path: dict[tuple[str, str], float] = defaultdict(float)
    for r in rows:
        if r["key"] in acc:
            continue  # counts of examples: compared within one example, not a float tolerance
        w = worst[r["comparison"]]
        w["abs"] = max(w["abs"], r["abs"])
        if r.get("scale", 1.0) < 0.01:
            continue  # near 0 (a loss gap): the absolute floor applies, not a relative bound
        if r["rel"] > w["rel"]:
            w.update(rel=r["rel"], path=r["path"], key=r["key"])
        where = (r["comparison"], r["path"])
        per_path[where] = max(per_path[where], r["rel"])
    tol = _tolerances()
    print(f"\n{'comparison':36s} {'largest rel':>11s} {'largest abs':>11s}  tol   x  (where)")
    for comp in sorted(worst):
        w = worst[comp]
        family = "chaotic" if comp.endswith(":chaotic") else comp.split(":")[0].split("[")[0]
        t = tol.get(family, float("nan"))
        factor = t / w["rel"] if w["rel"] else float("inf")
        print(
            f"{comp:36s} {w['rel']:11.2e} {w['abs']:11.2e}  {t:.0e} {factor:5.0f}  "
            f"({w['key']}, {w['path']})"
        )
    print("\nper path (largest rel over every comparison of a family):")
    families = sorted({c.split("[")[0].split(":")[0] for c, _ in per_path})
    paths = sorted({p for _, p in per_path})
    for fam in families:
        cells = [
            max((v for (c, p), v in per_path.items() if p == path and c.startswith(fam)), default=0)
            for path in paths
        ]
        row = "  ".join(f"{p}={v:.1e}" for p, v in zip(paths, cells, strict=True))
        print(f"  {fam:10s} {row}")
    print(f"\nraw rows: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
