"""A trial's set-up, job after job in one process as a resident worker runs them, timed and profiled.

Each job is a trial's rendered ``config.py`` (any trial folder of a sweep) trained by the worker's own
``job.train_in_this_process`` until its first training step, where it stops: what is measured is everything
before it (the runner, its model and LoRA layers, data loaders, optimizer, the hooks' ``before_train``).
``--fresh-rows`` gives each job an empty datasets cache of its own (a temporary folder, not the user's), as a
sweep's trial meets it (each trial's rows file is a mix of its own); without it, jobs after the first reuse the
first job's mapped rows.

    python benchmarks/setup_profile.py sweep-runs/STUDY/trial_0000/config.py --jobs 3 --fresh-rows

Prints each job's set-up seconds and the last job's largest cProfile entries.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class _FirstStep(Exception):
    """Raised where the first training step would begin."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--jobs", type=int, default=3)
    parser.add_argument("--fresh-rows", action="store_true", help="clear datasets' cache before each job")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="setup-profile-"))
    if args.fresh_rows:  # before datasets is imported: it reads the variable once
        os.environ["HF_DATASETS_CACHE"] = str(work / "datasets-cache")
    from sweep.training import hook, job, patches
    from sweep.trial import launcher

    config = args.config.resolve()
    os.environ.update(launcher.environment(launcher.Launch(config, config.parent, Path(os.devnull))))
    patches.prepare_process()

    def first_step(self, runner, batch_idx, data_batch=None):
        raise _FirstStep

    hook.SweepHook.before_train_iter = first_step
    stdout = sys.stdout
    for i in range(args.jobs):
        if args.fresh_rows:
            shutil.rmtree(work / "datasets-cache", ignore_errors=True)
        profile = cProfile.Profile()
        start = time.perf_counter()
        profile.enable()
        with contextlib.suppress(_FirstStep):
            job.train_in_this_process([str(config), "--work-dir", str(work / f"job{i}")])
        profile.disable()
        print(f"job {i + 1}: set-up {time.perf_counter() - start:.2f} s", file=stdout, flush=True)
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(args.top)
    print(text.getvalue(), file=stdout)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
