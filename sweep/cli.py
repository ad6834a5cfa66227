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
from typing import Any

from sweep.spec import SpecError, load_spec

DEFAULT_STORAGE = "sqlite:///sweep.db"
DEFAULT_TRACKING = "sqlite:///mlflow.db"
SPEC_KEYS = ("model.", "objective.", "sampler.", "mix_ratio", "base_config", "data.")


def _gpu_list(text: str) -> list[int]:
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected GPU indices like 0,1,3, got {text!r}") from None


def _tracking_uri(arg: str | None) -> str:
    return arg or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING


#: The Optuna storage URL when ``--storage`` is not given: from the environment, so that a URL with a password
#: need not stand in argv (``ps``, shell history, MLflow's logged parameters). PostgreSQL also reads
#: ``PGPASSWORD`` and ``~/.pgpass`` itself: ``postgresql://user@host/db`` then needs no password at all.
STORAGE_ENV = "SWEEP_STORAGE"


def _default_storage() -> str:
    return os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE


def _trust_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trust-remote-code", action="store_true",
        help="let the base model run its own code (InternLM2 needs it); only for sources you trust",
    )  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sweep", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run (or continue) the study a spec describes")
    r.add_argument("spec", type=Path)
    r.add_argument("--study", help="study name (default: the spec's `study`, else its file name)")
    r.add_argument(
        "--storage",
        default=_default_storage(),
        help=f"Optuna storage URL (default ${STORAGE_ENV} or {DEFAULT_STORAGE})",
    )
    r.add_argument("--tracking-uri", help=f"MLflow tracking URI (default $MLFLOW_TRACKING_URI or {DEFAULT_TRACKING})")
    r.add_argument("--work-dir", type=Path, default=Path("sweep-runs"), help="where trials write (default sweep-runs/)")
    r.add_argument(
        "--n-trials", type=lambda v: int(float(v)), help="trials to add in this run (0 or unset: the spec's n_trials)"
    )
    r.add_argument(
        "--n-jobs",
        type=int,
        help="trials at once, each in its own process (default: as many as the GPU slots hold; 1 on the CPU)",
    )
    r.add_argument("--gpus", type=_gpu_list, help="GPU indices to use, e.g. 0,1 (default: all visible)")
    r.add_argument(
        "--trials-per-gpu",
        default="auto",
        type=lambda v: None if v == "auto" else int(v),
        help="auto (as many as fit in memory, estimated and checked against finished trials' peaks) or K",
    )
    r.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    r.add_argument(
        "--heartbeat",
        type=int,
        default=60,
        help="seconds between trial heartbeats; a trial of a dead worker is "
        "failed and queued again after twice this long (0: off)",
    )
    r.add_argument("--json", action="store_true", help="print the final report as JSON")

    ini = sub.add_parser(
        "init", help="write a commented starter spec from an XTuner config, as `xtuner copy-cfg` copies one"
    )
    ini.add_argument("base_config", help="an XTuner config name (`xtuner list-cfg`) or your own edited config file")
    ini.add_argument(
        "--data", type=Path, nargs="+", action="extend", required=True, metavar="FILE",
        help="the task's chat rows (OpenAI messages, JSONL or JSON); a second file: general chat to mix in",
    )  # fmt: skip
    ini.add_argument("--model", type=Path, help="the base model's local folder (default: the config's own)")
    ini.add_argument("--out", type=Path, default=Path("spec.yaml"), help="the spec to write (default spec.yaml)")
    ini.add_argument("--force", action="store_true", help="replace --out if it exists")

    v = sub.add_parser("validate", help="check a spec, its data and model dir; render one trial's config")
    v.add_argument("spec", type=Path)
    v.add_argument("--output", type=Path, help="write the rendered XTuner config here")

    pro = sub.add_parser(
        "promote",
        help="score the study's best trial and the champion on the test split; move the alias if it is better",
    )
    pro.add_argument("study")
    pro.add_argument("--storage", default=_default_storage())
    pro.add_argument("--tracking-uri")
    pro.add_argument("--json", action="store_true")

    exp = sub.add_parser("export", help="copy the adapter of a study's best trial or a registered model; --merge it")
    exp.add_argument("source", help="a study name, or models:/NAME@ALIAS (or models:/NAME/VERSION)")
    exp.add_argument("--adapter", type=Path, help="copy the LoRA adapter into this new folder")
    exp.add_argument("--merge", type=Path, help="write the merged Hugging Face model (XTuner's merge) here")
    exp.add_argument("--storage", default=_default_storage())
    exp.add_argument("--tracking-uri")
    _trust_flag(exp)

    chat = sub.add_parser(
        "chat",
        help="multi-turn chat with an adapter in its prompt template (like `xtuner chat --adapter`); "
        "/reset clears the conversation, /exit ends it",
    )
    chat.add_argument("source", help="a study name, or models:/NAME@ALIAS")
    chat.add_argument("--question", action="append", help="answer this question alone and exit (repeatable)")
    chat.add_argument("--image", type=Path, help="a LLaVA model: the picture every question is about")
    chat.add_argument("--system", help="system text (default: the one the adapter was trained with)")
    chat.add_argument(
        "--temperature", type=float, default=0.0,
        help="0 (default): greedy, the answers the sweep scored; above 0 samples (xtuner chat's default is 0.1)",
    )  # fmt: skip
    chat.add_argument("--top-k", type=int, default=40, help="when sampling: keep the k likeliest tokens (0: all)")
    chat.add_argument("--top-p", type=float, default=0.75, help="when sampling: nucleus probability mass")
    chat.add_argument("--repetition-penalty", type=float, default=1.0, help="1.0: none")
    chat.add_argument(
        "--max-new-tokens", type=int, help="per answer (default: the spec's generation.max_new_tokens, else 64)"
    )
    chat.add_argument("--seed", type=int, default=0, help="the same seed and input give the same sampled answers")
    chat.add_argument("--storage", default=_default_storage())
    chat.add_argument("--tracking-uri")
    _trust_flag(chat)

    rep = sub.add_parser("report", help="trials table, parameter importances and Optuna's plots (HTML, PNG); or --json")
    rep.add_argument("study")
    rep.add_argument("--storage", default=_default_storage())
    rep.add_argument("--tracking-uri")
    rep.add_argument("--json", action="store_true")
    rep.add_argument("--plots", type=Path, help="folder for the plots (default: the study's work dir /plots)")
    rep.add_argument("--no-plots", action="store_true", help="only the table")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    console = _logging()
    for noisy in ("alembic", "mlflow", "optuna", "urllib3", "httpx", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        commands = {
            "run": _run, "init": _init, "validate": _validate, "report": _report, "promote": _promote, "export": _export, "chat": _chat,
        }  # fmt: skip
        args.console = console
        return commands[args.command](args)
    except SpecError as err:
        message = str(err)
        spec_file = getattr(args, "spec", None)
        if spec_file and message.startswith(SPEC_KEYS):  # a spec value that failed a later check
            message = f"{spec_file}: {message}"
        print(f"error: {message}", file=sys.stderr)
        return 2


def _logging():
    """Log lines go through rich in a terminal, so that they scroll above the live progress view."""
    if not sys.stderr.isatty():
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
        return None
    from rich.console import Console
    from rich.logging import RichHandler

    console = Console(stderr=True)
    handler = RichHandler(console=console, show_path=False, show_level=False, log_time_format="%H:%M:%S")
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[handler])
    return console


