"""What writing a trial's config out costs, with and without yapf (``sweep.training.patches._plain_config_text``).

    .venv/bin/python benchmarks/config_text.py [REPEATS]     # CPU, about 10 s
    .venv/bin/python benchmarks/config_text.py --jobs N      # also N warm jobs each way, about 3 min for N=3

mmengine turns the runner's config back into text (``Config.pretty_text``) for its config dump, the
visualizer, the environment log and every checkpoint's metadata, and formats it with yapf each time.
This renders the demo's trial config (``sweep validate``), times ``pretty_text`` formatted and plain,
and checks that the plain text loads back to the same config. With ``--jobs N`` it also trains one
small demo trial, then runs its config N times in one process (as a resident worker does), once with
yapf and once without, and prints each job's wall time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sweep import cli  # noqa: E402
from sweep.training import job, patches  # noqa: E402
from sweep.trial import launcher  # noqa: E402


def _seconds(config_file: Path, repeats: int) -> tuple[float, str]:
    from mmengine.config import Config

    cfg = Config.fromfile(str(config_file))
    start = time.perf_counter()
    for _ in range(repeats):
        text = cfg.pretty_text
    return (time.perf_counter() - start) / repeats, text


def _trial_config(tmp: Path) -> Path:
    """A finished 2-epoch demo trial's config (its data and stream live in ``tmp``)."""
    from sweep import study as study_mod
    from sweep.spec import load_spec

    spec = load_spec(ROOT / "configs" / "demo.yaml")
    spec = spec.model_copy(update={"study": "config-text", "n_trials": 1, "registry": None, "probes": []})
    opts = study_mod.RunOptions(
        storage=f"sqlite:///{tmp / 'sweep.db'}", tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}",
        work_dir=tmp / "runs", heartbeat=0,
    )  # fmt: skip
    point = {"lr": 3e-3, "max_epochs": 2, "batch_size": 8, "lora_r": 8, "lora_alpha_ratio": 2.0, "mix_ratio": 0.1}
    study_mod.open_study(spec, opts.storage).enqueue_trial(point)
    study_mod.run(spec, opts)
    return tmp / "runs" / spec.study / "trial_0000" / "config.py"


def _jobs(config: str, n: int, mode: str) -> None:
    """In a process of its own: ``n`` jobs of ``config``, the way a resident worker runs them."""
    os.environ.update(launcher.environment(launcher.Launch(Path(config), Path(config).parent, Path(os.devnull))))
    patches.prepare_process()
    if mode == "yapf":
        from mmengine.config import Config

        Config.__init__ = Config.__init__.__wrapped__  # mmengine's own, formatting again
    for i in range(n):
        work = Path(config).parent / f"bench-{mode}-{i}"
        shutil.rmtree(work, ignore_errors=True)
        start = time.perf_counter()
        job.train_in_this_process([config, "--work-dir", str(work)])
        print(f"{mode}: job {i + 1}: {time.perf_counter() - start:.2f} s", file=sys.__stdout__, flush=True)


def main() -> None:
    from mmengine.config import Config

    if sys.argv[1:2] == ["--run-jobs"]:
        return _jobs(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    jobs = int(sys.argv[2]) if sys.argv[1:2] == ["--jobs"] else 0
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 and not jobs else 3
    with tempfile.TemporaryDirectory() as tmp:
        rendered = Path(tmp) / "trial.py"
        if cli.main(["validate", str(ROOT / "configs" / "demo.yaml"), "--output", str(rendered)]) != 0:
            sys.exit("sweep validate failed")
        formatted, _ = _seconds(rendered, repeats)
        patches.prepare_process()  # what every training process does first
        plain, text = _seconds(rendered, repeats)
        back = Path(tmp) / "back.py"
        back.write_text(text, encoding="utf-8")
        same = Config.fromfile(str(back)).to_dict() == Config.fromfile(str(rendered)).to_dict()
    print(f"config text: {len(text):,} characters")
    print(
        f"pretty_text formatted by yapf: {formatted:.3f} s per call; plain: {plain:.4f} s ({formatted / plain:,.0f}x)"
    )
    print(f"plain text loads back to the same config: {same}")
    if not same:
        sys.exit(1)
    if jobs:
        with tempfile.TemporaryDirectory() as tmp:
            config = _trial_config(Path(tmp))
            for mode in ("yapf", "plain"):
                run = [sys.executable, __file__, "--run-jobs", str(config), str(jobs), mode]
                out = subprocess.run(run, check=True, capture_output=True, text=True, cwd=tmp).stdout
                print("\n".join(line for line in out.splitlines() if line.startswith(f"{mode}: job")), flush=True)


if __name__ == "__main__":
    main()
