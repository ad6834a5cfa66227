"""Optuna's plots of a study, as interactive HTML (plotly) and PNG (matplotlib, no browser needed).

A plot that a study cannot have yet (importances need two finished trials that differ; a
multi-objective study has no intermediate values) is skipped with the reason, never an error:
`sweep report` must work on a study that has just started.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna

from sweep.spec import ObjectiveSpec

log = logging.getLogger("sweep")
PLOTS = ("optimization_history", "param_importances", "parallel_coordinate", "intermediate_values")


def importances(study: optuna.Study, objective: ObjectiveSpec) -> dict[str, float]:
    """Parameter importances (Optuna's default fANOVA) for the primary objective; {} when there is too little data."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dict(optuna.importance.get_param_importances(study, target=_target(study)))
    except (ValueError, RuntimeError, ZeroDivisionError) as err:
        log.info("importances: not available yet (%s)", err)
        return {}


def _target(study: optuna.Study) -> Callable | None:
    return (lambda t: t.values[0]) if len(study.directions) > 1 else None


def write_plots(study: optuna.Study, objective: ObjectiveSpec, folder: Path) -> dict[str, list[Path]]:
    """Write each plot as ``NAME.html`` and ``NAME.png``; returns the files written per plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as mpl_vis

    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[Path]] = {}
    for name in PLOTS:
        if name == "intermediate_values" and objective.multi:
            log.info("plot %s: skipped (multi-objective trials report no intermediate values)", name)
            continue
        kwargs = {}
        if name != "intermediate_values":
            kwargs = {"target": _target(study), "target_name": objective.primary}
        files: list[Path] = []
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                fig = getattr(optuna.visualization, f"plot_{name}")(study, **kwargs)
                html = folder / f"{name}.html"
                fig.write_html(str(html), include_plotlyjs="cdn")
                files.append(html)
                ax = getattr(mpl_vis, f"plot_{name}")(study, **kwargs)
                figure = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
                png = folder / f"{name}.png"
                figure.savefig(png, dpi=100, bbox_inches="tight")
                plt.close(figure)
                files.append(png)
        except (ValueError, RuntimeError, ZeroDivisionError) as err:
            log.info("plot %s: skipped (%s)", name, err)
        if files:
            written[name] = files
    return written
