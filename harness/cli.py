"""The commands people type. `check` and `--help` import no torch, Optuna or MLflow.

    python run_study.py experiments/NAME.yaml [--n-trials N] [--timeout S] [--set key=value ...]
    python run_study.py check experiments/NAME.yaml [--set key=value ...]
    python run_study.py ui [--host 127.0.0.1] [--port 5000]
    python run_study.py report STUDY [--seeds N] [--ablate] [--soup]
    python run_study.py report STUDY --compare OTHER [OTHER ...]
    python run_study.py reproduce RUN_ID

Every command takes --results DIR, --storage URL, --tracking-uri URI and --retry-window S.
Exit codes: 0 done, 2 bad input, 75 stopped by the environment (a store unreachable past the
retry window, a full disk: run the same command again), 130 interrupted, 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import traceback
from pathlib import Path

from harness.config.load import load_spec
from harness.config.spec import META_TRAIN_KEYS, SECTIONS, SpecError, describe_space

COMMANDS = ("check", "ui", "report", "reproduce")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--results",
        type=Path,
        default=Path("results"),
        help="folder of every default store (default: results/)",
    )
    p.add_argument(
        "--storage",
        help="Optuna storage: a *.journal file or an RDB URL (default: RESULTS/optuna.journal)",
    )
    p.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: sqlite:///RESULTS/mlflow.db)"
    )
    p.add_argument(
        "--retry-window",
        type=float,
        default=300.0,
        metavar="S",
        help="how long an unreachable store (Optuna storage, MLflow) is retried before the "
        "process stops with exit 75, its running trial re-queued (default: 300 s)",
    )


def _spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment", help="experiment file (YAML), e.g. experiments/quickstart.yaml")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field of the file (repeatable); pins a searched key",
    )


def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run_study.py",
        description="Run (or resume, or extend) the Optuna study an experiment file describes.",
        epilog="Other commands: run_study.py check FILE | ui | report STUDY | reproduce RUN_ID. "
        "See README.md.",
    )
    _spec_args(p)
    p.add_argument(
        "--n-trials",
        type=int,
        help="the study's total budget of finished trials "
        "(default: search.n_trials); a larger value extends a finished study",
    )
    p.add_argument("--timeout", type=float, help="stop starting new trials after this many seconds")
    p.add_argument(
        "--warm-start",
        metavar="STUDY[,STUDY...]",
        help="start the sampler from the complete trials of earlier studies: STUDY (this "
        "storage), STUDY@RESULTS_DIR or STUDY@STORAGE_URL; the same as search.warm_start. "
        "Applied when the study is created; its budget and report count only its own trials",
    )
    p.add_argument("--study-name", help="Optuna study name (default: the file's name)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-trial lines")
    p.add_argument(
        "--workers",
        help="N or auto: N worker processes of the study on this "
        "machine (auto: one per visible GPU, else 1), one GPU each",
    )
    p.add_argument(
        "--devices-per-trial",
        type=int,
        metavar="K",
        help="each trial trains data-parallel on K devices (GPUs of the node, or CPU processes): "
        "the same as --set train.devices_per_trial=K",
    )
    p.add_argument(
        "--heartbeat-grace",
        type=float,
        metavar="S",
        help="on an RDB storage, a trial whose process sent no heartbeat for S seconds (a dead "
        "node) is failed and retried, from its resume state in the shared store (default: 120)",
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    _common(p)
    return p


def _check_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run_study.py check",
        description="Validate an experiment file; print the resolved spec "
        "and search space. Reads no data or weights; creates nothing.",
    )
    _spec_args(p)
    _common(p)
    return p


def _ui_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run_study.py ui", description="Start the MLflow UI on the study stores."
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=5000)
    _common(p)
    return p


def _report_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run_study.py report",
        description="Test the best trial and the baseline once, register the best model, and "
        "write plots and report.md under RESULTS/reports/STUDY/ (also logged to the study's "
        "parent run). A study writes its report when it ends; this writes it again.",
    )
    p.add_argument("study", help="the study's name (the experiment's name unless --study-name)")
    p.add_argument(
        "--seeds",
        type=int,
        default=0,
        help="re-run the top 3 configs and the "
        "baseline over N training seeds (same data split) and report mean ± std; with "
        "--ablate, the ablation's seeds instead (default 3)",
    )
    p.add_argument(
        "--ablate",
        action="store_true",
        help="ablate the best trial against the baseline: each searched choice it changed, "
        "left out of the best and added alone to the baseline, over --seeds seeds; effects "
        "with 95%% intervals, a table and ablation.png in the report",
    )
    p.add_argument(
        "--soup",
        action="store_true",
        help="make the study's model soups now (uniform and greedy weight averages of its "
        "complete trials, chosen on val, tested once; search.soup's kind, else greedy, is "
        "registered with alias soup); a second call reuses the first result",
    )
    p.add_argument(
        "--compare",
        nargs="+",
        metavar="OTHER",
        help="compare STUDY with other studies (each OTHER, and STUDY, is NAME, NAME@RESULTS_DIR "
        "or NAME@STORAGE_URL): one report in RESULTS/reports/compare-<names>/ and a run of the "
        "MLflow experiment compare; the studies' own records are only read",
    )
    _common(p)
    return p


def _reproduce_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run_study.py reproduce",
        description="Re-run one COMPLETE or PRUNED trial from its MLflow record alone (its "
        "config.yaml, seed, data split, CPU thread count, device, starting weights) as a new run "
        "tagged harness.reproduces=RUN_ID, and compare the per-epoch metrics: bit for bit on the "
        "recording CPU model with its thread count and torch version, within a stated tolerance "
        "on another CPU, other library versions or a GPU. Exit 0: they match (bit for bit or "
        "within tolerance, the verdict says which); 1: they differ (the first difference is "
        "named); 2: refused (unknown run, data split hash differs, ...).",
    )
    p.add_argument("run_id", help="the trial's MLflow run id (Optuna user attribute mlflow_run_id)")
    _common(p)
    return p


def cmd_reproduce(args) -> int:
    from harness.reports.reproduce import reproduce
    from harness.study.search import StudyOptions

    opts = StudyOptions(results=args.results, storage=args.storage, tracking_uri=args.tracking_uri)
    outcome = reproduce(args.run_id, opts)
    print(outcome.render())
    return outcome.exit_code


def cmd_report(args) -> int:
    if args.seeds < 0:
        raise SpecError(f"--seeds {args.seeds}: must be 0 or more")
    if args.compare is not None:
        if args.seeds or args.ablate or args.soup:
            raise SpecError("--compare reads the studies' reports: give it without --seeds, "
                            "--ablate or --soup (run those on each study first)")  # fmt: skip
        from harness.study.compare import compare_studies
        from harness.study.search import StudyOptions

        opts = StudyOptions(
            results=args.results, storage=args.storage, tracking_uri=args.tracking_uri
        )
        text, _files = compare_studies(opts, [args.study, *args.compare])
        print(text)
        return 0
    from harness.reports import report
    from harness.study.search import StudyOptions, report_study

    opts = StudyOptions(
        results=args.results,
        storage=args.storage,
        tracking_uri=args.tracking_uri,
        study_name=args.study,
    )
    summary = report_study(opts, seeds=args.seeds, ablate=args.ablate, soup=args.soup)
    print(report.render(summary))
    return 0


def cmd_check(args) -> int:
    import yaml

    spec = load_spec(args.experiment, args.overrides)
    print(f"{args.experiment}: valid")
    tree = spec.model_dump(mode="json", by_alias=True)  # every key, null ones too
    space = tree["search"].pop("space")
    kind = spec.task.kind
    used = {"name", "seed", *SECTIONS[kind], "search"}
    unused = [k for k in tree if k not in used and k != "train"]
    if kind == "meta":  # meta-learning reads a few keys of train: only
        tree["train"] = {k: tree["train"][k] for k in META_TRAIN_KEYS}
    shown = {k: v for k, v in tree.items() if k not in unused}
    print(yaml.safe_dump(shown, sort_keys=False, default_flow_style=None).rstrip())
    if unused:
        print(f"(not used by task.kind {kind}, not shown: {', '.join(unused)})")
    print(f"search space ({len(space)} keys):")
    print("\n".join(describe_space(spec)))
    return 0


def cmd_run(args) -> int:
    if args.n_trials is not None and args.n_trials < 1:
        raise SpecError(f"--n-trials {args.n_trials}: must be at least 1")
    if args.timeout is not None and args.timeout <= 0:
        raise SpecError(f"--timeout {args.timeout}: must be positive")
    if args.heartbeat_grace is not None and args.heartbeat_grace < 2:
        raise SpecError(f"--heartbeat-grace {args.heartbeat_grace:g}: must be at least 2 s")
    if args.workers is not None and not (
        args.workers == "auto" or (args.workers.isdigit() and int(args.workers) >= 1)
    ):
        raise SpecError(f"--workers {args.workers}: give a number of at least 1, or auto")
    if args.devices_per_trial is not None:
        if args.devices_per_trial < 1:
            raise SpecError(f"--devices-per-trial {args.devices_per_trial}: must be at least 1")
        args.overrides = [*args.overrides, f"train.devices_per_trial={args.devices_per_trial}"]
    if args.warm_start is not None:
        named = [s.strip() for s in args.warm_start.split(",")]
        if not all(named):
            raise SpecError(f"--warm-start {args.warm_start}: give STUDY[,STUDY...]")
        quoted = ", ".join(json.dumps(s) for s in named)
        args.overrides = [*args.overrides, f"search.warm_start=[{quoted}]"]
    spec = load_spec(args.experiment, args.overrides)  # fails before anything is created
    from harness.reports import report
    from harness.study.search import StudyOptions, run_study

    opts = StudyOptions(
        results=args.results,
        storage=args.storage,
        tracking_uri=args.tracking_uri,
        study_name=args.study_name,
        n_trials=args.n_trials,
        timeout=args.timeout,
        quiet=args.quiet,
        workers=args.workers,
        worker=args.worker,
        argv=tuple(_without_workers(args.argv)),
        heartbeat_grace=args.heartbeat_grace,
    )
    summary = run_study(spec, opts)
    if not args.worker:
        print(report.render(summary))
    return 0


def _without_workers(argv: list[str]) -> list[str]:
    """The command line a spawned worker gets: the same, less --workers (and --quiet)."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--workers":
            skip = True
        elif not item.startswith("--workers=") and item != "--quiet":
            out.append(item)
    return out


