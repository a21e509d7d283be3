"""A sweep logging to a real MLflow tracking server over HTTP, then the server's UI in a real browser.

The server is `cluster/mlflow/server-single-host.sh` on 127.0.0.1 (SQLite store, artifacts served
by the server); the browser is Debian's headless Chromium driven by Playwright. The screenshot
is kept in `test-artifacts/mlflow-ui.png`.
"""

import os
import re
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from conftest import command_line, session_processes
from servers import REPO, mlflow_server

pytestmark = pytest.mark.slow
PROBESWEEP = str(Path(sys.executable).with_name("probesweep"))
SPEC = {
    "name": "served",
    "backbones": ["tiny_resnet_sup"],
    "probe": {"loss": ["ce", "bce"], "head": [{"type": "linear"}]},
    "train": {"epochs": 2, "lr": 1.0e-2},
    "evaluate": {"methods": ["ixg"], "layers": ["input"], "n_grids": 4, "confidence": 0.5},
    "tracking": {"experiment": "served"},
}
SCREENSHOT = REPO / "test-artifacts" / "mlflow-ui.png"
PASSWORD = "s3cret-pw"  # in the tracking URI the sweep is given: it must never be stored or printed


@pytest.fixture(scope="module")
def served_sweep(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("served")
    (workdir / "served.yaml").write_text(yaml.safe_dump(SPEC))
    with mlflow_server(workdir / "server") as url:
        with_password = url.replace("http://", f"http://alice:{PASSWORD}@")  # the server takes no login: ignored
        result = subprocess.run(
            [PROBESWEEP, "run", "served.yaml", "--name", "served-1", "--tracking-uri", with_password, "--dashboard", "--ray-results"],
            cwd=workdir, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        yield workdir, url, result


def test_sweep_logs_runs_and_artifacts_through_the_server(served_sweep):
    workdir, url, result = served_sweep
    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("served")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert parent.info.status == "FINISHED" and len(children) == 2
    assert {c.info.status for c in children} == {"FINISHED"}
    assert all("gridpg/ixg/input" in c.data.metrics for c in children)
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"spec.yaml", "summary.csv", "pareto.json", "pareto.png"}
    assert [a.path for a in client.list_artifacts(children[0].info.run_id, "aggatt")] == ["aggatt/gridpg-ixg-input.npz", "aggatt/gridpg-ixg-input.png"]
    # nothing was written beside the sweep: the store and the artifacts are the server's
    assert not (workdir / "mlflow.db").exists() and not (workdir / "mlartifacts").exists()
    assert list((workdir / "server" / "artifacts").rglob("gridpg-ixg-input.png"))
    assert f"Open the runs in the tracking server's UI: {url}/#/experiments/{experiment.experiment_id}/runs" in result.stdout
    assert re.search(r"^Ray's dashboard: http://127\.0\.0\.1:\d+$", result.stderr, re.MULTILINE), result.stderr  # --dashboard
    # the server script leaves MLflow's job runner (its GenAI features) off: 5 processes, not 13
    assert not [c for c in map(command_line, session_processes()) if "mlflow.server.jobs" in c]


def test_with_ray_results_rays_own_analysis_reads_the_trials(served_sweep):
    from ray.tune import ExperimentAnalysis

    workdir, _, _ = served_sweep
    frame = ExperimentAnalysis(str(workdir / "ray_results" / "served-1")).dataframe()  # empty without --ray-results
    assert len(frame) == 2 and frame["val/accuracy"].between(0.5, 1.0).all()


def test_the_tracking_uris_password_is_neither_stored_nor_printed(served_sweep):
    workdir, url, result = served_sweep
    assert "alice:****@" in result.stderr  # the sweep's lines show the URI, redacted
    leaks = [str(p) for p in workdir.rglob("*") if p.is_file() and PASSWORD.encode() in p.read_bytes()]
    assert leaks == []  # ray_results (the record, tuner.pkl, experiment state), the server's store and artifacts
    assert PASSWORD not in result.stdout + result.stderr


def _chromium() -> str:
    found = os.environ.get("CHROMIUM") or shutil.which("chromium")
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("Chromium is missing: .ci/run installs Debian's chromium package")
    pytest.skip("Chromium is missing: install Debian's chromium package (apt-get install chromium)")


@contextmanager
def _browser_page(height: int = 700):
    """A page of headless Chromium; the flags keep it from reaching for Google's services on a
    machine with no network."""
    from playwright.sync_api import sync_playwright

    flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--no-first-run", "--disable-quic"]  # fmt: skip
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=_chromium(), args=flags)
        try:
            yield browser.new_page(viewport={"width": 1800, "height": height})
        finally:
            browser.close()


