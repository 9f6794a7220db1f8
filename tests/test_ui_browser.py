"""The MLflow UI that users compare encoders in, checked in a real headless Chromium.

The UI is started the way the README says (``python -m artefact ui``) on the store of the
default sweep. Each check reads the rendered page, not only the HTTP status, and saves a
screenshot under ``test-artifacts/browser/``.
"""

from __future__ import annotations

import json
import os
import signal
import urllib.parse
import urllib.request

import pytest
from builders import CHROMIUM, free_port
from sweep_helpers import REPO, start_mlflow_server, sweep_runs

from artefact.report.figures import CONFUSION_SIZE, DPI
from artefact.train.evaluation import PREDICTION_IMAGES

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.browser]

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = REPO / "test-artifacts" / "browser"
PAGE_TIMEOUT_MS = 90_000


@pytest.fixture(scope="module")
def sweep(default_sweep):
    done, _, store = default_sweep
    assert done.returncode == 0, done.stderr[-3000:]
    parent, children = sweep_runs(store, "default")
    return store, parent, sorted(children, key=lambda run: run.info.run_name)


@pytest.fixture(scope="module")
def mlflow_ui(sweep):
    """``python -m artefact ui`` on the sweep's store, on a free loopback port."""
    port = free_port()
    server = start_mlflow_server(sweep[0], port)
    base = f"http://127.0.0.1:{port}"
    yield base
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, request):
    """A tall page (the compare view draws only the rows that fit); its screenshot is kept."""
    context = browser.new_context(viewport={"width": 1600, "height": 2000})
    page = context.new_page()
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    yield page
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{request.node.name}.png"))
    context.close()


def test_experiment_page_lists_the_parent_run_and_its_trials(mlflow_ui, sweep, page) -> None:
    _, parent, children = sweep
    page.goto(f"{mlflow_ui}/#/experiments/{parent.info.experiment_id}/runs")
    page.get_by_text(f"{1 + len(children)} matching runs").wait_for()
    parent_row = page.locator("[role=row]", has=page.get_by_role("link", name="default", exact=True))
    parent_row.wait_for()
    # Trials start collapsed under their sweep: expand the parent row to list them.
    parent_row.locator('button[data-component-id*="runnamecellrenderer"]').click()
    for child in children:
        link = page.get_by_role("link", name=child.info.run_name, exact=True)
        link.wait_for()
        assert child.info.run_id in link.get_attribute("href")


SCROLL_STEP_PX = 90


def test_compare_view_of_two_trials_shows_fine_miou(mlflow_ui, sweep, page) -> None:
    _, parent, children = sweep
    first, second = children[:2]
    runs = urllib.parse.quote(json.dumps([first.info.run_id, second.info.run_id]))
    experiments = urllib.parse.quote(json.dumps([parent.info.experiment_id]))
    page.goto(f"{mlflow_ui}/#/compare-runs?runs={runs}&experiments={experiments}")
    page.get_by_text("Comparing 2 Runs").wait_for()
    # The metrics table is a virtual list: scroll it (with the wheel, which keeps its name
    # and value columns in step) until the val/miou_fine row is drawn.
    anchor = page.get_by_role("link", name="perf/epoch_s", exact=True)  # a row the tall window shows
    anchor.wait_for()
    box = anchor.bounding_box()
    page.mouse.move(box["x"] + box["width"] + 250, box["y"] + box["height"] / 2)
    metric = page.get_by_role("link", name="val/miou_fine", exact=True)
    for _ in range(60):
        if metric.count():
            break
        page.mouse.wheel(0, SCROLL_STEP_PX)
        page.wait_for_timeout(150)
    metric.wait_for()
    values = page.evaluate(
        """(name) => {
            const cell = [...document.querySelectorAll('a')].find(a => a.textContent === name).parentElement;
            return [...document.querySelectorAll('div')]
                .filter(d => d !== cell && d.style.position === 'absolute' && d.style.top === cell.style.top)
                .map(d => d.innerText);
        }""",
        "val/miou_fine",
    )
    # The compare view rounds to three decimals: the two trials' values, in run order.
    expected = [round(run.data.metrics["val/miou_fine"], 3) for run in (first, second)]
    assert [float(value) for value in values] == pytest.approx(expected, abs=1e-3), values


def test_trial_artifacts_list_the_confusion_matrix_and_overlays(mlflow_ui, sweep, page) -> None:
    _, parent, children = sweep
    child = children[0]
    evaluation = child.data.tags["artefact.evaluation"]
    page.goto(f"{mlflow_ui}/#/experiments/{parent.info.experiment_id}/runs/{child.info.run_id}/artifacts")
    page.get_by_text("model_summary.yaml", exact=True).wait_for()
    page.get_by_text("config.yaml", exact=True).wait_for()
    for folder in evaluation.split("/"):
        page.get_by_text(folder, exact=True).click()
    page.get_by_text("confusion_fine.png", exact=True).wait_for()
    overlays = page.get_by_text("prediction_", exact=False)
    overlays.first.wait_for()
    assert overlays.count() == PREDICTION_IMAGES
    page.get_by_text("confusion_fine.png", exact=True).click()
    # The preview pane shows the PNG itself, decoded at the size it was drawn.
    width, height = (round(side * DPI) for side in CONFUSION_SIZE)
    page.wait_for_function(
        "([w, h]) => [...document.images].some(i => i.complete && i.naturalWidth === w && i.naturalHeight === h)",
        arg=[width, height],
    )
