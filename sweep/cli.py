"""The `sweep` command: run a study, validate a spec, report on a study.

Exit codes: 0 done, 1 the sweep itself failed, 2 bad input (the message names file and key).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

from sweep.spec import SpecError, load_spec

DEFAULT_STORAGE = "sqlite:///sweep.db"
DEFAULT_TRACKING = "sqlite:///mlflow.db"
SPEC_KEYS = ("model.", "objective.", "sampler.", "mix_ratio", "base_config", "data.")


def _tracking_uri(arg: str | None) -> str:
    return arg or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sweep", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run (or continue) the study a spec describes")
    r.add_argument("spec", type=Path)
    r.add_argument("--study", help="study name (default: the spec's `study`, else its file name)")
    r.add_argument("--storage", default=DEFAULT_STORAGE, help=f"Optuna storage URL (default {DEFAULT_STORAGE})")
    r.add_argument("--tracking-uri", help=f"MLflow tracking URI (default $MLFLOW_TRACKING_URI or {DEFAULT_TRACKING})")
    r.add_argument("--work-dir", type=Path, default=Path("sweep-runs"), help="where trials write (default sweep-runs/)")
    r.add_argument(
        "--n-trials", type=lambda v: int(float(v)), help="trials to add in this run (0 or unset: the spec's n_trials)"
    )
    r.add_argument("--n-jobs", type=int, default=1, help="trials at once, each in its own process")
    r.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    r.add_argument(
        "--heartbeat",
        type=int,
        default=60,
        help="seconds between trial heartbeats; a trial of a dead worker is "
        "failed and queued again after twice this long (0: off)",
    )
    r.add_argument("--json", action="store_true", help="print the final report as JSON")

    v = sub.add_parser("validate", help="check a spec, its data and model dir; render one trial's config")
    v.add_argument("spec", type=Path)
    v.add_argument("--output", type=Path, help="write the rendered XTuner config here")

    rep = sub.add_parser("report", help="table of a study's trials, or --json")
    rep.add_argument("study")
    rep.add_argument("--storage", default=DEFAULT_STORAGE)
    rep.add_argument("--tracking-uri")
    rep.add_argument("--json", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    for noisy in ("alembic", "mlflow", "optuna", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return {"run": _run, "validate": _validate, "report": _report}[args.command](args)
    except SpecError as err:
        message = str(err)
        spec_file = getattr(args, "spec", None)
        if spec_file and message.startswith(SPEC_KEYS):  # a spec value that failed a later check
            message = f"{spec_file}: {message}"
        print(f"error: {message}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from sweep import study

    spec = load_spec(args.spec)
    if args.study:
        spec = spec.model_copy(update={"study": args.study})
    opts = study.RunOptions(
        storage=args.storage,
        tracking_uri=_tracking_uri(args.tracking_uri),
        work_dir=args.work_dir,
        n_trials=args.n_trials,
        n_jobs=args.n_jobs,
        timeout=args.timeout,
        heartbeat=args.heartbeat or None,
    )
    _stop_on_signals()
    try:
        report = study.run(spec, opts)
    except KeyboardInterrupt:
        print(
            "interrupted: running trials were stopped and recorded; run the same command again to resume",
            file=sys.stderr,
        )
        return 130
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        _print_summary(report)
    return 0


def _stop_on_signals() -> None:
    """First SIGINT/SIGTERM: stop running trials cleanly (recorded, queued again). Second: stop at once."""
    from sweep.launcher import STOP

    def handler(signum: int, frame) -> None:
        if STOP.is_set():
            raise KeyboardInterrupt
        STOP.set()
        logging.getLogger("sweep").warning(
            "%s received: stopping running trials (send again to stop at once)", signal.Signals(signum).name
        )

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def _validate(args: argparse.Namespace) -> int:
    from sweep import study

    spec = load_spec(args.spec)
    checked = study.check(spec)
    counts = {k: len(v) for k, v in checked.splits.items()}
    print(f"{args.spec}: OK")
    print(f"  study {spec.study}; base config {spec.base_config}; model {spec.model.path} ({spec.model.template})")
    print(f"  data rows: {counts}")
    print(
        f"  search space: {', '.join(spec.search_space) or '(none)'}; objective {spec.objective.direction} {spec.objective.metric}"
    )
    if args.output:
        args.output.write_text(checked.config_text, encoding="utf-8")
        print(f"  rendered config of one trial: {args.output}")
    return 0


def _report(args: argparse.Namespace) -> int:
    import optuna

    from sweep.report import champion_info, study_report, trials_table
    from sweep.tracking import Tracker

    try:
        st = optuna.load_study(study_name=args.study, storage=args.storage)
    except KeyError:
        raise SpecError(f"storage {args.storage}: no study named {args.study!r}") from None
    registry = (st.user_attrs.get("spec") or {}).get("registry") or {}
    name = registry.get("name") or f"{args.study}-adapter"
    registered = champion_info(Tracker(_tracking_uri(args.tracking_uri)), name)
    report = study_report(st, registered)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    print(trials_table(st))
    print()
    _print_summary(report)
    return 0


def _print_summary(report: dict) -> None:
    counts = ", ".join(f"{v} {k.lower()}" for k, v in report["counts"].items() if v)
    print(f"study {report['study']} ({report['direction']}): {counts or 'no trials'}")
    best = report["best"]
    if best:
        print(
            f"best: trial {best['number']} value {best['value']:.4f} at step {best['best_step']} params {best['params']}"
        )
        print(f"      adapter {best['adapter_path']}  mlflow run {best['mlflow_run_id']}")
    reg = report["registered"]
    if reg:
        print(f"registered: models:/{reg['name']}@{reg['alias']} (version {reg['version']})")


if __name__ == "__main__":
    sys.exit(main())
