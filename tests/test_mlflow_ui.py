"""The MLflow UI in a real browser: a finished sweep's experiment, parent run and trial runs with their metric.

Runs a tiny sweep through launch.py, serves its store with `mlflow server`, and drives headless Chromium
with Playwright through the path a user takes (README "Browse the trials in MLflow"): the "Model
training" toggle, the experiment list, the experiment's Runs table, the parent run expanded, the
`test/accuracy` column chosen in "Columns". Screenshots go to the test's tmp dir and, if set, to
$SMEAR_SCREENSHOT_DIR.

Needs (no download at test time): the Debian package `chromium` (/usr/bin/chromium, or $SMEAR_CHROMIUM)
and the pip package `playwright` (drives that binary; `playwright install` is not needed). Missing
either is a failure with the install command, not a skip.
"""
from __future__ import annotations

import importlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import REPO, TINY, VENV_BIN

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("SMEAR_CHROMIUM", "/usr/bin/chromium")
EXPERIMENT = "smear-sweep/space"
METRIC = "test/accuracy"


def require_browser():
    """Playwright and a Chromium binary, or a failure that says what to install."""
    try:
        importlib.import_module("playwright.sync_api")
    except ImportError:
        pytest.fail("the browser test needs the pip package playwright: pip install 'playwright==1.65.2' "
                    "(it drives the system Chromium; `playwright install` is not needed)", pytrace=False)
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"the browser test needs Chromium at {CHROMIUM}: apt-get install -y chromium "
                    "(Debian), or set SMEAR_CHROMIUM to a Chromium/Chrome binary", pytrace=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"mlflow server not healthy after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def sweep_and_server(tmp_path, env_with_venv):
    """A finished tiny sweep in tmp_path/mlflow.db and an `mlflow server` on it: (url, client)."""
    require_browser()  # fail before spending a minute on the sweep
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    client.search_experiments()  # create the store once, so the server and the sweep never race on its schema
    (tmp_path / "space.yaml").write_text(TINY)
    launch = subprocess.Popen(
        [sys.executable, str(REPO / "service" / "launch.py"), "--sweep", str(tmp_path / "space.yaml"),
         "--tracking-uri", uri, "--storage", str(tmp_path / "results"), "--name", "t"],
        cwd=tmp_path, env=env_with_venv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    port = free_port()
    log = tmp_path / "mlflow-server.log"
    with open(log, "w") as out:  # the server starts (~15 s) while the sweep runs
        server = subprocess.Popen(
            [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1"],
            cwd=tmp_path, env=env_with_venv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        try:
            output, _ = launch.communicate(timeout=400)
        except subprocess.TimeoutExpired:
            launch.kill()
            output, _ = launch.communicate()
        assert launch.returncode == 0, output[-4000:]
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, server, log)
        yield url, client
    finally:
        if launch.poll() is None:
            launch.kill()
        stop_group(server)


def stop_group(proc: subprocess.Popen) -> None:
    """End the server's whole session (uvicorn, its workers, the job runner): SIGTERM, then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass


def test_chromium_and_playwright_are_installed():
    """Says plainly what is missing (the fixture below fails the same way before it starts the sweep)."""
    require_browser()


def save_screenshot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("SMEAR_SCREENSHOT_DIR"):
        out = Path(os.environ["SMEAR_SCREENSHOT_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, out / name)
    return path


def test_mlflow_ui_shows_the_sweep_in_chromium(tmp_path, sweep_and_server):
    from playwright.sync_api import expect, sync_playwright

    url, client = sweep_and_server
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.run_name == "t" and len(trials) == 3

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1700, "height": 900})
        page.set_default_timeout(30_000)
        try:
            page.goto(f"{url}/", wait_until="load")
            # MLflow 3 opens in its GenAI view: classic training runs are under "Model training"
            page.get_by_text("Model training", exact=True).click()
            page.get_by_role("link", name="Experiments", exact=True).click()
            expect(page.get_by_role("link", name=EXPERIMENT, exact=True)).to_be_visible()
            close_assistant(page)
            save_screenshot(page, tmp_path, "mlflow-ui-experiments.png")

            page.get_by_role("link", name=EXPERIMENT, exact=True).click()
            page.wait_for_url(f"**/#/experiments/{exp.experiment_id}/runs**")
            close_assistant(page)
            parent_row = page.locator(f'.ag-pinned-left-cols-container [row-id="{parent.info.run_id}"]')
            expect(run_link(page, parent)).to_be_visible()
            # expand the parent run: its child runs (one per trial) appear under it
            parent_row.locator('button[data-component-id$="runnamecellrenderer.tsx_46"]').click()
            # metric columns are hidden until chosen in "Columns"
            page.locator('button[data-component-id$="experimentviewrunscolumnselector.tsx_315"]').click()
            page.get_by_placeholder("Search columns").fill(METRIC)
            page.get_by_role("dialog").get_by_text(METRIC, exact=True).click()
            page.keyboard.press("Escape")
            widen_column(page, "attributes.`Run Name`", 140)
            widen_column(page, f"metrics.`{METRIC}`", 60)

            for run in trials:
                expect(run_link(page, run)).to_be_visible()
                cell = page.locator(f'.ag-center-cols-container [row-id="{run.info.run_id}"] '
                                    f'[col-id="metrics.`{METRIC}`"]')
                expect(cell).to_be_visible()
                shown = cell.inner_text().strip()
                assert abs(float(shown) - run.data.metrics[METRIC]) < 1e-6, (run.info.run_name, shown)
            header = page.locator(f'.ag-header-cell[col-id="metrics.`{METRIC}`"]')
            expect(header).to_contain_text(METRIC)
            save_screenshot(page, tmp_path, "mlflow-ui-runs.png")
        except Exception:
            save_screenshot(page, tmp_path, "mlflow-ui-failure.png")
            raise
        finally:
            browser.close()


def run_link(page, run):
    """The run's name in the Runs table, a link to the run's page."""
    cell = page.locator(f'.ag-pinned-left-cols-container [row-id="{run.info.run_id}"] [col-id="attributes.`Run Name`"]')
    link = cell.get_by_role("link", name=run.info.run_name, exact=True)
    expect_href = f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    assert link.get_attribute("href") == expect_href, (run.info.run_name, link.get_attribute("href"))
    return link


def close_assistant(page) -> None:
    """The "MLflow Assistant" side panel covers a third of the page; close it if it is open."""
    close = page.locator('button[data-component-id="mlflow.assistant.chat_panel.close"]')
    if close.count() and close.first.is_visible():
        close.first.click()


def widen_column(page, col_id: str, dx: int) -> None:
    """Drag a Runs-table column's resize handle (for the screenshot: run names and values in full)."""
    handle = page.locator(f'.ag-header-cell[col-id="{col_id}"] .ag-header-cell-resize')
    if not handle.count():
        return
    box = handle.first.bounding_box()
    if box is None:
        return
    x, y = box["x"] + 1, box["y"] + box["height"] / 2  # its left part: the right half lies under the next header
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + dx, y, steps=5)
    page.mouse.up()