def _run(args: argparse.Namespace) -> int:
    from sweep import study

    spec = load_spec(args.spec)
    if args.study is not None:
        spec = spec.with_study(args.study)
    opts = study.RunOptions(
        storage=args.storage,
        tracking_uri=_tracking_uri(args.tracking_uri),
        work_dir=args.work_dir,
        n_trials=args.n_trials,
        n_jobs=args.n_jobs,
        gpus=args.gpus,
        trials_per_gpu=args.trials_per_gpu,
        timeout=args.timeout,
        heartbeat=args.heartbeat or None,
        console=args.console,
    )
    _stop_on_signals()
    umask = os.umask(0o077)  # work dirs, SQLite stores, adapters and logs: the user's alone (0700/0600)
    try:
        report = study.run(spec, opts)
    except KeyboardInterrupt:
        print(
            "interrupted: running trials were stopped and recorded; run the same command again to resume",
            file=sys.stderr,
        )
        return 130
    finally:
        os.umask(umask)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        _print_summary(report)
    return run_exit_code(report)


#: ``sweep run``'s exit codes besides 0 (success, also when only some trials failed), 2 (a bad spec, data or
#: option) and 130 (interrupted): scripts, CI and ``mlflow run`` must see a sweep that trained nothing.
EXIT_ALL_FAILED = 3  # every trial this run started failed
EXIT_NONE_COMPLETE = 4  # no trial of the study has completed (all pruned, or failed and pruned): nothing to register
EXIT_GATE_FAILED = 5  # trials completed, but registering the best one failed: `sweep promote STUDY` tries again