def test_every_printed_link_opens_the_classic_view_and_the_parent_shows_the_answer(served_sweep):
    _, url, result = served_sweep
    client = MlflowClient(url)
    experiment_id = client.get_experiment_by_name("served").experiment_id
    runs = client.search_runs([experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    # the trials are named by what sets them apart (the loss); the rest is on the parent
    assert sorted(r.info.run_name for r in runs if r is not parent) == ["bce", "ce"]
    assert parent.data.params["probe.head.type"] == "linear" and parent.data.metrics["best/val/accuracy"] > 0.5
    links = list(dict.fromkeys(re.findall(r"http://127\.0\.0\.1:\d+/#/\S+", result.stdout)))
    parent_link = next(link for link in links if parent.info.run_id in link)
    assert any(link.endswith("/runs?workflowType=machine_learning") for link in links) and len(links) >= 3  # table, parent, front
    with _browser_page(height=1100) as page:
        for link in links:
            page.goto(link)
            page.get_by_text("served-1", exact=True).first.wait_for(timeout=60_000)
            # the classic view's menu (Runs, Models, Model registry), not the GenAI one (Overview, Observability, ...)
            assert page.get_by_text("Model registry", exact=True).count() and not page.get_by_text("Observability", exact=True).count(), link
            if link == parent_link:
                if page.get_by_role("button", name="Close").count():  # the assistant panel takes a third of the width
                    page.get_by_role("button", name="Close").first.click()
                if page.get_by_text("Show more", exact=True).count():  # the description starts folded
                    page.get_by_text("Show more", exact=True).first.click()
                answer = page.locator("table").filter(has_text="gridpg/ixg/input").first
                answer.wait_for(timeout=30_000)
                cells = answer.inner_text()
                SCREENSHOT.parent.mkdir(exist_ok=True)
                page.screenshot(path=str(SCREENSHOT.with_name("mlflow-parent-run.png")))
    # the description's table: a row per probe, each with its GridPG score and interval
    assert "probe" in cells and "bce" in cells and "ce" in cells
    assert len(re.findall(r"0\.\d{3} \[0\.\d\d, [01]\.\d\d\]", cells)) >= 2, cells


def test_mlflow_ui_shows_the_sweep_in_a_real_browser(served_sweep):
    _, url, _ = served_sweep
    experiment_id = MlflowClient(url).get_experiment_by_name("served").experiment_id
    children = sorted(
        r.info.run_name for r in MlflowClient(url).search_runs([experiment_id]) if "mlflow.parentRunId" in r.data.tags
    )
    with _browser_page() as page:
        page.goto(f"{url}/#/experiments/{experiment_id}/runs?workflowType=machine_learning")
        page.get_by_text("served-1", exact=True).wait_for(timeout=60_000)  # the sweep's parent run
        if page.get_by_role("button", name="Close").count():  # the assistant panel takes half the width
            page.get_by_role("button", name="Close").first.click()
        # unfold the sweep's run to show its trials, and add the GridPG column
        page.locator("[role=gridcell][col-id='attributes.`Run Name`']").filter(has_text="served-1").locator("button").first.click()
        page.get_by_role("button", name="Columns").click()
        page.get_by_placeholder("Search columns").fill("gridpg/ixg/input")
        tree = page.get_by_test_id("column-selector-tree")
        # the exact column: its 95% interval's bounds (gridpg/ixg/input/ci_low, ...) match the search too
        tree.locator(".du-bois-light-tree-treenode").first.wait_for()
        nodes = tree.locator(".du-bois-light-tree-treenode").all()
        (column,) = [n for n in nodes if n.inner_text().strip() == "gridpg/ixg/input"]
        column.locator(".du-bois-light-tree-checkbox").click()
        page.keyboard.press("Escape")
        for name in children:
            page.get_by_text(name, exact=True).wait_for(timeout=30_000)
        breadcrumb = page.locator("a", has_text="served").all_inner_texts()  # Experiments > served
        headers = page.locator("[role=columnheader]").all_inner_texts()
        rows = page.locator("[role=row]").all_inner_texts()
        SCREENSHOT.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(SCREENSHOT))
    assert "served" in breadcrumb
    assert "gridpg/ixg/input" in headers
    # each trial's row shows a GridPG score (a number between 0 and 1) in that column
    scores = [line for row in rows for line in row.splitlines() if line.startswith("0.")]
    assert len(scores) >= len(children) == 2, rows
    assert SCREENSHOT.stat().st_size > 10_000
