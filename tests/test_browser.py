"""The MLflow UI, driven by headless Chromium over the e2e sweep's real store.

What a user opens after a sweep: the experiment's run list (the study's parent run, its trial runs
nested under it), a trial's val/loss chart, and the registered model with its `champion` alias.
Screenshots land in test-artifacts/browser/. Skipped, saying why, where Chromium or Playwright is
missing; `.ci/run` installs Debian's chromium so that CI runs it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
SHOTS = ROOT / "test-artifacts" / "browser"

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - the dev extra installs it
    sync_playwright = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ui(e2e):
    if sync_playwright is None:
        pytest.skip("playwright is not installed (pip install -e '.[dev]')")
    if not CHROMIUM:
        pytest.skip("no chromium binary on PATH (apt-get install chromium; .ci/run does it)")
    port = _free_port()
    log = open(e2e["ws"] / "mlflow-ui.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", e2e["opts"].tracking_uri,
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"mlflow ui did not start: {(e2e['ws'] / 'mlflow-ui.log').read_text()[-2000:]}")
            time.sleep(0.5)
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(60_000)
        yield {"page": page, "url": url}
        browser.close()
    os.killpg(proc.pid, 15)
    proc.wait(timeout=30)
    log.close()


def _ids(e2e) -> tuple[str, str]:
    client = MlflowClient(e2e["opts"].tracking_uri)
    exp = client.get_experiment_by_name("e2e").experiment_id
    return exp, e2e["study"].user_attrs["mlflow_parent_run_id"]


def test_experiment_lists_the_parent_and_its_trial_runs(e2e, ui):
    page, url = ui["page"], ui["url"]
    exp, parent_id = _ids(e2e)
    page.goto(f"{url}/#/experiments/{exp}/runs")
    parent = page.locator(f"a[href*='{parent_id}']").first
    parent.wait_for()
    assert parent.inner_text().strip() == "e2e"
    trial_links = [page.locator(f"a[href*='{t.user_attrs['mlflow_run_id']}']") for t in e2e["study"].trials]
    assert all(link.count() == 0 for link in trial_links), "trial runs are nested (collapsed) under the parent"
    parent.locator("xpath=ancestor::div[@role='gridcell']").locator("button").first.click()  # the expander
    for t, link in zip(e2e["study"].trials, trial_links, strict=True):
        link.first.wait_for()
        assert link.first.inner_text().strip() == f"trial-{t.number}"
    page.screenshot(path=str(SHOTS / "experiment-runs.png"))


def test_a_trial_run_shows_its_val_loss_chart(e2e, ui):
    page, url = ui["page"], ui["url"]
    exp, _ = _ids(e2e)
    run_id = next(t for t in e2e["study"].trials if t.number == 0).user_attrs["mlflow_run_id"]
    page.goto(f"{url}/#/experiments/{exp}/runs/{run_id}/model-metrics")
    page.get_by_role("heading", name="trial-0").wait_for()
    page.get_by_placeholder("Search metric charts").fill("val/loss")
    card = page.locator("[data-testid='experiment-view-compare-runs-card']").filter(has_text="trial-0 (val/loss)")
    card.first.wait_for()
    line = card.first.locator(".js-plotly-plot g.trace path.js-line").first
    line.wait_for(state="attached")
    assert len(line.get_attribute("d") or "") > 10, "the val/loss curve is drawn"
    page.screenshot(path=str(SHOTS / "trial-val-loss.png"))


def test_registered_model_shows_the_champion_alias(e2e, ui):
    page, url = ui["page"], ui["url"]
    version = MlflowClient(e2e["opts"].tracking_uri).get_model_version_by_alias("e2e-model", "champion").version
    page.goto(f"{url}/#/models/e2e-model")
    row = page.locator("[role=row]").filter(has_text=f"Version {version}").filter(has_text="champion")
    row.first.wait_for()
    assert "gate" in row.first.inner_text(), "the gate's verdict is shown with the version"
    page.screenshot(path=str(SHOTS / "registered-model.png"))
