"""What a re-run of a trial must match: bit for bit in the recorded environment, within
GPU_TOLERANCE on the recorded GPU, within the cross-machine tolerance elsewhere; the rows of the
comparison and the verdict they give."""

from __future__ import annotations

import math
from dataclasses import dataclass

from harness.config.metrics import KINDS, OPTIONAL_EPOCH
from harness.config.tags import Tag


def is_count_metric(metric: str) -> bool:
    """A fraction of examples (an accuracy, or a gap of two): it moves in steps of 1/n."""
    return "_acc" in metric or metric.endswith(("overfit_gap", "adaptation_gap"))


@dataclass(frozen=True)
class Tolerance:
    """Exact (every field 0: the same float, NaN equal to NaN), or math.isclose's test with
    `rel` and `abs`; accuracies (and gaps of accuracies) may also differ by `count_abs`."""

    rel: float = 0.0
    abs: float = 0.0
    count_abs: float = 0.0  # accuracies: one example of the smallest evaluated set, 1/n

    @property
    def exact(self) -> bool:
        return self.rel == 0.0 and self.abs == 0.0 and self.count_abs == 0.0

    def same(self, a: float | None, b: float | None, metric: str = "") -> bool:
        if a is None or b is None:
            return a is None and b is None
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        if self.exact:
            return a == b
        if self.count_abs and is_count_metric(metric) and abs(a - b) <= self.count_abs + 1e-12:
            return True
        return math.isclose(a, b, rel_tol=self.rel, abs_tol=self.abs)

    def describe(self) -> str:
        if self.exact:
            return "bit for bit"
        count = f", accuracies {self.count_abs:.4g}" if self.count_abs else ""
        return f"within tolerance (rel {self.rel:g}, abs {self.abs:g}{count})"


EXACT = Tolerance()


GPU_TOLERANCE = Tolerance(rel=1e-4, abs=1e-6)


# Another CPU model, kernel path or other library versions: kernels sum in another order and
# training amplifies the last-bit differences. Measured across kernel paths on one Intel Xeon
# (benchmarks/kernel_spread.py: ATEN_CPU_CAPABILITY default/avx2/avx512, MKL and oneDNN at
# AVX2, 1 and 2 threads): the quickstart's 10-epoch trial at most 1.2e-5 relative on a loss,
# 3e-7 absolute; a trial where one step amplifies ~1000x (lr 0.05 from scratch, the loss
# falling fast: tests/test_strategies.py's chaotic golden) 2.9e-3 relative by epoch 3, and 2
# examples of 100 on an accuracy. The tolerance is 10x the largest: rel 3e-2, abs 1e-3 (a
# loss gap near 0 moved by up to 9e-5); an accuracy passes within one example of the smallest
# evaluated set or within rel.
CROSS_MACHINE_REL, CROSS_MACHINE_ABS = 3e-2, 1e-3


def cross_machine_tolerance(smallest_set: int, gpu: bool = False) -> Tolerance:
    """The tolerance of a re-run on another machine: accuracies within one example of the
    smallest set evaluated each epoch (a gap: one on each side)."""
    rel = max(CROSS_MACHINE_REL, GPU_TOLERANCE.rel if gpu else 0.0)
    return Tolerance(rel=rel, abs=CROSS_MACHINE_ABS, count_abs=2.0 / max(smallest_set, 1))


@dataclass(frozen=True)
class Row:
    epoch: int
    metric: str
    recorded: float | None
    reproduced: float | None
    same: bool


ENVIRONMENT = (Tag.CPU, Tag.THREADS, Tag.VERSION + "torch", Tag.DEVICE)


KERNELS = Tag.CPU_KERNELS  # logged since 2026-12-07; a record without it: not compared


def environment(tags: dict[str, str]) -> str:
    """Where a run ran, as a verdict names it: 'AMD EPYC, 2 threads, torch 2.14.1, cpu'
    (with its kernel path in brackets where the record has it: '... [AVX512]')."""
    cpu, threads = tags.get(Tag.CPU, "unknown CPU"), tags.get(Tag.THREADS, "?")
    torch_version, device = tags.get(Tag.VERSION + "torch", "?"), tags.get(Tag.DEVICE)
    kernels = f" [{tags[KERNELS]}]" if tags.get(KERNELS) else ""
    return f"{cpu}{kernels}, {threads} threads, torch {torch_version}, {device or 'cpu'}"