def run_exit_code(report: dict) -> int:
    """The exit code of ``sweep run`` for its report; a warning line when some of this run's trials failed."""
    ran = report.get("this_run") or {}
    started = sum(ran.values())
    failed = ran.get("FAIL", 0)
    log = logging.getLogger("sweep")
    if started and failed == started:
        log.error("all %d trial(s) of this run failed (exit code %d); see each trial's error", started, EXIT_ALL_FAILED)
        return EXIT_ALL_FAILED
    if not report.get("counts", {}).get("COMPLETE"):
        log.error("no trial of study %s has completed (exit code %d)", report.get("study"), EXIT_NONE_COMPLETE)
        return EXIT_NONE_COMPLETE
    if failed:
        log.warning("%d of %d trial(s) of this run failed; the others completed or were pruned", failed, started)
    if (report.get("registered") or {}).get("error"):
        return EXIT_GATE_FAILED
    return 0


def _stop_on_signals() -> None:
    """First SIGINT/SIGTERM: stop running trials cleanly (recorded, queued again). Second: stop at once."""
    from sweep.trial.launcher import STOP

    def handler(signum: int, frame) -> None:
        if STOP.is_set():
            raise KeyboardInterrupt
        STOP.set()
        logging.getLogger("sweep").warning(
            "%s received: stopping running trials (send again to stop at once)", signal.Signals(signum).name
        )

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def _init(args: argparse.Namespace) -> int:
    from sweep import starter

    made = starter.write(args.base_config, args.data, args.model, args.out, force=args.force)
    space, fixed, _ = starter.search_space(made)
    print(f"wrote {args.out} from {made.source} (template {made.template}, {made.train_rows} training rows)")
    print(f"  searched: {', '.join(space)}; fixed: {', '.join(f'{k}={v}' for k, v in fixed.items()) or '(none)'}")
    if not made.model_is_local:
        print(f"  model.path {made.model} is not a local model folder: set it before `sweep validate`", file=sys.stderr)
    print(f"next: sweep validate {args.out}   then: sweep run {args.out}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from sweep import study

    spec = load_spec(args.spec)
    checked = study.check(spec)
    counts = {k: len(v) for k, v in checked.splits.items()}
    print(f"{args.spec}: OK")
    print(f"  study {spec.study}; base config {spec.base_config}; model {spec.model.path} ({spec.model.template})")
    print(f"  data rows: {counts}")
    print(f"  data checks: {checked.findings.summary()}")
    for line in checked.findings.lines():
        print(f"    {line}")
    print(f"  search space: {', '.join(spec.search_space) or '(none)'}; objective {spec.objective.describe()}")
    if args.output:
        args.output.write_text(checked.config_text, encoding="utf-8")
        print(f"  rendered config of one trial: {args.output}")
    return 0


def _load_study(name: str, storage: str):
    import optuna

    from sweep.registry.tracking import redact
    from sweep.storage import refuse_missing_sqlite

    refuse_missing_sqlite(storage)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise SpecError(f"storage {redact(storage)}: no study named {name!r}") from None


def _promote(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sweep.registry.gate import promote
    from sweep.registry.tracking import Tracker
    from sweep.spec import stored_spec

    st = _load_study(args.study, args.storage)
    if "work_dir" not in st.user_attrs:
        raise SpecError(f"study {args.study}: has no saved spec; it was not made by `sweep run`")
    spec = stored_spec(st)
    result = promote(
        st, spec, Tracker(_tracking_uri(args.tracking_uri)), Path(st.user_attrs["work_dir"]) / "data",
        st.user_attrs.get("mlflow_parent_run_id"),
    )  # fmt: skip
    if result is None:
        print(f"study {args.study}: no completed trial with an adapter; nothing to promote", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.as_dict(), indent=2, default=str))
    else:
        where = "champion" if result.moved else f"not champion (champion stays version {result.champion_version})"
        print(f"models:/{result.name}/{result.version}: {where}: {result.reason}")
    return 0


def _export(args: argparse.Namespace) -> int:
    import tempfile

    from sweep.registry.export import export, resolve

    if not args.adapter and not args.merge:
        raise SpecError("export: give --adapter DIR, --merge DIR or both")
    with tempfile.TemporaryDirectory() as scratch:
        resolved = resolve(
            args.source, args.storage, _tracking_uri(args.tracking_uri), Path(scratch), args.trust_remote_code
        )
        for out in (args.adapter, args.merge):
            if out:
                out.parent.mkdir(parents=True, exist_ok=True)
        for path in export(resolved, args.adapter, args.merge):
            print(f"{resolved.label}: wrote {path}")
    return 0


def _chat(args: argparse.Namespace) -> int:
    import tempfile

    from sweep.chat import HELP, answer_each, converse, terminal_lines
    from sweep.registry.export import resolve
    from sweep.registry.scoring import load_adapter_model

    with tempfile.TemporaryDirectory() as scratch:
        r = resolve(args.source, args.storage, _tracking_uri(args.tracking_uri), Path(scratch), args.trust_remote_code)
        sampling = _sampling(args, r.max_new_tokens)  # before the model loads: a bad flag costs nothing
        if r.visual_encoder is not None or args.image is not None:
            return _chat_about_image(args, r, sampling)
        model, tokenizer = load_adapter_model(r.base_model, r.adapter, r.quantize, r.cpu_amp, r.trust_remote_code)
    system = r.system if args.system is None else args.system
    if args.question:
        answer_each(model, tokenizer, r.template, system, sampling, args.question, sys.stdout)
        return 0
    decoding = "greedy" if sampling.greedy else f"sampling, temperature {sampling.temperature}, seed {sampling.seed}"
    print(f"{r.label} ({decoding}): {HELP}", file=sys.stderr)
    return converse(model, tokenizer, r.template, system, sampling, terminal_lines(), sys.stdout, sys.stderr)


def _chat_about_image(args: argparse.Namespace, r: Any, sampling: Any) -> int:
    """`sweep chat --image FILE` with a LLaVA model, like `xtuner chat --llava DIR --image FILE`: each question is
    asked alone about the picture, greedily (the answers the sweep scored); called while ``r``'s files exist."""
    from transformers import AutoTokenizer, CLIPImageProcessor

    from sweep.chat import answer_about_image, terminal_lines
    from sweep.llava_data import check_image
    from sweep.registry.scoring import _device, inference_dtype, nf4_config
    from sweep.xtuner.llava_model import load_llava

    if r.visual_encoder is None:
        raise SpecError(f"--image: {r.label} is a chat model, not a LLaVA model; it cannot see pictures")
    if not sampling.greedy or sampling.repetition_penalty != 1.0:
        raise SpecError("--temperature/--repetition-penalty: a LLaVA model answers greedily here (temperature 0)")
    image = str(check_image(args.image.name, args.image.parent, "--image")) if args.image else None
    nf4 = nf4_config() if r.quantize and _device() == "cuda" else None  # as `sweep chat` loads a QLoRA adapter
    model = load_llava(r.base_model, r.visual_encoder, r.adapter, None, inference_dtype(r.cpu_amp), _device(),
                       r.trust_remote_code, nf4)  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(r.base_model, trust_remote_code=r.trust_remote_code)
    processor = CLIPImageProcessor.from_pretrained(r.visual_encoder)
    system = r.system if args.system is None else args.system
    questions = args.question or terminal_lines()
    if not args.question:
        print(f"{r.label} (greedy, about {image or 'no picture'}): each line is a question; Ctrl-D ends",
              file=sys.stderr)  # fmt: skip
    answer_about_image(model, tokenizer, processor, r.template, system, sampling.max_new_tokens, image, r.square,
                       questions, sys.stdout)  # fmt: skip
    return 0


def _sampling(args: argparse.Namespace, default_max_new_tokens: int):
    """`sweep chat`'s decoding flags, checked; an error names the flag."""
    from sweep.xtuner.conversation import Sampling

    max_new = default_max_new_tokens if args.max_new_tokens is None else args.max_new_tokens
    try:
        return Sampling(
            max_new_tokens=max_new, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            repetition_penalty=args.repetition_penalty, seed=args.seed,
        )  # fmt: skip
    except SpecError as err:
        name, _, rest = str(err).partition(":")
        raise SpecError(f"--{name.replace('_', '-')}:{rest}") from None


def _report(args: argparse.Namespace) -> int:
    from sweep.registry.tracking import Tracker
    from sweep.report import champion_info, objective_of, study_report, trials_table

    st = _load_study(args.study, args.storage)
    registry = (st.user_attrs.get("spec") or {}).get("registry") or {}
    name = registry.get("name") or f"{args.study}-adapter"
    tracker = Tracker(_tracking_uri(args.tracking_uri))
    registered = champion_info(tracker, name)
    report = study_report(st, registered=registered)
    if not args.no_plots:
        report["plots"], report["importances"] = _plots(st, args, tracker)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    print(trials_table(st))
    print()
    if report.get("importances"):
        print(f"parameter importances for {objective_of(st).primary} (fANOVA):")
        for name, share in report["importances"].items():
            print(f"  {name:<18} {share:6.1%}  {'#' * round(40 * share)}")
        print()
    if report.get("plots"):
        print(f"plots: {report['plots']}")
    _print_summary(report)
    return 0


def _plots(st, args: argparse.Namespace, tracker) -> tuple[str | None, dict[str, float]]:
    """Optuna's plots and importances, written locally and logged to the study's parent MLflow run."""
    from sweep.plots import importances, write_plots
    from sweep.report import objective_of

    objective = objective_of(st)
    folder = args.plots or Path(st.user_attrs.get("work_dir", f"sweep-runs/{args.study}")) / "plots"
    written = write_plots(st, objective, folder)
    shares = importances(st, objective)
    parent = st.user_attrs.get("mlflow_parent_run_id")
    if parent:
        for files in written.values():
            for f in files:
                tracker.log_artifact(parent, f, "plots")
        if shares:
            tracker.client.log_dict(parent, shares, "importances.json")  # replaced on every report
    return (str(folder) if written else None), shares


def _print_summary(report: dict) -> None:
    counts = ", ".join(f"{v} {k.lower()}" for k, v in report["counts"].items() if v)
    print(f"study {report['study']} ({report['objective']}): {counts or 'no trials'}")
    for t in report.get("pareto") or []:
        values = ", ".join(f"{k} {v:.4f}" for k, v in (t["values"] or {}).items())
        print(f"pareto: trial {t['number']}: {values}  adapter {t['adapter_path']}")
    best = report["best"]
    if best:
        se = f" ±{best['value_se']:.4f}" if best.get("value_se") is not None else ""
        fit = f" ({best['fit']['label']})" if best.get("fit") else ""
        print(
            f"best: trial {best['number']} value {best['value']:.4f}{se} at step {best['best_step']}{fit} "
            f"params {best['params']}"
        )
        print(f"      adapter {best['adapter_path']}  mlflow run {best['mlflow_run_id']}")
    fit = report.get("fit")
    if fit and fit.get("trials"):
        print(f"fit: {fit['suggestion']}")
    reg = report["registered"]
    if reg and reg.get("error"):
        print(f"not registered: {reg['error'].splitlines()[0]} (`sweep promote {report['study']}` tries again)")
    elif reg and reg.get("alias"):
        print(f"champion: models:/{reg['name']}@{reg['alias']} (version {reg['version']}) {reg.get('reason', '')}")
    elif reg:
        print(f"registered: models:/{reg['name']}/{reg['version']}, not champion: {reg.get('reason', '')}")
    if reg and reg.get("untrained_test"):  # a LLaVA champion: what training gained on the test split
        names = sorted(set(reg["test"]) & set(reg["untrained_test"]))
        print(
            "test: " + ", ".join(f"{n} {reg['test'][n]:.4f} (untrained {reg['untrained_test'][n]:.4f})" for n in names)
        )


def entry() -> None:
    """The ``sweep`` command: ``main``, then an exit that skips the interpreter's last collection of every object the
    sweep made (torch, Transformers, MLflow, Optuna: seconds after the report was printed, docs/benchmarks.md).
    Frozen objects are left to the process's end; atexit handlers still run. Not in ``main``: tests call it
    in-process, where frozen objects would never be collected. Before ``main``, the frameworks Transformers would
    import for nothing are kept out (``sweep.lean_imports``): the sweep's checks import XTuner's model code."""
    import gc

    from sweep.lean_imports import skip_unused_frameworks

    skip_unused_frameworks()
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    entry()
