"""MLflow's system metrics (CPU, memory, disk, network; GPU where present) for a trial's run."""

from __future__ import annotations

import contextlib
import threading


class _DeferredMonitor:
    """MLflow's system-metrics monitor, started only once the run has lasted `interval`
    seconds: a shorter run would log no sample anyway (the monitor logs its first one after an
    interval), and building and stopping it (its thread, a GPU probe, a read of the run at
    its end) cost a short trial tens of milliseconds."""

    def __init__(self, run_id: str, interval: float, tracking_uri: str):
        self.args = (run_id, interval, tracking_uri)
        self.lock, self.monitor, self.done = threading.Lock(), None, False
        self.timer = threading.Timer(interval, self._start)
        self.timer.daemon = True
        self.timer.start()

    def _start(self) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        run_id, interval, uri = self.args
        with self.lock:
            if self.done:
                return
            self.monitor = SystemMetricsMonitor(
                run_id, sampling_interval=interval, samples_before_logging=1, tracking_uri=uri
            )
            self.monitor.start()

    def finish(self) -> None:
        self.timer.cancel()
        with self.lock:
            self.done = True
            monitor, self.monitor = self.monitor, None
        if monitor is None:
            return
        monitor.finish()
        # A run that ends inside the monitor's first cycle (on a busy machine its thread may not
        # get that far) has no sample yet: the one taken now, so it still has its figures.
        if getattr(monitor, "_logging_step", 1) == 0:
            with contextlib.suppress(Exception):
                monitor.collect_metrics()
                monitor.publish_metrics(monitor.aggregate_metrics())
                monitor.mlflow_logger.flush()


def system_monitor(run_id: str, interval: float, tracking_uri: str) -> _DeferredMonitor:
    """MLflow's own system metrics (CPU, memory, disk, network; GPU where present) for a run,
    sampled every `interval` seconds from `interval` seconds after the start (a run shorter than
    two intervals has none). Call `.finish()` when the run ends."""
    return _DeferredMonitor(run_id, interval, tracking_uri)