def same_environment(recorded: dict[str, str], now: dict[str, str]) -> bool:
    """Same CPU model, kernel path, thread count, torch version and device: bit for bit is
    the promise."""
    same_kernels = KERNELS not in recorded or recorded[KERNELS] == now.get(KERNELS)
    return same_kernels and all(recorded.get(k) == now.get(k) for k in ENVIRONMENT)


@dataclass(frozen=True)
class Outcome:
    run_id: str  # the reproduced trial run
    new_run_id: str  # the reproduction's run
    trial: str
    epochs: int  # compared epochs: 1..epochs
    pruned_epoch: int | None
    tolerance: Tolerance  # what applies: EXACT in the recorded environment
    rows: tuple[Row, ...]
    recorded_on: str = ""  # environment(...) of the record and of the re-run
    rerun_on: str = ""

    @property
    def first_difference(self) -> Row | None:
        return next((r for r in self.rows if not r.same), None)

    @property
    def bit_for_bit(self) -> bool:
        return all(EXACT.same(r.recorded, r.reproduced) for r in self.rows)

    @property
    def result(self) -> str:
        """The tag harness.reproduce_result: match, within_tolerance or differs."""
        if self.bit_for_bit:
            return "match"
        return "within_tolerance" if self.first_difference is None else "differs"

    @property
    def matched(self) -> bool:
        return self.result != "differs"

    @property
    def exit_code(self) -> int:
        return 0 if self.matched else 1

    def largest_relative_difference(self) -> tuple[float, Row | None]:
        worst, where = 0.0, None
        for r in self.rows:
            if r.recorded is None or r.reproduced is None or r.recorded == r.reproduced:
                continue
            if math.isnan(r.recorded) or math.isnan(r.reproduced):
                continue
            d = abs(r.recorded - r.reproduced) / max(abs(r.recorded), abs(r.reproduced))
            if d > worst:
                worst, where = d, r
        return worst, where

    def verdict(self) -> str:
        result = self.result
        if result == "match":
            return f"reproduced: all {self.epochs} epochs match bit for bit"
        if result == "within_tolerance":
            worst, row = self.largest_relative_difference()
            at = f" ({row.metric}, epoch {row.epoch})" if row else ""
            return (
                f"reproduced {self.tolerance.describe()}: recorded on {self.recorded_on}, "
                f"re-run on {self.rerun_on}; largest relative difference {worst:.3g}{at}"
            )
        d = self.first_difference
        return (
            f"differs: first at epoch {d.epoch}, metric {d.metric}: "
            f"recorded {_num(d.recorded)}, reproduced {_num(d.reproduced)}"
        )

    def table(self) -> str:
        width = max(len(r.metric) for r in self.rows) if self.rows else 6
        lines = [f"{'epoch':>5}  {'metric':<{width}}  {'recorded':<24}  reproduced"]
        for r in self.rows:
            mark = "" if r.same else "  <- differs"
            lines.append(
                f"{r.epoch:>5}  {r.metric:<{width}}  {_num(r.recorded):<24}  "
                f"{_num(r.reproduced):<24}{mark}".rstrip()
            )
        return "\n".join(lines)

    def render(self) -> str:
        scope = f" (pruned at epoch {self.pruned_epoch})" if self.pruned_epoch else ""
        head = (
            f"Trial {self.trial} (run {self.run_id}){scope} against its reproduction "
            f"(run {self.new_run_id}), {self.tolerance.describe()}:"
        )
        return f"{head}\n{self.table()}\n{self.verdict()}"


def _num(value: float | None) -> str:
    return "missing" if value is None else repr(value)


def compare(
    recorded: dict[str, dict[int, float]],
    reproduced: list[dict[str, float]],
    epochs: int,
    tolerance: Tolerance,
    keys: tuple[str, ...] = KINDS["finetune"].epoch,
) -> list[Row]:
    """Rows of (epoch, metric) for epochs 1..`epochs`; a value only one side has differs."""
    extra = [k for k in OPTIONAL_EPOCH if k in recorded or any(k in m for m in reproduced)]
    rows = []
    for epoch in range(1, epochs + 1):
        mine = reproduced[epoch - 1] if epoch <= len(reproduced) else {}
        for key in (*keys, *extra):
            a, b = recorded.get(key, {}).get(epoch), mine.get(key)
            rows.append(Row(epoch, key, a, b, tolerance.same(a, b, key)))
    return rows