def cmd_ui(args) -> int:
    from harness.tracking import relocation, ui
    from harness.tracking import store as tracking

    uri = args.tracking_uri or tracking.default_tracking_uri(args.results)
    with socket.socket() as probe:  # a taken port is the user's error: say so, exit 2
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((args.host, args.port))
        except OSError as err:
            raise SpecError(
                f"--port {args.port}: {args.host}:{args.port} is not free ({err.strerror}); "
                "stop what uses it or give another --port."
            ) from None
    moved = relocation.relocate(args.results, uri)
    if moved:
        print(f"note: {moved}.", file=sys.stderr)
    cmd = ui.ui_command(uri, args.results, args.host, args.port)
    base = f"http://{args.host}:{args.port}"
    print(f"MLflow UI on {tracking.redact(uri)}: {base}  (Ctrl-C stops it)", flush=True)
    for name, url in ui.study_urls(uri, base):
        print(f"  {name}: {url}", flush=True)
    return _serve(cmd, ui.ui_env(), args.results / "logs" / "mlflow-ui.log")


def _serve(cmd: list[str], env: dict[str, str], log: Path) -> int:
    """The UI server runs until Ctrl-C or SIGTERM; its own output (INFO lines, warnings) goes
    to `log`, not the terminal. A server that fails on its own: the log's last lines."""
    import subprocess

    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"  server log: {log}", flush=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))
    try:
        rc = proc.wait()
    except KeyboardInterrupt:  # Ctrl-C reaches the server too (one process group): it stops
        proc.wait()
        return 0
    if rc not in (0, -signal.SIGTERM, -signal.SIGINT):
        tail = log.read_text(errors="replace").splitlines()[-10:]
        print(
            "\n".join([f"error: the MLflow UI server stopped (exit {rc}); {log}:", *tail]),
            file=sys.stderr,
        )
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `... | head` ends quietly
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv and argv[0] in COMMANDS else "run"
    parser, handler = {
        "run": (_run_parser, cmd_run),
        "check": (_check_parser, cmd_check),
        "ui": (_ui_parser, cmd_ui),
        "report": (_report_parser, cmd_report),
        "reproduce": (_reproduce_parser, cmd_reproduce),
    }[command]
    args = parser().parse_args(argv[1:] if command != "run" else argv)
    args.argv = list(argv)
    if args.retry_window < 0:
        print(f"error: --retry-window {args.retry_window:g}: must be 0 or more", file=sys.stderr)
        return 2
    try:
        if command != "check":  # check imports no store library
            from harness.infra import envfaults, logs

            envfaults.configure(window=args.retry_window, quiet=getattr(args, "quiet", False))
            logs.to_file(args.results / "logs" / "libraries.log")  # not the terminal
        return handler(args)
    except SpecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        from harness.infra.envfaults import EXIT_TEMPFAIL, EnvironmentStop

        if isinstance(err, EnvironmentStop):
            print(err.message(), file=sys.stderr)
            return EXIT_TEMPFAIL
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        from harness.data.sources import DataError

        if isinstance(err, DataError):
            where = getattr(args, "experiment", None) or getattr(args, "study", None) or "data"
            print(f"error: {where}: {err}", file=sys.stderr)
            return 2
        from harness.infra.envfaults import EXIT_TEMPFAIL, EnvironmentStop, disk_full

        fault = disk_full(err, args.results)
        if fault is not None:  # a full disk (the report's own write, say): no traceback
            print(EnvironmentStop(fault).message(), file=sys.stderr)
            return EXIT_TEMPFAIL
        traceback.print_exc()
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
